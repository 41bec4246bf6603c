"""Compare IRM views with the RM: rank, sign, error and text-level agreement, baselines, controls,
and per-feature alignment. Every rank statistic pairs values by token (SciPy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats


def paired(irm_map: dict[int, float], rm_map: dict[int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids present in both maps, with the IRM's and the RM's value for each, in id order."""
    ids = np.array(sorted(set(irm_map) & set(rm_map)), dtype=np.int64)
    return ids, np.array([irm_map[i] for i in ids], dtype=np.float64), np.array([rm_map[i] for i in ids], dtype=np.float64)


def kendall_tau(irm_values: np.ndarray, rm_values: np.ndarray) -> tuple[float, float]:
    """Kendall tau-b and its two-sided p-value between values paired by token (SciPy)."""
    if len(irm_values) != len(rm_values):
        raise ValueError("kendall_tau needs values paired by token: the two arrays differ in length")
    if len(irm_values) < 2:
        raise ValueError("kendall_tau needs at least two tokens")
    res = stats.kendalltau(irm_values, rm_values)
    return float(res.statistic), float(res.pvalue)


@dataclass(frozen=True)
class Agreement:
    """How one IRM view agrees with the RM on the tokens both value."""

    name: str
    """Which IRM view."""
    n_tokens: int
    """Lexicon tokens compared."""
    is_zero: bool
    """The IRM is identically zero: no implicit reward was learned, so no tau is reported."""
    tau: float | None = None
    p_value: float | None = None
    sign_acc_pos: float | None = None
    """Fraction of RM-positive tokens the IRM values above its neutral point."""
    sign_acc_neg: float | None = None
    """Fraction of RM-negative tokens the IRM values below its neutral point."""
    n_pos: int = 0
    n_neg: int = 0
    neutral_point: float | None = None
    """The IRM's zero: the median value over every token in its map (implicit rewards are
    defined up to a constant)."""
    note: str | None = None
    """Why no figure could be computed, when none was."""


def agreement(name: str, irm_map: dict[int, float], rm_map: dict[int, float]) -> Agreement:
    """Kendall tau (paired by token) and sign accuracy of ``irm_map`` against ``rm_map``."""
    ids, irm, rm = paired(irm_map, rm_map)
    all_values = np.array(list(irm_map.values()), dtype=np.float64)
    if len(all_values) == 0 or np.all(all_values == 0):
        return Agreement(name, len(ids), True)
    if len(ids) < 2:
        return Agreement(name, len(ids), False, note=(
            f"only {len(ids)} RM token(s) occur in the captured text: capture more text or lower "
            "irm.min_token_count"))
    center = float(np.median(all_values))
    tau, p = kendall_tau(irm, rm)
    pos, neg = rm > 0, rm < 0
    return Agreement(
        name, len(ids), False, tau, p,
        float(np.mean(irm[pos] > center)) if pos.any() else None,
        float(np.mean(irm[neg] < center)) if neg.any() else None,
        int(pos.sum()), int(neg.sum()), center,
    )


def tau_confidence_interval(irm_values: np.ndarray, rm_values: np.ndarray, *, n_resamples: int = 1000,
                            level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of Kendall tau, resampling tokens (pairs kept together; SciPy)."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    res = stats.bootstrap((irm_values, rm_values), lambda a, b: stats.kendalltau(a, b).statistic, paired=True,
                          vectorized=False, n_resamples=n_resamples, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def tau_cluster_ci(token_ids: np.ndarray, values: np.ndarray, clusters: np.ndarray, rm_map: dict[int, float],
                   tokens: np.ndarray, *, n_resamples: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile CI of Kendall tau between per-token means and RM values, resampling independent units.

    Each resample draws the clusters (prompts) with replacement; every token's mean is recomputed over
    its occurrences in the drawn clusters (a cluster drawn twice counts twice), and tau is taken over the
    ``tokens`` that occur in the resample. So the noise of a token mean built from a few correlated
    occurrences, and the variation between prompts, enter the interval; a bootstrap over token types
    (:func:`tau_confidence_interval`) holds each mean fixed and leaves both out. The fit behind
    ``values`` is not redone per resample.

    Args:
        token_ids, values, clusters: one entry per scored row (its token, its value, its prompt).
        rm_map: token -> RM value.
        tokens: the tokens the tau is taken over (those both maps hold).

    Returns:
        (low, high), or (None, None) when fewer than 2 clusters hold the tokens.
    """
    # SciPy's bootstrap resamples observations, not clusters of them; hence this loop over cluster draws.
    token_ids, clusters = np.asarray(token_ids), np.asarray(clusters)
    values = np.asarray(values, dtype=np.float64)
    if not (token_ids.shape == values.shape == clusters.shape):
        raise ValueError("token_ids, values and clusters need one entry per row")
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    units, unit_of = np.unique(clusters, return_inverse=True)
    tokens = np.asarray(tokens, dtype=np.int64)
    keep = np.isin(token_ids, tokens)
    if len(units) < 2 or len(tokens) < 2 or not keep.any():
        return None, None
    k = np.searchsorted(tokens, token_ids[keep])
    flat = k * len(units) + unit_of[keep]
    size = len(tokens) * len(units)
    sums = np.bincount(flat, weights=values[keep], minlength=size).reshape(len(tokens), len(units))
    counts = np.bincount(flat, minlength=size).reshape(len(tokens), len(units)).astype(np.float64)
    rm = np.array([rm_map[int(t)] for t in tokens], dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n_resamples).T  # units x B
    s, c = sums @ draws, counts @ draws
    taus = []
    for b in range(n_resamples):
        present = c[:, b] > 0
        if present.sum() < 2:
            continue
        means = s[present, b] / c[present, b]
        if np.all(means == means[0]) or np.all(rm[present] == rm[present][0]):
            continue
        taus.append(stats.kendalltau(means, rm[present]).statistic)
    if len(taus) < max(10, n_resamples // 2):
        return None, None
    # The spread of the resampled taus estimates the s.e.; their percentiles are not used as the interval:
    # a resample repeats prompts, so its token means are noisier and its tau more attenuated than the
    # estimate's (measured: percentile intervals covered the estimator's mean in 40-86% of simulated
    # datasets). With few units the bootstrap also underestimates the spread: the s.e. is scaled by
    # sqrt(J / (J - 1)) and the interval uses Student's t with J - 1 degrees of freedom.
    j = len(units)
    se = float(np.std(taus, ddof=1)) * float(np.sqrt(j / (j - 1)))
    total, n = sums.sum(axis=1), counts.sum(axis=1)
    tau = stats.kendalltau(total[n > 0] / n[n > 0], rm[n > 0]).statistic
    half = float(stats.t.ppf(1 - (1 - level) / 2, j - 1)) * se
    return float(tau - half), float(tau + half)


def _pct_rank(values: np.ndarray) -> np.ndarray:
    return (stats.rankdata(values) - 0.5) / len(values)


def error_vs_frequency(irm_values: np.ndarray, rm_values: np.ndarray, counts: np.ndarray) -> dict:
    """How the IRM's error depends on how often the tuned model generated the token.

    The error of a token is the gap between its percentile rank under the IRM and under the RM
    (scale-free, so IRMs in log-prob units compare with lexicon values). Returns Spearman's rho of
    error vs count (negative: frequent tokens are valued more faithfully) and the mean error in
    each count quartile (rarest first).
    """
    error = np.abs(_pct_rank(irm_values) - _pct_rank(rm_values))
    counts = np.asarray(counts, dtype=np.float64)
    if len(error) < 4 or np.all(counts == counts[0]):
        return {"rho": None, "p_value": None, "quartile_error": None}
    rho, p = stats.spearmanr(error, counts)
    # Quartiles by rank of count (ties broken by order), so tied counts still fill four bins.
    bins = np.minimum(3, (4 * (stats.rankdata(counts, method="ordinal") - 1)) // len(counts)).astype(int)
    quartiles = [float(error[bins == b].mean()) if np.any(bins == b) else None for b in range(4)]
    return {"rho": float(rho), "p_value": float(p), "quartile_error": quartiles}


def disagreements(irm_map: dict[int, float], rm_map: dict[int, float], decode, n: int = 10) -> dict:
    """The tokens IRM and RM disagree on most, each way, by percentile-rank gap.

    ``irm_over_rm``: the IRM values them far above where the RM does (what tuning rewarded beyond
    the RM); ``rm_over_irm``: the reverse. Each entry is (token, IRM value, RM value, rank gap).
    """
    ids, irm, rm = paired(irm_map, rm_map)
    if len(ids) < 2:
        return {"irm_over_rm": [], "rm_over_irm": []}
    gap = _pct_rank(irm) - _pct_rank(rm)
    order = np.argsort(-gap, kind="stable")
    row = lambda i: [decode(int(ids[i])), float(irm[i]), float(rm[i]), float(gap[i])]  # noqa: E731
    return {"irm_over_rm": [row(i) for i in order[:n] if gap[i] > 0],
            "rm_over_irm": [row(i) for i in order[::-1][:n] if gap[i] < 0]}


def text_agreement(scores: np.ndarray, rewards: np.ndarray) -> dict:
    """Kendall tau between an IRM's text scores and the RM's rewards of the same texts."""
    scores, rewards = np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if len(scores) < 3 or np.all(scores == scores[0]) or np.all(rewards == rewards[0]):
        return {"text_tau": None, "text_p": None, "n_texts": int(len(scores))}
    res = stats.kendalltau(scores, rewards)
    return {"text_tau": float(res.statistic), "text_p": float(res.pvalue), "n_texts": int(len(scores))}


def compare_view(name: str, family: str, irm_map: dict[int, float], counts: dict[int, int], rm_map: dict[int, float],
                 *, text_scores: np.ndarray | None = None, rewards: np.ndarray | None = None,
                 n_bootstrap: int = 1000, seed: int = 0, is_zero: bool = False, clusters: tuple | None = None,
                 **extra) -> dict:
    """Every token- and text-level figure of one IRM view against the RM, as one table row.

    Args:
        name: the view.
        family: ``behavioural`` (fitted without the RM), ``rm_informed`` (uses RM labels) or ``baseline``.
        irm_map: token -> IRM value.
        counts: token -> how often it occurs in the captured text (for error vs frequency).
        rm_map: token -> RM value.
        text_scores, rewards: the view's score and the RM's reward of the same held-out texts.
        n_bootstrap: resamples for the tau CI (0 skips it).
        is_zero: the view is identically zero (nothing was learned).
        clusters: ``(token_ids, values, prompts)`` of the scored rows ``irm_map`` was averaged from: the
            tau CI is then a cluster bootstrap over prompts (:func:`tau_cluster_ci`); without them it
            resamples token types (a view that is not an average over rows, e.g. the full vocabulary).
        extra: more columns (test R^2, strengths, notes).
    """
    row = asdict(agreement(name, {} if is_zero else irm_map, rm_map)) | {"family": family} | extra
    if is_zero:
        return row | {"is_zero": True}
    if row["tau"] is not None:
        ids, irm, rm = paired(irm_map, rm_map)
        if n_bootstrap and clusters is not None:
            ci = tau_cluster_ci(*clusters, rm_map, ids, n_resamples=n_bootstrap, seed=seed)
            row["tau_ci"] = None if ci[0] is None else list(ci)
            row["ci_method"] = "prompt cluster bootstrap"
            # Kept for the one-control rule, which takes the larger of the two (see analysis.verdict).
            row["tau_ci_tokens"] = list(tau_confidence_interval(irm, rm, n_resamples=n_bootstrap, seed=seed))
        elif n_bootstrap:
            row["tau_ci"] = list(tau_confidence_interval(irm, rm, n_resamples=n_bootstrap, seed=seed))
            row["ci_method"] = "token bootstrap"
        rho, p = stats.spearmanr(irm, rm)
        row["spearman"], row["spearman_p"] = float(rho), float(p)
        row["error_vs_frequency"] = error_vs_frequency(irm, rm, np.array([counts.get(int(i), 0) for i in ids]))
    if text_scores is not None and rewards is not None:
        row.update(text_agreement(text_scores, rewards))
    return row


def feature_alignment(X, coef: np.ndarray, rm_row_values: np.ndarray, token_ids: np.ndarray, decode,
                      feature_names: list[str], *, n: int = 10, n_tokens: int = 5, threshold: float = 0.1) -> dict:
    """Each feature's IRM weight next to its correlation with the RM value of the token it fires on.

    Shortlists: ``irm_not_rm`` — features the IRM rewards most while the RM does not (their
    correlation with RM value is below ``threshold``): candidate reward hacking; ``rm_not_irm`` —
    features that track RM value (correlation above ``threshold``) that the IRM gives no or
    negative weight. Each entry
    carries the tokens on which the feature fires hardest on average.
    """
    X = sp.csr_matrix(X)
    n_rows = X.shape[0]
    r = np.asarray(rm_row_values, dtype=np.float64)
    mean_x = np.asarray(X.mean(axis=0)).ravel()
    var_x = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean_x**2
    cov = np.asarray(X.T @ (r - r.mean())).ravel() / n_rows
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where((var_x > 0) & (r.std() > 0), cov / np.sqrt(np.maximum(var_x, 1e-300)) / (r.std() or 1), 0.0)
    coef = np.asarray(coef, dtype=np.float64)
    irm_not_rm = [i for i in np.argsort(-coef, kind="stable") if coef[i] > 0 and corr[i] < threshold][:n]
    rm_not_irm = [i for i in np.argsort(-corr, kind="stable") if corr[i] > threshold and coef[i] <= 0][:n]
    Xc = X.tocsc()

    def entry(i: int) -> dict:
        col = Xc[:, i]
        rows, vals = col.indices, col.data
        top = []
        if len(rows):
            tok = token_ids[rows]
            uniq, inv = np.unique(tok, return_inverse=True)
            mean = np.bincount(inv, weights=vals) / np.bincount(inv)
            top = [decode(int(uniq[j])) for j in np.argsort(-mean, kind="stable")[:n_tokens]]
        return {"feature": feature_names[i], "weight": float(coef[i]), "rm_corr": float(corr[i]),
                "frequency": float(len(rows) / n_rows), "top_tokens": top}

    return {"weights": coef.tolist(), "rm_corr": corr.tolist(), "irm_not_rm": [entry(i) for i in irm_not_rm],
            "rm_not_irm": [entry(i) for i in rm_not_irm]}


def against_control(rows: list[dict], *controls: list[dict]) -> list[dict]:
    """Put each view's figures next to the control organisms': ``control_tau`` and ``above_control``.

    With several controls ``control_tau`` is their mean, ``control_taus`` each one's, and
    ``above_control_ci`` needs the view's CI above every control's. RM-informed views get
    ``control_flag``: they decode the RM from any model's features, so they cannot tell a control
    organism from a real one.
    """
    by_name = [{r["name"]: r for r in c} for c in controls]
    out = []
    for row in rows:
        found = [c[row["name"]] for c in by_name if row["name"] in c]
        row = dict(row)
        if found:
            taus = [c["tau"] for c in found if c.get("tau") is not None]
            row |= {"control_taus": taus or None, "control_tau": float(np.mean(taus)) if taus else None,
                    "control_tau_ci": found[0].get("tau_ci"), "control_text_tau": found[0].get("text_tau"),
                    "control_is_zero": all(c.get("is_zero") for c in found)}
            if row.get("tau") is not None and taus:
                row["above_control"] = row["tau"] - row["control_tau"]
                cis = [c["tau_ci"] for c in found if c.get("tau_ci") is not None and None not in c["tau_ci"]]
                own = row.get("tau_ci")
                row["above_control_ci"] = bool(own is not None and None not in own and cis
                                               and own[0] > max(ci[1] for ci in cis))
        if row.get("family") == "rm_informed":
            row["control_flag"] = "uses RM labels: decodes the RM from any model, cannot tell a control from a real organism"
        out.append(row)
    return out


def prediction_t(value, controls) -> tuple[np.ndarray, np.ndarray]:
    """The prediction-interval t of one new draw against ``k`` exchangeable draws: the organism against its controls.

    ``t = (value - mean) / (sd * sqrt(1 + 1/k))`` over axis 0 of ``controls`` ([k] or [k, ...], ``value`` a scalar
    or [...]), two-sided ``p`` on k - 1 degrees of freedom; exact when the k + 1 draws are exchangeable normal, so
    the spread between controls (random-reward organisms of one recipe) is the test's whole null. The verdict's
    primary comparison, the named words and their null, and the calibration benchmark all test with it.

    Returns:
        (t, p) as arrays shaped like ``value``; NaN where the controls do not vary.
    Raises:
        ValueError: fewer than 2 controls (one cannot measure a spread), or ``value`` not shaped like one control.
    """
    controls = np.asarray(controls, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    k = controls.shape[0] if controls.ndim else 0
    if k < 2:
        raise ValueError(f"prediction_t needs 2 or more controls along axis 0, got {k}")
    if value.shape != controls.shape[1:]:
        raise ValueError(f"prediction_t: value {value.shape} must be shaped like one control {controls.shape[1:]}")
    diff = value - controls.mean(axis=0)
    sd = controls.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 0, diff / (sd * np.sqrt(1 + 1 / k)), np.nan)
    return t, np.asarray(2 * stats.t.sf(np.abs(t), k - 1))
