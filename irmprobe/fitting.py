"""One branch's IRM views from its capture and SAEs: probe inputs, contrastive triples cut from
training and from held-out sequences, and :func:`irmprobe.views.analyse`."""

from __future__ import annotations

import logging

import numpy as np
from safetensors.numpy import load_file, save_file

from irmprobe.cache import cache_root, config_key
from irmprobe.capture import last_token_activations
from irmprobe.irm import two_folds
from irmprobe.organisms import load_prompts
from irmprobe.triples import Triples, build_triples, llm_swap_words
from irmprobe.views import Analysis, analyse, probe_inputs

log = logging.getLogger(__name__)

_KINDS = {"tuned": ["tuned"], "raw": ["tuned"], "base": ["base"], "diff": ["base", "tuned"]}


def chat_client(llm):
    """The chat client of the ``llm`` section (needs ``base_url`` and ``model``)."""
    from irmprobe.llm import ChatClient

    if not llm.base_url:
        raise ValueError("an LLM step is on (compare.llm_triples or validate.judge=llm) but llm.base_url is not set")
    return ChatClient(llm.base_url, llm.model, api_key_env=llm.api_key_env)


def triples_for(cfg, pair, streams: list[list[int]], rm_map: dict, seed: int) -> Triples | None:
    try:
        triples = build_triples(streams, rm_map, pair.tokenizer, n_max=cfg.compare.n_triples, seed=seed)
    except ValueError as exc:
        log.warning("no contrastive probe: %s", exc)
        return None
    if cfg.compare.llm_triples:
        triples = llm_swap_words(triples, pair.tokenizer, rm_map, chat_client(cfg.llm))
    return triples


def triple_inputs(inputs: str, hook: str, pair, saes: dict, layers, triples: Triples, cache_key: str) -> tuple:
    """Probe inputs at the last token of each triple variant (activations cached by the triples)."""
    bridges = {k: pair.bridge(k) for k in _KINDS[inputs]}
    key = config_key("triples-v2", cache_key, pair.base_spec, pair.tuned_spec, list(layers), hook,
                     [list(p) for p in triples.prefixes], triples.positive, triples.negative, triples.neutral,
                     sorted(bridges))
    path = cache_root() / "stages" / "triples" / key / "activations.safetensors"
    if path.is_file():
        arrays = load_file(str(path))
    else:
        arrays = {}
        for variant in ("positive", "negative", "neutral"):
            for kind, bridge in bridges.items():
                acts = last_token_activations(bridge, triples.sequences(variant), tuple(layers), hook=hook)
                arrays.update({f"{variant}/{kind}.{l}": a for l, a in acts.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        tmp.replace(path)
    out = []
    for variant in ("positive", "negative", "neutral"):
        acts = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(variant + "/")}
        out.append(probe_inputs(inputs, acts, saes, layers)[0])
    return (*out, triples.positive, triples.negative)


def fit_views(cfg, pair, samples, capture, saes: dict, layers, rm, *, cache_key: str) -> tuple[Analysis, object, list,
                                                                                               dict | None]:
    """Every view of one branch; returns (analysis, probe inputs, feature names, triples info)."""
    ic, cc, seed = cfg.irm, cfg.compare, cfg.seed
    rm_map = rm.token_values(pair.tokenizer)
    X, names = probe_inputs(ic.inputs, capture.acts, saes, layers)
    raw = None if ic.inputs == "raw" else probe_inputs("raw", capture.acts, saes, layers)[0]
    triple_x, info = None, None
    if cc.rm_informed:
        folds = two_folds(capture.seq_index, seed)
        if cc.triples_path:
            streams = [pair.tokenizer(t, add_special_tokens=True)["input_ids"] for t in load_prompts(cc.triples_path)]
            first = set(np.flatnonzero(np.random.default_rng(seed).random(len(streams)) < 0.5).tolist())
        else:
            streams = [list(t) for t in samples.token_ids]
            first = {int(s) for s in np.unique(capture.seq_index[folds[0]])}
        # Triples cut from one fold's sequences train the probe that scores the other fold.
        parts = [[s for i, s in enumerate(streams) if (i in first) == inside] for inside in (True, False)]
        built = [triples_for(cfg, pair, part, rm_map, seed) for part in parts]
        if all(t is not None for t in built):
            args = (ic.inputs, cfg.capture.hook, pair, saes, layers)
            triple_x = tuple(triple_inputs(*args, t, cache_key) for t in built)
            source = cc.triples_path or "held-out generations"
            info = {"n_per_fold": [len(t) for t in built],
                    "source": source + (", LLM swap words" if cc.llm_triples else ", offline swap words")}
    decision = None
    if "decision" in ic.positions:
        from irmprobe.patching import decision_rows

        rows, prev = decision_rows(capture.seq_index, capture.position)
        decision = (X[prev], rows, prev)  # features at t-1, target r_t
    analysis = analyse(capture, X, samples, rm_map, ic, cc, seed=seed, raw=raw, triple_inputs=triple_x, n_jobs=2,
                       decision=decision, device=cfg.pair.device)
    return analysis, X, names, info
