"""Explaining the features the IRM relies on: evidence, a judge's explanation and label, and the comparison
with the IRM's choice."""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

from irmprobe.models.loading import load_model
from irmprobe.validation.autointerp import (
    LLMJudge,
    LocalChat,
    OfflineJudge,
    cross_comparison,
    feature_evidence,
    judge_feature,
)

_FEATURE_NAME = re.compile(r"^L(\d+)/tuned(\d+)$")


def feature_location(name: str) -> tuple[int, int]:
    match = _FEATURE_NAME.match(name)
    if match is None:
        raise ValueError(f"validation needs tuned SAE features (irm.inputs=tuned); got feature {name!r}")
    return int(match.group(1)), int(match.group(2))


def make_judge(vc, runtime, pair, rm_map: dict, chat_client=None):
    """The judge ``vc.judge`` names (``vc``: the ``validate`` section; ``runtime``: device, dtype)."""
    kind = vc.judge
    if kind == "offline":
        return OfflineJudge(rm_map)
    if kind == "local":
        # A fresh copy: generate() on a model a TransformerBridge has wrapped samples differently.
        model, _ = load_model(pair.base_spec, device=runtime.device, dtype=runtime.dtype,
                              trust_remote_code=runtime.trust_remote_code)
        return LLMJudge(LocalChat(model, pair.tokenizer), name="local")
    return LLMJudge(chat_client, name=f"llm:{chat_client.model}")


def interpret(vc, seed: int, pair, capture, X: sp.csr_matrix, feature_names: list[str], coef: np.ndarray, saes: dict,
              rm_map: dict, streams, *, judge) -> dict:
    """Judge the IRM's top features and others, and compare the two selections.

    Args:
        X: the tuned model's SAE features at every captured row (unscaled).
        feature_names: ``L{layer}/tuned{index}`` for each column of ``X``.
        coef: the primary IRM's weight of each column.
        saes: ``{("tuned", layer): sae}``.
        streams: token ids of every captured sequence (for feature contexts).
    """
    rng = np.random.default_rng(seed)
    Xc = X.tocsc()
    frequency = np.diff(Xc.indptr) / X.shape[0]
    top_k = [int(i) for i in np.argsort(-coef, kind="stable")[: vc.top_k] if coef[i] > 0]
    by_weight = [int(i) for i in np.argsort(-np.abs(coef), kind="stable") if frequency[i] > 0 and int(i) not in top_k]
    universe = top_k + by_weight[: max(0, vc.n_judged // 2 - len(top_k))]
    firing = np.setdiff1d(np.flatnonzero(frequency > 0), universe)
    n_random = max(0, min(len(firing), vc.n_judged - len(universe)))
    universe += [int(i) for i in rng.choice(firing, n_random, replace=False)]

    unembed = pair.tuned.get_output_embeddings().weight.detach().float().cpu().numpy().T
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    judged = []
    for i in universe:
        layer, index = feature_location(feature_names[i])
        direction = saes["tuned", layer].W_dec[index].detach().float().cpu().numpy()
        ev = feature_evidence(feature_names[i], layer, index, Xc[:, i], capture.token_ids, capture.seq_index,
                              capture.position, streams, decode, direction, unembed, seed=seed + i)
        j = judge_feature(judge, ev, vc.concept, seed=seed)  # explained from shown contexts, scored on held-out
        judged.append({"feature": ev.name, "column": i, "weight": float(coef[i]), "frequency": ev.frequency,
                       "max_activation": ev.max_activation, "in_irm_top_k": i in top_k, "relevant": j.relevant,
                       "score": j.score, "explanation": j.explanation, "detection": j.detection,
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
