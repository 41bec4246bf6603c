"""Where the tuning's effect on the written token becomes readable: an out-of-fold R^2 of the log-ratio per block.

A decision-side IRM reads features at ``t-1`` and must predict ``r_t``, the log-ratio of the token then written.
Whether any view reading the captured blocks can fit ``r_t`` depends on how much of ``r_t`` those blocks' residual
stream already holds in a form the read-out sees. :func:`depth_profile` measures it for every block, from the rows
of :func:`irmprobe.activations.readout.readout_rows`: each reading (the change's direct path, the logit lens) is
cross-fitted as a one-column ridge on two halves of the prompts, and its out-of-fold R^2 gets a percentile
bootstrap interval over prompts (the independent unit).
"""

from __future__ import annotations

import numpy as np

from irmprobe.irm.crossfit import cross_fit_irm

READINGS = ("direct", "lens")
"""The readings of the residual stream :func:`depth_profile` scores (see :mod:`irmprobe.activations.readout`)."""

R2_TARGET = 0.3
"""The out-of-fold R^2 a decision-side view is asked to reach: the profile says from which block a reading does."""


def r2_ci(y: np.ndarray, predictions: np.ndarray, units: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
          level: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval of ``1 - SSE/SST`` over ``units`` (whole prompts resampled with their rows).

    Each prompt's row count, sums of ``y`` and ``y^2`` and squared error are resampled together, so every replicate
    is the R^2 of the rows of the prompts it drew (SST about the replicate's own mean). None when fewer than two
    prompts."""
    keys, inverse = np.unique(units, return_inverse=True)
    if len(keys) < 2:
        return [None, None]
    count = np.bincount(inverse).astype(np.float64)
    s1 = np.bincount(inverse, weights=y)
    s2 = np.bincount(inverse, weights=y * y)
    sse = np.bincount(inverse, weights=(y - predictions) ** 2)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    n, a, b, e = count[draw].sum(1), s1[draw].sum(1), s2[draw].sum(1), sse[draw].sum(1)
    sst = b - a * a / n
    ok = sst > 0
    values = 1.0 - e[ok] / sst[ok]
    tail = (1.0 - level) / 2
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))] if ok.any() else [None, None]


def depth_profile(rows: dict, units: np.ndarray, folds: tuple[np.ndarray, np.ndarray], *, seed: int = 0,
                  n_boot: int = 1000) -> dict:
    """Per block and reading: the out-of-fold R^2 of ``rows["r"]`` from that block's reading alone.

    Args:
        rows: :func:`irmprobe.activations.readout.readout_rows`'s output (``lens`` may be None).
        units: each row's prompt.
        folds: two disjoint halves of the row indices, whole prompts on each side.

    Returns:
        A JSON-ready dict: ``n_rows``, ``n_prompts``, ``target`` (:data:`R2_TARGET`) and per reading
        (``direct``, ``lens``) ``r2`` and ``ci`` per block and ``first_reaching`` (the first block from which
        every block's R^2 reaches the target, or None); a reading not measured is absent. The CIs resample the
        scored prompts with the two cross-fitted models held fixed (fitting noise is not in them).

    Raises:
        ValueError: row arrays of different lengths, or folds that share a prompt.
    """
    y = np.asarray(rows["r"], dtype=np.float64)
    units = np.asarray(units)
    if len(units) != len(y):
        raise ValueError(f"depth_profile: {len(units)} prompt labels for {len(y)} rows")
    a, b = (np.asarray(f) for f in folds)
    if np.intersect1d(units[a], units[b]).size:
        raise ValueError("depth_profile: the two folds share a prompt; split rows by prompt")
    out = {"n_rows": int(len(y)), "n_prompts": int(len(np.unique(units))), "target": R2_TARGET}
    for reading in READINGS:
        X = rows.get(reading)
        if X is None:
            continue
        X = np.asarray(X, dtype=np.float64)
        r2s, cis = [], []
        for block in range(X.shape[1]):
            fit = cross_fit_irm(f"{reading} {block}", X[:, [block]], y, units, folds=(a, b),
                                alphas=(1e-3, 1e-1, 10.0))
            r2s.append(None if fit.test_r2 is None else float(fit.test_r2))
            cis.append([None, None] if fit.test_r2 is None else
                       r2_ci(y, fit.predictions, units, n_boot=n_boot, seed=seed + block))
        # The first block from which every block on reaches the target (not one that dips below it again).
        reached = [v is not None and v >= R2_TARGET for v in r2s]
        first = next((i for i in range(len(reached)) if all(reached[i:])), None)
        out[reading] = {"r2": r2s, "ci": cis, "first_reaching": first}
    return out


def depth_text(profile: dict, blocks, n_layers: int | None = None) -> str:
    """One clause: what each reading explains of ``r_t`` at ``blocks`` (the captured ones; the best of them) and from
    which block on it reaches the target, e.g. "read one block at a time, the residual stream's change after
    block(s) 20, 22, 23 explains R^2 +0.09 of r_t at best through its direct path and +0.16 by the logit lens
    (...); the direct path reaches 0.3 from block 28 on (of blocks 0-29), the logit lens reaches 0.3 from block
    26 on (of blocks 0-29)"."""
    if not profile or "skipped" in profile:
        return ""
    n = n_layers or len(profile["direct"]["r2"])
    blocks = [int(b) for b in blocks]
    names = {"direct": "its direct path", "lens": "the logit lens"}
    short = {"direct": "the direct path", "lens": "the logit lens"}

    def best(reading):
        values = [profile[reading]["r2"][b] for b in blocks if profile[reading]["r2"][b] is not None]
        return max(values) if values else None

    at = [f"{best(r):+.2f}{' of r_t at best' if not i else ''} {'through ' if r == 'direct' else 'by '}{names[r]}"
          for i, r in enumerate(r for r in READINGS if r in profile and best(r) is not None)]
    reach = []
    for r in READINGS:
        if r in profile:
            first = profile[r]["first_reaching"]
            reach.append(f"{short[r]} reaches {profile['target']:g} "
                         + (f"from block {first} on (of blocks 0-{n - 1})" if first is not None else "at no block"))
    where = f"the residual stream's change after block(s) {', '.join(map(str, blocks))}"
    if not at:  # r_t does not vary (or nothing was scored): no R^2 is defined
        return f"{where}: no R^2 is defined (r_t does not vary on the held-out prompts)"
    return (f"read one block at a time, {where} explains R^2 " + " and ".join(at)
            + " (out of fold, held-out prompts; not a bound on a view with many features); " + ", ".join(reach))
