"""The stages that :func:`irmprobe.pipeline.run` wires together, each cached by its config.

Every stage's output lives under ``$IRMPROBE_CACHE/stages/<stage>/<key>``, where the key hashes
the settings of that stage and the keys of the stages it reads, so changing one setting re-runs
only what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from irmprobe.cache import cache_root, config_key, write_json
from irmprobe.capture import (
    Capture,
    Samples,
    capture_to_store,
    last_token_activations,
    load_store,
    sample_continuations,
    store_complete,
)
from irmprobe.config import RunConfig
from irmprobe.features import (
    decoder_directions,
    evaluate_sae,
    load_sae,
    mmcs,
    save_sae,
    splice_metrics,
    train_sae,
    unmatched_features,
)
from irmprobe.organisms import load_prompts, make_organism, split_prompts
from irmprobe.pairs import ModelPair, fingerprint, load_pair
from irmprobe.rewards import RandomRM, RewardModel
from irmprobe.triples import Triples, build_triples, llm_swap_words
from irmprobe.views import analyse, probe_inputs

log = logging.getLogger(__name__)


def hash_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def stage_dir(stage: str, key: str) -> Path:
    return cache_root() / "stages" / stage / key


def get_pair(config: RunConfig, rm: RewardModel, train_prompts: list[str], echo,
             force: bool = False) -> tuple[ModelPair, str, dict]:
    pc = config.pair
    if pc.null:
        pair = load_pair(pc.base, None, device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
        return pair, f"null:{pc.base}", {"source": "null organism (tuned = base)", "reused": False}
    if pc.tuned is not None:
        pair = load_pair(pc.base, pc.tuned, device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
        return pair, f"spec:{pc.tuned}:{fingerprint(pc.tuned)}", {"source": pc.tuned, "reused": False}
    org = make_organism(pc.base, rm, config.organism, train_prompts, seed=config.seed, device=pc.device,
                        trust_remote_code=pc.trust_remote_code, force=force)
    if org.reused:
        echo(f"organism: reusing the cached tuned model at {org.path}")
    else:
        echo(f"organism: trained in {org.seconds:.0f} s, saved to {org.path}")
    pair = load_pair(pc.base, str(org.path), device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
    info = {"source": f"{config.organism.method.upper()} organism {org.path.name} ({'reused from cache' if org.reused else 'trained now'})",
            "path": str(org.path), "reused": org.reused, "train_seconds": org.seconds,
            "history": list(org.history)}
    return pair, f"organism:{org.path.name}", info


def extra_texts(cc, tokenizer) -> list[list[int]]:
    """Token ids of the extra capture texts (a file or dataset column), each cut to max_text_tokens."""
    if not (cc.text_path or cc.text_dataset):
        return []
    texts = load_prompts(cc.text_path, dataset=cc.text_dataset, column=cc.text_column, limit=cc.max_texts)
    ids = [tokenizer(t, truncation=True, max_length=cc.max_text_tokens)["input_ids"] for t in texts]
    return [list(i) for i in ids if len(i) >= 2]


def get_sae(config: RunConfig, sae_config, capture: Capture, cap_key: str, kind: str, layer: int,
            eval_rows: np.ndarray, meta: dict, force: bool = False):
    """Train (or load the cached) SAE of one (model, layer, size); evaluate it on held-out rows."""
    acts = capture.acts[f"{kind}.{layer}"]
    # Keyed by the settings that change training only: analysis settings never retrain an SAE.
    training = {k: getattr(sae_config, k) for k in ("architecture", "expansion", "l1_coefficient", "k",
                                                    "training_samples", "batch_size", "lr")}
    sae_dir = stage_dir("saes", config_key("sae-v3", cap_key, kind, layer, training, config.seed))
    if force and sae_dir.exists():
        shutil.rmtree(sae_dir)
    reused = (sae_dir / "cfg.json").is_file()
    if not reused:
        sae = train_sae(acts[~eval_rows], sae_config, seed=config.seed + layer, metadata=meta,
                        device=config.pair.device)
        save_sae(sae, sae_dir)
    sae = load_sae(sae_dir, device=config.pair.device)  # the inference form that every later stage uses
    metrics = evaluate_sae(sae, acts[eval_rows])
    write_json(sae_dir / "irmprobe_metrics.json", metrics)
    return sae, metrics, sae_dir, reused


def sae_stage(config: RunConfig, pair: ModelPair, samples: Samples, capture: Capture, cap_key: str,
              tuned_id: str, rm: RewardModel, force: bool = False) -> tuple[list[dict], list[dict], dict, bool]:
    """SAEs per (model, layer): metrics, splice loss, 1x-vs-2x MMCS, tuned-only features."""
    sc = config.sae
    eval_rows = np.random.default_rng(config.seed).random(len(capture.token_ids)) < 0.1
    # Half the splice text from each model's continuations (base ones come first in the samples).
    half, n_half = len(samples.token_ids) // 2, sc.splice_sequences // 2
    splice_seqs = list(samples.token_ids[:n_half]) + list(samples.token_ids[half : half + sc.splice_sequences - n_half])
    rows, saes, dirs, reused = [], {}, {}, True
    for kind in ("base", "tuned"):
        for layer in capture.layers:
            meta = {"model_name": tuned_id if kind == "tuned" else config.pair.base,
                    "hook_name": capture.hook_name(layer), "irmprobe_model": kind, "irmprobe_reward": rm.name}
            sae, metrics, sae_dir, was_cached = get_sae(config, sc, capture, cap_key, kind, layer, eval_rows, meta,
                                                        force)
            reused &= was_cached
            row = {"model": kind, "layer": layer, "d_sae": int(sae.cfg.d_sae), "path": str(sae_dir), **asdict(metrics)}
            dirs[kind, layer] = decoder_directions(sae)
            if sc.match_expansion and sc.match_expansion != sc.expansion:
                other, _, _, was_cached = get_sae(config, replace(sc, expansion=sc.match_expansion), capture,
                                                  cap_key, kind, layer, eval_rows, meta, force)
                reused &= was_cached
                # MMCS of the smaller dictionary against the larger one, whichever is the IRM's.
                small, large = sorted((decoder_directions(other), dirs[kind, layer]), key=len)
                row["mmcs_small_vs_large"] = mmcs(small, large)
                row["mmcs_small_vs_large_one_to_one"] = mmcs(small, large, one_to_one=True)
            if splice_seqs:
                cached = sae_dir / f"splice-{len(splice_seqs)}.json"
                if cached.is_file() and not force:
                    splice = json.loads(cached.read_text())
                else:
                    splice = splice_metrics(pair.bridge(kind), sae, capture.hook_name(layer), splice_seqs)
                    write_json(cached, splice)
                row.update(splice)
            rows.append(row)
            saes[kind, layer] = sae
    layer_rows = []
    for layer in capture.layers:
        new = unmatched_features(dirs["tuned", layer], dirs["base", layer], sc.match_threshold)
        layer_rows.append({"layer": layer, "tuned_only_features": int(len(new)),
                           "mmcs_tuned_vs_base": mmcs(dirs["tuned", layer], dirs["base", layer]),
                           "tuned_only_indices": new.tolist()})
    return rows, layer_rows, saes, reused


def triples_source(config: RunConfig) -> str:
    cc = config.compare
    where = cc.triples_path or "held-out generations"
    llm = config.llm
    return where + (f", swap words from {llm.model} at {llm.base_url}" if cc.llm_triples else ", offline swap words")


def chat_client(config: RunConfig):
    from irmprobe.llm import ChatClient

    if not config.llm.base_url:
        raise ValueError("an LLM step is on (compare.llm_triples or validate.judge=llm) but llm.base_url is not set")
    return ChatClient(config.llm.base_url, config.llm.model, api_key_env=config.llm.api_key_env)


def stage_triples(config: RunConfig, pair: ModelPair, samples: Samples, rm_map: dict) -> Triples | None:
    """Contrastive triples from the generations (or a text file); None when none can be built."""
    cc = config.compare
    if cc.triples_path:
        texts = load_prompts(cc.triples_path)
        streams = [pair.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    else:
        streams = [list(t) for t in samples.token_ids]
    try:
        triples = build_triples(streams, rm_map, pair.tokenizer, n_max=cc.n_triples, seed=config.seed)
    except ValueError as exc:
        log.warning("no contrastive probe: %s", exc)
        return None
    if cc.llm_triples:
        triples = llm_swap_words(triples, pair.tokenizer, rm_map, chat_client(config))
    return triples


def triple_inputs(config: RunConfig, pair: ModelPair, saes: dict, layers, triples: Triples, cap_key: str,
                   kinds_bridge=None) -> tuple:
    """Probe inputs at the last token of each triple variant (activations cached by the triples)."""
    ic = config.irm
    kinds = {"tuned": ["tuned"], "raw": ["tuned"], "base": ["base"], "diff": ["base", "tuned"]}[ic.inputs]
    bridges = kinds_bridge or {k: pair.bridge(k) for k in kinds}
    key = config_key("triples-v1", cap_key, pair.base_spec, pair.tuned_spec, layers, config.capture.hook,
                     [list(p) for p in triples.prefixes], triples.positive, triples.negative, triples.neutral, sorted(bridges))
    path = stage_dir("triples", key) / "activations.safetensors"
    if path.is_file():
        arrays = load_file(str(path))
    else:
        arrays = {}
        for variant in ("positive", "negative", "neutral"):
            for kind, bridge in bridges.items():
                acts = last_token_activations(bridge, triples.sequences(variant), tuple(layers), hook=config.capture.hook)
                arrays.update({f"{variant}/{kind}.{l}": a for l, a in acts.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        tmp.replace(path)
    out = []
    for variant in ("positive", "negative", "neutral"):
        acts = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(variant + "/")}
        out.append(probe_inputs(ic.inputs, acts, saes, layers)[0])
    return (*out, triples.positive, triples.negative)


def control_stage(config: RunConfig, pair: ModelPair, samples: Samples, stream, layers, saes: dict, rm_map: dict,
             triples: Triples | None, echo, force: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """The noise floor: the base tuned against a random reward, analysed exactly like the organism."""
    pc, cmp = config.pair, config.compare
    method = config.organism.method if config.organism.method in ("rloo", "grpo") else "rloo"
    org_cfg = replace(config.organism, method=method, steps=cmp.control_steps, checkpoint_every=0)
    random_rm = RandomRM(config.seed)
    prompts = load_prompts(config.prompts.path, dataset=config.prompts.dataset, column=config.prompts.column,
                           split=config.prompts.split)
    train_prompts, _ = split_prompts(prompts, config.prompts.n_heldout, config.seed)
    org = make_organism(pc.base, random_rm, org_cfg, train_prompts, seed=config.seed, device=pc.device,
                        trust_remote_code=pc.trust_remote_code, force="organism" in force)
    echo(f"control: {'reusing' if org.reused else 'trained'} the random-reward organism at {org.path}")
    control = load_pair(pc.base, str(org.path), device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
    cap_key = config_key("capture-v4", "control", org.path.name, hash_lines([json.dumps(list(t)) for t in stream]),
                         layers, config.capture.hook)
    cap_dir = stage_dir("capture", cap_key)
    if force and cap_dir.exists():  # forcing the organism, capture or SAEs re-captures the control too
        shutil.rmtree(cap_dir)
    if not store_complete(cap_dir):
        capture_to_store(control, stream, layers, cap_dir, hook=config.capture.hook, batch_size=config.capture.batch_size)
    capture = load_store(cap_dir)
    eval_rows = np.random.default_rng(config.seed).random(len(capture.token_ids)) < 0.1
    control_saes = {("base", l): saes["base", l] for l in layers}
    for layer in layers:
        meta = {"model_name": f"control:{org.path.name}", "hook_name": capture.hook_name(layer),
                "irmprobe_model": "control", "irmprobe_reward": random_rm.name}
        control_saes["tuned", layer], _, _, _ = get_sae(config, config.sae, capture, cap_key, "tuned", layer, eval_rows,
                                                        meta, bool(force))
    X, _ = probe_inputs(config.irm.inputs, capture.acts, control_saes, layers)
    raw = None if config.irm.inputs == "raw" else probe_inputs("raw", capture.acts, control_saes, layers)[0]
    triple_x = None
    if triples is not None:
        kinds = {"tuned": ["tuned"], "raw": ["tuned"], "base": ["base"], "diff": ["base", "tuned"]}[config.irm.inputs]
        triple_x = triple_inputs(config, control, control_saes, layers, triples, cap_key,
                                  kinds_bridge={k: control.bridge(k) for k in kinds})
    # The control's text-level figures use the organism's held-out generations and their RM rewards.
    result = analyse(capture, X, samples, rm_map, config, seed=config.seed, raw=raw, triple_inputs=triple_x, n_jobs=2)
    report = {"path": str(org.path), "reward": random_rm.describe(), "steps": cmp.control_steps, "method": method,
              "mean_log_ratio": float(capture.log_ratio.mean()), "reused": org.reused}
    return result.rows, report


def get_samples(config: RunConfig, pair: ModelPair, tuned_id: str, heldout: list[str],
                rm: RewardModel, force: bool = False) -> tuple[Samples, str, bool]:
    """The held-out continuations of both models (cached); returns (samples, key, reused)."""
    key = config_key("samples-v2", config.pair.base, fingerprint(config.pair.base), config.pair.dtype, tuned_id,
                     hash_lines(heldout), config.samples, rm.describe(), config.seed)
    path = stage_dir("samples", key) / "samples.json"
    if path.is_file() and not force:
        return Samples.load(path), key, True
    sc = config.samples
    ids, lens, idx, texts, src = [], [], [], [], []
    for offset, (name, model) in enumerate((("base", pair.base), ("tuned", pair.tuned))):
        out = sample_continuations(model, pair.tokenizer, heldout, n_per_prompt=sc.samples_per_prompt,
                                   max_new_tokens=sc.max_new_tokens, batch_size=sc.batch_size,
                                   seed=config.seed * 1000 + offset)
        ids += out[0]; lens += out[1]; idx += out[2]; texts += out[3]; src += [name] * len(out[0])
    samples = Samples(tuple(heldout), tuple(tuple(t) for t in ids), np.array(lens), np.array(idx),
                      np.array(src), tuple(texts), rm.score(texts))
    samples.save(path)
    return samples, key, False


