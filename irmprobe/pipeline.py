"""``run(config)``: every stage of the IRM analysis, each cached by its config.

Stages: organism (TRL) -> pair and layer divergence -> sampled text and organism report ->
paired capture -> SAEs (SAELens) -> IRM fits (scikit-learn) -> comparison with the RM -> report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from irmprobe import reporting
from safetensors.numpy import load_file, save_file

from irmprobe.cache import cache_root, config_key, write_json
from irmprobe.capture import (Capture, Samples, capture_to_store, last_token_activations, load_store,
                              sample_continuations, store_complete)
from irmprobe.compare import against_control, disagreements, feature_alignment
from irmprobe.config import RunConfig
from irmprobe.evals.validate import make_judge, validate
from irmprobe.features import (decoder_directions, evaluate_sae, load_sae, mmcs, save_sae, splice_metrics,
                               train_sae, unmatched_features)
from irmprobe.irm import token_map
from irmprobe.organisms import load_prompts, make_organism, report_from, seed_everything, split_prompts
from irmprobe.pairs import ModelPair, fingerprint, layer_divergence, load_pair
from irmprobe.rewards import RandomRM, RewardModel, reward_model
from irmprobe.triples import Triples, build_triples, llm_swap_words
from irmprobe.views import analyse, probe_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run produced: every figure, and where it was written."""

    metrics: dict
    metrics_path: Path


class _Stages:
    """Times stages and prints one line per stage."""

    def __init__(self, echo) -> None:
        self.seconds: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.echo(f"[{name}] ...")
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.echo(f"[{name}] done in {self.seconds[name]:.1f} s")


def _hash_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _stage_dir(stage: str, key: str) -> Path:
    return cache_root() / "stages" / stage / key


def _get_pair(config: RunConfig, rm: RewardModel, train_prompts: list[str], echo) -> tuple[ModelPair, str, dict]:
    pc = config.pair
    if pc.null:
        pair = load_pair(pc.base, None, device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
        return pair, f"null:{pc.base}", {"source": "null organism (tuned = base)", "reused": False}
    if pc.tuned is not None:
        pair = load_pair(pc.base, pc.tuned, device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
        return pair, f"spec:{pc.tuned}:{fingerprint(pc.tuned)}", {"source": pc.tuned, "reused": False}
    org = make_organism(pc.base, rm, config.organism, train_prompts, seed=config.seed, device=pc.device,
                        trust_remote_code=pc.trust_remote_code)
    if org.reused:
        echo(f"organism: reusing the cached tuned model at {org.path}")
    else:
        echo(f"organism: trained in {org.seconds:.0f} s, saved to {org.path}")
    pair = load_pair(pc.base, str(org.path), device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
    info = {"source": f"{config.organism.method.upper()} organism {org.path.name} ({'reused from cache' if org.reused else 'trained now'})",
            "path": str(org.path), "reused": org.reused, "train_seconds": org.seconds,
            "history": list(org.history)}
    return pair, f"organism:{org.path.name}", info


def _extra_texts(cc, tokenizer) -> list[list[int]]:
    """Token ids of the extra capture texts (a file or dataset column), each cut to max_text_tokens."""
    if not (cc.text_path or cc.text_dataset):
        return []
    texts = load_prompts(cc.text_path, dataset=cc.text_dataset, column=cc.text_column, limit=cc.max_texts)
    ids = [tokenizer(t, truncation=True, max_length=cc.max_text_tokens)["input_ids"] for t in texts]
    return [list(i) for i in ids if len(i) >= 2]


def _get_sae(config: RunConfig, sae_config, capture: Capture, cap_key: str, kind: str, layer: int,
             eval_rows: np.ndarray, meta: dict):
    """Train (or load the cached) SAE of one (model, layer, size); evaluate it on held-out rows."""
    acts = capture.acts[f"{kind}.{layer}"]
    # Keyed by the settings that change training only: analysis settings never retrain an SAE.
    training = {k: getattr(sae_config, k) for k in ("architecture", "expansion", "l1_coefficient", "k",
                                                    "training_samples", "batch_size", "lr")}
    sae_dir = _stage_dir("saes", config_key("sae-v3", cap_key, kind, layer, training, config.seed))
    if not (sae_dir / "cfg.json").is_file():
        sae = train_sae(acts[~eval_rows], sae_config, seed=config.seed + layer, metadata=meta,
                        device=config.pair.device)
        save_sae(sae, sae_dir)
    sae = load_sae(sae_dir, device=config.pair.device)  # the inference form that every later stage uses
    metrics = evaluate_sae(sae, acts[eval_rows])
    write_json(sae_dir / "irmprobe_metrics.json", metrics)
    return sae, metrics, sae_dir


def _sae_stage(config: RunConfig, pair: ModelPair, samples: Samples, capture: Capture, cap_key: str,
               tuned_id: str, rm: RewardModel) -> tuple[list[dict], list[dict], dict]:
    """SAEs per (model, layer): metrics, splice loss, 1x-vs-2x MMCS, tuned-only features."""
    sc = config.sae
    eval_rows = np.random.default_rng(config.seed).random(len(capture.token_ids)) < 0.1
    # Half the splice text from each model's continuations (base ones come first in the samples).
    half, n_half = len(samples.token_ids) // 2, sc.splice_sequences // 2
    splice_seqs = list(samples.token_ids[:n_half]) + list(samples.token_ids[half : half + sc.splice_sequences - n_half])
    rows, saes, dirs = [], {}, {}
    for kind in ("base", "tuned"):
        for layer in capture.layers:
            meta = {"model_name": tuned_id if kind == "tuned" else config.pair.base,
                    "hook_name": capture.hook_name(layer), "irmprobe_model": kind, "irmprobe_reward": rm.name}
            sae, metrics, sae_dir = _get_sae(config, sc, capture, cap_key, kind, layer, eval_rows, meta)
            row = {"model": kind, "layer": layer, "d_sae": int(sae.cfg.d_sae), "path": str(sae_dir), **asdict(metrics)}
            dirs[kind, layer] = decoder_directions(sae)
            if sc.match_expansion and sc.match_expansion != sc.expansion:
                other, _, _ = _get_sae(config, replace(sc, expansion=sc.match_expansion), capture, cap_key, kind,
                                       layer, eval_rows, meta)
                # MMCS of the smaller dictionary against the larger one, whichever is the IRM's.
                small, large = sorted((decoder_directions(other), dirs[kind, layer]), key=len)
                row["mmcs_small_vs_large"] = mmcs(small, large)
                row["mmcs_small_vs_large_one_to_one"] = mmcs(small, large, one_to_one=True)
            if splice_seqs:
                cached = sae_dir / f"splice-{len(splice_seqs)}.json"
                if cached.is_file():
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
    return rows, layer_rows, saes


def triples_source(config: RunConfig) -> str:
    cc = config.compare
    where = cc.triples_path or "held-out generations"
    llm = config.llm
    return where + (f", swap words from {llm.model} at {llm.base_url}" if cc.llm_triples else ", offline swap words")


def _chat_client(config: RunConfig):
    from irmprobe.llm import ChatClient

    if not config.llm.base_url:
        raise ValueError("an LLM step is on (compare.llm_triples or validate.judge=llm) but llm.base_url is not set")
    return ChatClient(config.llm.base_url, config.llm.model, api_key_env=config.llm.api_key_env)


def _triples(config: RunConfig, pair: ModelPair, samples: Samples, rm_map: dict) -> Triples | None:
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
        triples = llm_swap_words(triples, pair.tokenizer, rm_map, _chat_client(config))
    return triples


def _triple_inputs(config: RunConfig, pair: ModelPair, saes: dict, layers, triples: Triples, cap_key: str,
                   kinds_bridge=None) -> tuple:
    """Probe inputs at the last token of each triple variant (activations cached by the triples)."""
    ic = config.irm
    kinds = {"tuned": ["tuned"], "raw": ["tuned"], "base": ["base"], "diff": ["base", "tuned"]}[ic.inputs]
    bridges = kinds_bridge or {k: pair.bridge(k) for k in kinds}
    key = config_key("triples-v1", cap_key, pair.base_spec, pair.tuned_spec, layers, config.capture.hook,
                     [list(p) for p in triples.prefixes], triples.positive, triples.negative, triples.neutral, sorted(bridges))
    path = _stage_dir("triples", key) / "activations.safetensors"
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


def _control(config: RunConfig, pair: ModelPair, samples: Samples, stream, layers, saes: dict, rm_map: dict,
             triples: Triples | None, echo) -> tuple[list[dict], dict]:
    """The noise floor: the base tuned against a random reward, analysed exactly like the organism."""
    pc, cmp = config.pair, config.compare
    method = config.organism.method if config.organism.method in ("rloo", "grpo") else "rloo"
    org_cfg = replace(config.organism, method=method, steps=cmp.control_steps, checkpoint_every=0)
    random_rm = RandomRM(config.seed)
    prompts = load_prompts(config.prompts.path, dataset=config.prompts.dataset, column=config.prompts.column,
                           split=config.prompts.split)
    train_prompts, _ = split_prompts(prompts, config.prompts.n_heldout, config.seed)
    org = make_organism(pc.base, random_rm, org_cfg, train_prompts, seed=config.seed, device=pc.device,
                        trust_remote_code=pc.trust_remote_code)
    echo(f"control: {'reusing' if org.reused else 'trained'} the random-reward organism at {org.path}")
    control = load_pair(pc.base, str(org.path), device=pc.device, dtype=pc.dtype, trust_remote_code=pc.trust_remote_code)
    cap_key = config_key("capture-v4", "control", org.path.name, _hash_lines([json.dumps(list(t)) for t in stream]),
                         layers, config.capture.hook)
    cap_dir = _stage_dir("capture", cap_key)
    if not store_complete(cap_dir):
        capture_to_store(control, stream, layers, cap_dir, hook=config.capture.hook, batch_size=config.capture.batch_size)
    capture = load_store(cap_dir)
    eval_rows = np.random.default_rng(config.seed).random(len(capture.token_ids)) < 0.1
    control_saes = {("base", l): saes["base", l] for l in layers}
    for layer in layers:
        meta = {"model_name": f"control:{org.path.name}", "hook_name": capture.hook_name(layer),
                "irmprobe_model": "control", "irmprobe_reward": random_rm.name}
        control_saes["tuned", layer], _, _ = _get_sae(config, config.sae, capture, cap_key, "tuned", layer, eval_rows, meta)
    X, _ = probe_inputs(config.irm.inputs, capture.acts, control_saes, layers)
    raw = None if config.irm.inputs == "raw" else probe_inputs("raw", capture.acts, control_saes, layers)[0]
    triple_x = None
    if triples is not None:
        kinds = {"tuned": ["tuned"], "raw": ["tuned"], "base": ["base"], "diff": ["base", "tuned"]}[config.irm.inputs]
        triple_x = _triple_inputs(config, control, control_saes, layers, triples, cap_key,
                                  kinds_bridge={k: control.bridge(k) for k in kinds})
    # The control's text-level figures use the organism's held-out generations and their RM rewards.
    result = analyse(capture, X, samples, rm_map, config, seed=config.seed, raw=raw, triple_inputs=triple_x, n_jobs=2)
    report = {"path": str(org.path), "reward": random_rm.describe(), "steps": cmp.control_steps, "method": method,
              "mean_log_ratio": float(capture.log_ratio.mean()), "reused": org.reused}
    return result.rows, report


def _get_samples(config: RunConfig, pair: ModelPair, tuned_id: str, heldout: list[str],
                 rm: RewardModel) -> tuple[Samples, str]:
    key = config_key("samples-v2", config.pair.base, fingerprint(config.pair.base), config.pair.dtype, tuned_id,
                     _hash_lines(heldout), config.samples, rm.describe(), config.seed)
    path = _stage_dir("samples", key) / "samples.json"
    if path.is_file():
        return Samples.load(path), key
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
    return samples, key


def run(config: RunConfig, *, reward: RewardModel | None = None, echo=print) -> RunResult:
    """Run the whole analysis; print a summary; write metrics JSON (and a W&B run).

    Args:
        config: the analysis.
        reward: an RM object to use instead of the one ``config.reward`` names (e.g. a
            :class:`irmprobe.rewards.TextRM` wrapping your own Python function).
        echo: where progress and the summary lines go.
    """
    stage = _Stages(echo)
    seed_everything(config.seed)
    rm = reward if reward is not None else reward_model(config.reward, device=config.pair.device)
    pc = config.prompts
    prompts = load_prompts(pc.path, dataset=pc.dataset, column=pc.column, split=pc.split)
    train_prompts, heldout = split_prompts(prompts, pc.n_heldout, config.seed)

    with stage("organism"):
        pair, tuned_id, organism_info = _get_pair(config, rm, train_prompts, echo)
    with stage("layers"):
        div = layer_divergence(pair, config.capture.top_k_layers, by=config.capture.rank_layers_by)
        layers = div.chosen
    with stage("samples"):
        samples, samples_key = _get_samples(config, pair, tuned_id, heldout, rm)

    with stage("capture"):
        cc = config.capture
        stream = list(samples.token_ids) + _extra_texts(cc, pair.tokenizer)
        cap_key = config_key("capture-v4", samples_key, layers, cc.hook,
                             hashlib.sha256(json.dumps(stream[len(samples.token_ids):]).encode()).hexdigest())
        cap_dir = _stage_dir("capture", cap_key)
        if not store_complete(cap_dir):
            capture_to_store(pair, stream, layers, cap_dir, hook=cc.hook, batch_size=cc.batch_size)
        capture = load_store(cap_dir)

    with stage("saes"):
        sae_rows, layer_rows, saes = _sae_stage(config, pair, samples, capture, cap_key, tuned_id, rm)

    ic, cmp = config.irm, config.compare
    rm_map = rm.token_values(pair.tokenizer)
    with stage("irm"):
        X, feature_names = probe_inputs(ic.inputs, capture.acts, saes, layers)
        raw = None if ic.inputs == "raw" else probe_inputs("raw", capture.acts, saes, layers)[0]
        triples = _triples(config, pair, samples, rm_map) if cmp.rm_informed else None
        triple_x = _triple_inputs(config, pair, saes, layers, triples, cap_key) if triples is not None else None
        main = analyse(capture, X, samples, rm_map, config, seed=config.seed, raw=raw, triple_inputs=triple_x, n_jobs=2)

    control_rows, control_info = None, None
    if cmp.control_steps and not pair.is_null:
        with stage("control"):
            control_rows, control_info = _control(config, pair, samples, stream, layers, saes, rm_map, triples, echo)

    with stage("compare"):
        agree = against_control(main.rows, control_rows) if control_rows is not None else main.rows
        decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
        alignment = feature_alignment(X, main.fits["sae_irm"].coef, main.rm_rows, capture.token_ids, decode,
                                      feature_names, n=cmp.n_alignment) if ic.inputs != "raw" else None
        disagree = {name: disagreements(main.maps[name], rm_map, decode, cmp.n_disagreements)
                    for name in ("sae_irm", "log_ratio (no model)") if name in main.maps}
        lr_map, sae_map = main.maps["log_ratio (no model)"], main.maps["sae_irm"]
        counts = {t: c for t, (_, c) in token_map(capture.token_ids, capture.log_ratio, ic.min_token_count).items()}
        token_rows = [[decode(tok), rm_map[tok], counts[tok], lr_map[tok], sae_map[tok],
                       main.maps.get("full_vocab_log_ratio", {}).get(tok), main.maps["shuffled_0"].get(tok)]
                      for tok in sorted(set(lr_map) & set(rm_map), key=lambda t: -counts[t])]

    validation = None
    vc = config.validate
    if vc.enabled and not pair.is_null and ic.inputs == "tuned":
        with stage("validate"):
            key = config_key("validate-v1", cap_key, tuned_id, config.sae, config.irm, vc, config.llm, rm.describe(),
                             config.seed)
            path = _stage_dir("validate", key) / "validation.json"
            if path.is_file():
                validation = json.loads(path.read_text())
            else:
                judge = make_judge(config, pair, rm_map, _chat_client(config) if vc.judge == "llm" else None)
                validation = validate(config, pair, capture, X, feature_names, main.fits["sae_irm"].coef,
                                      saes, rm, rm_map, heldout, stream, judge=judge, echo=echo)
                write_json(path, validation)

    organism_report = report_from(samples, capture)
    reward = organism_report["reward"] | {"n_prompts": organism_report["n_prompts"],
                                          "samples_per_prompt": organism_report["samples_per_prompt"]}
    metrics = {
        "config": config.to_dict(),
        "organism": organism_info | {"tuned_id": tuned_id},
        "reward": reward,
        "kl": organism_report["kl"],
        "vader_compound": organism_report["vader_compound"],
        "examples": organism_report["examples"],
        "layers": {"per_block": list(div.per_block), "relative": list(div.relative), "chosen": list(layers),
                   "ranked_by": div.ranked_by, "per_submodule": {k: list(v) for k, v in div.per_submodule.items()},
                   "relative_submodule": {k: list(v) for k, v in div.relative_submodule.items()},
                   "table": div.table()},
        "capture": {"rows": int(len(capture.token_ids)), "sequences": len(samples.token_ids), "hook": capture.hook},
        "saes": sae_rows,
        "sae_layers": layer_rows,
        "irm": {"inputs": ic.inputs, "n_features": int(X.shape[1]), "n_rows": int(X.shape[0]),
                "fits": {name: {"alpha": f.alpha, "test_r2": f.test_r2, "is_zero": f.is_zero,
                                "n_nonzero": int(np.count_nonzero(f.coef)) if f.coef is not None else None}
                         for name, f in main.fits.items()},
                "triples": None if triples is None else {"n": len(triples), "source": triples_source(config)}},
        "agreement": agree,
        "control": control_info,
        "control_agreement": control_rows,
        "disagreements": disagree,
        "validation": validation,
        "feature_alignment": None if alignment is None else {k: alignment[k] for k in ("irm_not_rm", "rm_not_irm")},
        "tokens": {"columns": ["token", "rm_value", "count", "log_ratio", "sae_irm", "full_vocab", "shuffled_0"],
                   "rows": token_rows},
        "rm": {"tokens_with_value": len(rm_map), **rm.describe()},
        "verdict": verdict(reward, agree, pair.is_null, validation),
        "stage_seconds": stage.seconds,
    }
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.report.out_dir) / f"run-{stamp}-{config_key(config)[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    wandb_dir = reporting.log_to_wandb(metrics, config.to_dict(), token_rows, project=config.report.wandb_project,
                                       mode=config.report.wandb_mode, run_dir=run_dir)
    metrics["wandb_dir"] = wandb_dir
    path = reporting.write_metrics(run_dir / "metrics.json", metrics)
    for line in reporting.summary_lines(metrics):
        echo(line)
    return RunResult(metrics, path)


def verdict(reward: dict, agree: list[dict], is_null: bool, validation: dict | None = None) -> list[str]:
    """Plain statements of what the figures do and do not show."""
    out = []
    z = reward["diff_z"]
    if is_null:
        out.append("null organism: the tuned model is the base model, so there is no implicit reward to find.")
    elif z is None or z < 3:
        out.append(f"the organism did NOT learn reliably: tuned - base reward is {_z(z)} s.e. (< 3).")
    else:
        out.append(f"the organism learned: tuned - base reward is {_z(z)} s.e. above zero.")
    rows = {r["name"]: r for r in agree}
    irm, base = rows["sae_irm"], rows["baseline_shuffled"]
    if irm["is_zero"]:
        out.append("the SAE IRM is identically zero: no implicit reward was learned (no tau or p-value applies).")
        return out
    if irm["tau"] is None or base["tau"] is None:
        out.append(f"no comparison with the RM was possible: {irm.get('note') or base.get('note')}")
        return out
    floor = base["tau_max"] if not base["is_zero"] else 0.0
    if irm["tau"] > floor and irm["p_value"] < 0.05:
        out.append(f"the SAE IRM agrees with the RM (tau {irm['tau']:+.3f}, p {irm['p_value']:.1e}) above every "
                   f"shuffled-target baseline fit (max tau {floor:+.3f} of {base['n_fits']}).")
    else:
        out.append(f"the SAE IRM does NOT beat the shuffled-target baseline: tau {irm['tau']:+.3f} "
                   f"(p {irm['p_value']:.1e}) vs baseline max {floor:+.3f} over {base['n_fits']} fits.")
    if irm.get("control_tau") is not None:
        gap = irm["above_control"]
        out.append(f"against the random-reward control organism (tau {irm['control_tau']:+.3f}) the SAE IRM stands "
                   f"{gap:+.3f} above it" + (" with non-overlapping 95% CIs." if irm.get("above_control_ci")
                                              else "; the CIs overlap, so this is not clear evidence of a learned reward."))
    if validation:
        rows = {r["set"]: r for r in validation["ablation"]}
        top = next((r for name, r in rows.items() if name.startswith("irm_top")), None)
        rand = next((r for name, r in rows.items() if name.startswith("random")), None)
        if top and rand and top["change"] and rand["change"]:
            lowered = top["change"]["ci"][1] < 0
            out.append(f"ablating the IRM's top {top['n_features']} features changed reward by {top['change']['mean']:+.3f} "
                       f"(95% CI {top['change']['ci'][0]:+.3f}..{top['change']['ci'][1]:+.3f}); {rand['n_features']} random "
                       f"features: {rand['change']['mean']:+.3f}. "
                       + ("The IRM's features carry reward causally." if lowered and rand["change"]["ci"][0] <= 0 <= rand["change"]["ci"][1]
                          else "No clear causal effect beyond the random control."))
    informed = [r for r in agree if r.get("family") == "rm_informed" and r.get("tau") is not None]
    if informed:
        out.append("RM-informed views (" + ", ".join(r["name"] for r in informed) + ") use RM labels: they show the "
                   "RM is decodable from the features, which is as true of a model that learned nothing.")
    return out


def _z(z: float | None) -> str:
    return "undefined" if z is None else f"{z:.1f}"

