"""Stage 7 wired together: judge the IRM's features and cross-compare (``interpret``), then ablate
them with controls (``ablate``)."""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

from irmprobe.evals.ablation import FeatureSet, ablation_table
from irmprobe.pairs import load_model
from irmprobe.evals.autointerp import (LLMJudge, LocalChat, OfflineJudge, cross_comparison, detection_score,
                                       feature_evidence)

_NAME = re.compile(r"^L(\d+)/tuned(\d+)$")


def _parse(name: str) -> tuple[int, int]:
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"validation needs tuned SAE features (irm.inputs=tuned); got feature {name!r}")
    return int(match.group(1)), int(match.group(2))


def make_judge(config, pair, rm_map: dict, chat_client=None):
    """The judge ``config.validate.judge`` names."""
    kind = config.validate.judge
    if kind == "offline":
        return OfflineJudge(rm_map)
    if kind == "local":
        # A fresh copy: generate() on a model a TransformerBridge has wrapped samples differently.
        model, _ = load_model(pair.base_spec, device=config.pair.device, dtype=config.pair.dtype,
                              trust_remote_code=config.pair.trust_remote_code)
        return LLMJudge(LocalChat(model, pair.tokenizer), name="local")
    return LLMJudge(chat_client, name=f"llm:{config.llm.model}")


def interpret(config, pair, capture, X: sp.csr_matrix, feature_names: list[str], coef: np.ndarray, saes: dict,
              rm_map: dict, streams, *, judge=None) -> dict:
    """Judge the IRM's top features and others, and compare the two selections.

    Args:
        X: the tuned model's SAE features at every captured row (unscaled).
        feature_names: ``L{layer}/tuned{index}`` for each column of ``X``.
        coef: the primary IRM's weight of each column.
        saes: ``{("tuned", layer): sae}``.
        streams: token ids of every captured sequence (for feature contexts).
    """
    vc = config.validate
    rng = np.random.default_rng(config.seed)
    Xc = X.tocsc()
    frequency = np.diff(Xc.indptr) / X.shape[0]
    top_k = [int(i) for i in np.argsort(-coef, kind="stable")[: vc.top_k] if coef[i] > 0]
    by_weight = [int(i) for i in np.argsort(-np.abs(coef), kind="stable") if frequency[i] > 0 and int(i) not in top_k]
    universe = top_k + by_weight[: max(0, vc.n_judged // 2 - len(top_k))]
    firing = np.setdiff1d(np.flatnonzero(frequency > 0), universe)
    n_random = max(0, min(len(firing), vc.n_judged - len(universe)))
    universe += [int(i) for i in rng.choice(firing, n_random, replace=False)]

    judge = judge or make_judge(config, pair, rm_map)
    unembed = pair.tuned.get_output_embeddings().weight.detach().float().cpu().numpy().T
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    judged = []
    for i in universe:
        layer, index = _parse(feature_names[i])
        direction = saes["tuned", layer].W_dec[index].detach().float().cpu().numpy()
        ev = feature_evidence(feature_names[i], layer, index, Xc[:, i], capture.token_ids, capture.seq_index,
                              capture.position, streams, decode, direction, unembed, seed=config.seed + i)
        j = judge.judge(ev, vc.concept) if isinstance(judge, LLMJudge) else judge.judge(ev)
        judged.append({"feature": ev.name, "column": i, "weight": float(coef[i]), "frequency": ev.frequency,
                       "max_activation": ev.max_activation, "in_irm_top_k": i in top_k, "relevant": j.relevant,
                       "score": j.score, "explanation": j.explanation, "detection": detection_score(judge, j, ev),
                       "contexts": [{"text": c.text(), "tokens": list(c.tokens), "activations": list(c.activations)}
                                    for c in ev.contexts[:5]],
                       "promoted": [t for _, t in ev.promoted], "histogram": list(ev.histogram[0])})
    flagged = [r for r in judged if r["relevant"]]
    cross = cross_comparison([r["feature"] for r in judged], {feature_names[i] for i in top_k},
                             {r["feature"] for r in flagged}, {r["feature"]: r["frequency"] for r in judged},
                             float(frequency.mean()))
    detections = [r["detection"] for r in judged if r["detection"] is not None]
    cross["detection_mean"] = float(np.mean(detections)) if detections else None

    return {"judge": getattr(judge, "name", "judge"), "top_k": [feature_names[i] for i in top_k],
            "top_k_columns": top_k, "judged": judged, "cross": cross}


def ablate(config, pair, capture, X: sp.csr_matrix, feature_names: list[str], saes: dict, rm, prompts: list[str],
           interpretation: dict, *, echo=print) -> list[dict]:
    """Ablate the IRM's top-k, the judge-flagged and k random features, and the reconstruction-only
    control, in the tuned model; the reward table of :func:`irmprobe.evals.ablation.ablation_table`."""
    vc = config.validate
    rng = np.random.default_rng(config.seed + 1)
    frequency = np.diff(X.tocsc().indptr) / X.shape[0]
    top_k = interpretation["top_k_columns"]

    def as_layers(columns) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for c in columns:
            layer, index = _parse(feature_names[c])
            out.setdefault(layer, []).append(index)
        return {k: tuple(v) for k, v in out.items()}

    means = None
    if vc.ablation == "mean":
        col_means = np.asarray(X.mean(axis=0)).ravel()
        means = {}
        for c, name in enumerate(feature_names):
            layer, index = _parse(name)
            means.setdefault(layer, np.zeros(saes["tuned", layer].cfg.d_sae))[index] = col_means[c]
    k = len(top_k)
    flagged = [r for r in interpretation["judged"] if r["relevant"]]
    flagged_cols = [r["column"] for r in sorted(flagged, key=lambda r: -(r["score"] or 0.0))][:k]
    random_cols = [int(i) for i in rng.choice(np.setdiff1d(np.flatnonzero(frequency > 0), top_k), k, replace=False)]
    sets = [FeatureSet(f"irm_top_{k}", as_layers(top_k), vc.ablation, means)]
    if flagged_cols:
        sets.append(FeatureSet(f"judge_flagged_{len(flagged_cols)}", as_layers(flagged_cols), vc.ablation, means))
    sets += [FeatureSet(f"random_{k} (control)", as_layers(random_cols), vc.ablation, means),
             FeatureSet("reconstruction_only (control)", {}, "reconstruction")]
    if vc.steer_alpha is not None and top_k:
        sets.append(FeatureSet(f"steer top feature x{vc.steer_alpha:g}", as_layers(top_k[:1]), "steer",
                               alpha=vc.steer_alpha))
    layer_saes = {layer: saes["tuned", layer] for layer in capture.layers}
    echo(f"ablate: {len(sets)} feature sets over {min(vc.n_prompts, len(prompts))} prompts")
    # A fresh copy: the pair's tuned model is wrapped by a TransformerBridge, whose generate() differs.
    model, _ = load_model(pair.tuned_spec, device=config.pair.device, dtype=config.pair.dtype,
                          trust_remote_code=config.pair.trust_remote_code)
    return ablation_table(model, pair.tokenizer, layer_saes, sets, rm,
                          prompts[: vc.n_prompts], samples_per_prompt=vc.samples_per_prompt,
                          max_new_tokens=vc.max_new_tokens, seed=config.seed)
