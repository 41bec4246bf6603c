"""The organism's side of the comparison: its report (reward, KL), where IRM and RM disagree on
held-out tokens, feature alignment, the token table and a PCA of the probe inputs."""

from __future__ import annotations

import numpy as np

from irmprobe.compare import disagreements, feature_alignment
from irmprobe.organisms import report_from
from irmprobe.views import probe_inputs


def organism_side(cfg, ctx, inputs) -> dict:
    """Everything of the comparison stage that reads only the organism branch."""
    from irmprobe.pipeline.stages import pair_of

    pair = pair_of(ctx, inputs["organism"])
    samples, capture, fit = inputs["samples"], inputs["capture"], inputs["fit"]
    rm_map = ctx.rm.token_values(pair.tokenizer)
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    report = report_from(samples, capture)
    X, names = probe_inputs(cfg.irm.inputs, capture.acts, inputs["saes"].saes, inputs["layers"].chosen)
    rm_rows = np.array([rm_map.get(int(t), 0.0) for t in capture.token_ids])
    alignment = None
    if cfg.irm.inputs != "raw":
        full = feature_alignment(X, fit.coef, rm_rows, capture.token_ids, decode, names, n=cfg.compare.n_alignment)
        alignment = {k: full[k] for k in ("irm_not_rm", "rm_not_irm")}
    maps = {name: fit.token_map(name) for name in fit.record.maps}
    disagree = {name: disagreements(maps[name], rm_map, decode, cfg.compare.n_disagreements)
                for name in ("sae_irm", "log_ratio (no model)") if name in maps}
    held = fit.eval_rows
    ids, counts = np.unique(capture.token_ids[held], return_counts=True)
    count = dict(zip(ids.tolist(), counts.tolist()))
    lr, sae = maps["log_ratio (no model)"], maps["sae_irm"]
    token_rows = [[decode(t), rm_map[t], count[t], lr[t], sae[t], maps.get("full_vocab_log_ratio", {}).get(t),
                   maps.get("shuffled_0", {}).get(t)]
                  for t in sorted(set(lr) & set(rm_map), key=lambda t: -count[t])]
    return {"report": report, "disagreements": disagree, "feature_alignment": alignment,
            "tokens": {"columns": ["token", "rm_value", "heldout_count", "log_ratio", "sae_irm", "full_vocab",
                                   "shuffled_0"], "rows": token_rows},
            "pca": pca(X, rm_rows, cfg.seed)}


def pca(X, rm_rows: np.ndarray, seed: int, n: int = 3000) -> dict:
    """Two principal components of a row sample of the probe inputs (scikit-learn TruncatedSVD)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import MaxAbsScaler

    if X.shape[1] < 3 or X.shape[0] < 3:
        return {}
    rows = np.random.default_rng(seed).permutation(X.shape[0])[:n]
    svd = TruncatedSVD(2, random_state=seed)
    xy = svd.fit_transform(MaxAbsScaler().fit_transform(X[rows]))
    return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "rm": rm_rows[rows].tolist(),
            "explained": svd.explained_variance_ratio_.tolist()}
