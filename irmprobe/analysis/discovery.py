"""What did the tuned model learn beyond the RM? Discovery over all tokens, and the IRM as a reward model.

Pure functions over held-out rows: :func:`discover_tokens` tests every token's behavioural IRM value
against the matched control organism (bootstrap CIs, Benjamini-Hochberg q-values); :func:`concepts`
groups discoveries through the SAE features that carry them; :func:`rm_variance_share` and
:func:`residual_top` measure how much of the IRM the RM explains; preference pairs and
:func:`pairwise_accuracy` score any scorer as a reward model. Token strings: pass ``decode``
(id -> str) where offered, or decode the ids yourself.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
from scipy import stats
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import GroupKFold, KFold

from irmprobe.analysis.agreement import prediction_t

CATEGORIES = ("rewarded_unvalued", "rewarded_against", "rewarded_valued",
              "penalised_unvalued", "penalised_against", "penalised_valued")


@dataclass(frozen=True)
class TokenDiscovery:
    """One tested token: the organism's IRM value against the control's."""

    token_id: int
    irm_value: float
    """Mean IRM value over the token's occurrences in the organism's rows (``count`` of them)."""
    ci_low: float
    ci_high: float
    """Percentile bootstrap CI of ``irm_value`` (resampling occurrences), level ``1 - alpha``."""
    count: int
    rm_value: float | None
    """The RM's value; None when the RM map does not list the token (treated as 0)."""
    control_value: float | None
    """Mean over the control's occurrences; None when the control never produced the token."""
    control_count: int
    vs_control: bool
    """False flags a token the control has < 2 occurrences of: tested against 0 (one-sample t)."""
    effect: float
    """``irm_value - control_value`` (or ``irm_value - 0`` when not ``vs_control``)."""
    p: float
    q: float
    """Benjamini-Hochberg q-value over every tested token."""
    category: str | None
    """One of :data:`CATEGORIES` when ``q < alpha``, else None."""
    token: str | None = None
    """Decoded token, when ``decode`` was given."""


@dataclass(frozen=True)
class Discovery:
    """Every token seen at least ``min_count`` times, sorted by q then |effect| (largest first)."""

    entries: tuple[TokenDiscovery, ...]
    alpha: float
    n_bootstrap: int
    n_tokens_seen: int
    """Distinct tokens in the organism's rows (tested or not)."""
    test: str = "welch_hsu"
    """``welch_hsu``: occurrences against one control, Welch t with Hsu's df = min(n1, n2) - 1
    (:func:`discover_tokens`); ``vocabulary_vs_controls``: the full-vocabulary log-ratio against K controls
    (:func:`discover_vocabulary`)."""

    @property
    def discoveries(self) -> tuple[TokenDiscovery, ...]:
        return tuple(e for e in self.entries if e.q < self.alpha)

    def category(self, name: str) -> tuple[TokenDiscovery, ...]:
        if name not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {name!r}")
        return tuple(e for e in self.entries if e.category == name)

    def counts(self) -> dict[str, int]:
        return {c: len(self.category(c)) for c in CATEGORIES}

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "n_bootstrap": self.n_bootstrap, "n_tokens_seen": self.n_tokens_seen,
                "n_tested": len(self.entries), "test": self.test, "counts": self.counts(),
                "entries": [asdict(e) for e in self.entries]}


def _token_stats(token_ids, values):
    """Per distinct token: ids, counts, means, sample SDs (ddof=1; 0 for one occurrence), and
    the values sorted by token with each token's start offset."""
    token_ids, values = np.asarray(token_ids), np.asarray(values, dtype=np.float64)
    if token_ids.shape != values.shape or token_ids.ndim != 1:
        raise ValueError(f"token_ids {token_ids.shape} and values {values.shape} must be 1-d of one length")
    order = np.argsort(token_ids, kind="stable")
    ids, starts, counts = np.unique(token_ids[order], return_index=True, return_counts=True)
    v = values[order]
    inv = np.repeat(np.arange(len(ids)), counts)
    means = np.bincount(inv, weights=v, minlength=len(ids)) / np.maximum(counts, 1)
    ss = np.bincount(inv, weights=(v - means[inv]) ** 2, minlength=len(ids))  # two-pass: no cancellation
    sds = np.sqrt(ss / np.maximum(counts - 1, 1))
    return ids, counts, means, sds, v, starts


def _bootstrap_ci(v, starts, counts, n_boot, level, rng, budget=1 << 22):
    """Percentile CI of each token's mean, resampling its occurrences; vectorised over tokens and
    resamples in chunks of about ``budget`` drawn values, so frequent tokens do not blow memory."""
    k = len(counts)
    lo, hi = np.empty(k), np.empty(k)
    chunk = np.cumsum(counts) // max(1, budget // n_boot)
    for c in np.unique(chunk):
        tok = np.flatnonzero(chunk == c)
        cnt, st = counts[tok], starts[tok]
        low = np.repeat(st, cnt)  # per drawn slot: its token's first row
        offsets = np.r_[0, np.cumsum(cnt)[:-1]]
        batch = max(1, budget // len(low))
        means = np.concatenate([
            np.add.reduceat(v[rng.integers(low, low + np.repeat(cnt, cnt), size=(min(batch, n_boot - b), len(low)))],
                            offsets, axis=1) / cnt
            for b in range(0, n_boot, batch)])
        lo[tok], hi[tok] = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def discover_tokens(token_ids, values, control_token_ids, control_values, rm_map: dict[int, float], *,
                    min_count: int = 2, n_bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0,
                    decode: Callable[[int], str] | None = None) -> Discovery:
    """Test every token the organism produced at least ``min_count`` times against the control.

    Tokens the control has fewer than 2 occurrences of get a one-sample t-test against 0 and
    ``vs_control=False``. Discoveries (``q < alpha``) are categorised by direction and RM value.

    Args:
        token_ids, values: the organism's held-out rows: token and behavioural IRM value (e.g. r_t).
        control_token_ids, control_values: the same for the matched control organism, its own rows.
        rm_map: token -> RM value; only categorises discoveries, never enters a test.
        min_count: occurrences in the organism's rows a token needs to be tested.
        n_bootstrap: resamples for each token's CI (0: the CI is the mean itself); level 1 - alpha.
        alpha: FDR level.
        decode: token id -> string for each entry; None leaves decoding to the caller.
    """
    if min_count < 2:
        raise ValueError("min_count must be at least 2: a t-test needs a variance")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ids, n, mean, sd, v, starts = _token_stats(token_ids, values)
    n_seen = len(ids)
    keep = n >= min_count
    ids, n, mean, sd, starts = ids[keep], n[keep], mean[keep], sd[keep], starts[keep]
    if len(ids) == 0:
        return Discovery((), alpha, n_bootstrap, n_seen)
    c_ids, c_n, c_mean, c_sd, _, _ = _token_stats(control_token_ids, control_values)
    pos = np.searchsorted(c_ids, ids)
    hit = np.r_[c_ids, -1][pos] == ids
    idx = np.where(hit, pos, len(c_ids))  # absent tokens read the appended 0
    cn, cmean, csd = (np.r_[a, 0][idx] for a in (c_n, c_mean, c_sd))
    vs_control = cn >= 2

    # Welch's t (scipy.stats.ttest_ind(equal_var=False), here from per-token stats so it vectorises),
    # not a permutation test: organism and control differ in counts and spread, and a permutation
    # p-value cannot go below 1/(n_perm+1), which BH over thousands of tokens never passes. The df is
    # Hsu's conservative min(n1, n2) - 1: with 2-3 occurrences a sample SD is often tiny by chance,
    # Satterthwaite's df stays large, and the null was rejected far above alpha after BH.
    effect = mean - np.where(vs_control, cmean, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = stats.ttest_ind_from_stats(mean, sd, n, cmean, csd, np.maximum(cn, 2), equal_var=False).statistic
        welch = 2 * stats.t.sf(np.abs(t), df=np.minimum(n, np.maximum(cn, 2)) - 1)
        se1 = sd / np.sqrt(n)
        one = 2 * stats.t.sf(np.abs(mean) / se1, df=n - 1)  # one-sample t-test against 0
    p = np.where(vs_control, welch, one)
    # No spread at all (a null organism's log-ratio is exactly 0): the difference is exact.
    se = np.where(vs_control, np.sqrt(sd**2 / n + csd**2 / np.maximum(cn, 1)), se1)
    p = np.where(se == 0, np.where(effect == 0, 1.0, 0.0), p)
    p = np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)
    q = stats.false_discovery_control(p, method="bh")

    lo, hi = (_bootstrap_ci(v, starts, n, n_bootstrap, 1 - alpha, np.random.default_rng(seed))
              if n_bootstrap > 0 else (mean, mean))
    entries = []
    for i in np.lexsort((-np.abs(effect), q)):
        t = int(ids[i])
        rm = rm_map.get(t)
        entries.append(TokenDiscovery(
            t, float(mean[i]), float(lo[i]), float(hi[i]), int(n[i]), None if rm is None else float(rm),
            float(cmean[i]) if cn[i] > 0 else None, int(cn[i]), bool(vs_control[i]), float(effect[i]),
            float(p[i]), float(q[i]), _category(effect[i], rm) if q[i] < alpha else None,
            decode(t) if decode is not None else None))
    return Discovery(tuple(entries), alpha, n_bootstrap, n_seen)


def _robust_scale(x: np.ndarray) -> float:
    """The normal-consistent median absolute deviation (scipy.stats.median_abs_deviation, scale "normal")."""
    return float(stats.median_abs_deviation(x, scale="normal"))


def _t_tail(null: np.ndarray) -> tuple[float, float]:
    """(d.f., scale) of a centred Student t fitted to ``null`` by maximum likelihood over a grid of d.f., the
    scale tied to the sample's median absolute value (scipy.stats.t.fit does the same search freely, at about
    50 times the cost, which matters with 20 strata per run and many runs per benchmark)."""
    from scipy.special import gammaln

    dfs = np.geomspace(1.0, 300.0, 48)
    scales = np.median(np.abs(null)) / stats.t.ppf(0.75, dfs)
    z2 = (null[None, :] / scales[:, None]) ** 2
    loglik = len(null) * (gammaln((dfs + 1) / 2) - gammaln(dfs / 2) - 0.5 * np.log(dfs * np.pi) - np.log(scales)) \
        - ((dfs + 1) / 2 * np.log1p(z2 / dfs[:, None]).sum(axis=1))  # Student t log-density, summed
    best = int(np.argmax(loglik))
    return float(dfs[best]), float(scales[best])


def _stratified(organism, controls, tokens, strata, n_strata: int, alpha: float, caller: str):
    """``(ids, organism[ids], controls[:, ids], stratum of each)``: the tokens to test (default every id) with a
    finite value in every organism, in strata of equal size by ``strata`` (default one stratum).

    Raises:
        ValueError: ``controls`` not [K, V] with K >= 2 like the organism's [V], or alpha outside (0, 1).
    """
    organism = np.asarray(organism, dtype=np.float64)
    controls = np.atleast_2d(np.asarray(controls, dtype=np.float64))
    if controls.shape[1] != organism.shape[0]:
        raise ValueError(f"controls {controls.shape} must be [K, {organism.shape[0]}] like the organism's vector")
    if controls.shape[0] < 2:
        raise ValueError(f"{caller} needs at least 2 control organisms (their spread), got {controls.shape[0]}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ids = np.arange(len(organism)) if tokens is None else np.asarray(tokens, dtype=np.int64)
    o, c = organism[ids], controls[:, ids]
    ok = np.isfinite(o) & np.isfinite(c).all(axis=0)
    ids, o, c = ids[ok], o[ok], c[:, ok]
    key = np.zeros(len(ids)) if strata is None else np.asarray(strata, dtype=np.float64)[ids]
    n_strata = max(1, min(n_strata, len(ids) // 200))  # a t fit wants a few hundred null values per stratum
    edges = np.unique(np.quantile(key, np.linspace(0, 1, n_strata + 1)[1:-1])) if n_strata > 1 else []
    return ids, o, c, np.searchsorted(edges, key, side="right")


def discover_vocabulary(organism: np.ndarray, controls: np.ndarray, rm_map: dict[int, float], *,
                        tokens: np.ndarray | None = None, strata: np.ndarray | None = None, n_strata: int = 20,
                        alpha: float = 0.05, decode: Callable[[int], str] | None = None) -> Discovery:
    """Test every vocabulary token's full-vocabulary log-ratio against K >= 2 control organisms.

    The evidence for token v is the organism's mean change in log-probability of v over every held-out
    context (``organism[v]``, not only where v was written) and the same figure of each control organism
    (``controls[:, v]``, each on its own contexts); the unit of replication is the organism, so clustering
    of occurrences within prompts does not enter. The test, within strata of tokens of similar base
    log-probability (``strata``; rarer tokens move more):

    1. Only relative changes are identified (a log-ratio carries each context's change of normaliser, the
       same for every token), so each organism's median in the stratum is removed.
    2. The organism's deviation ``o - median(controls)`` (the median: one control's outlier must not make
       a discovery) is standardised by its own robust scale in the stratum, so an organism that simply
       moved more than the controls does not flood the list: a discovery is a token that stands out of the
       organism's own change.
    3. The null distribution of that standardised deviation is the controls' own: each control against the
       median of the others, standardised the same way, pooled over the K controls and the stratum's tokens,
       with a Student t fitted to it (maximum likelihood, centre 0) for the tail the pooled sample cannot
       reach. A per-token t on K - 1 d.f. would be exact but has no power with K of 3-5, and pooling the
       per-token variances (limma's moderation) is invalid here: the organisms' changes are correlated
       across tokens (0.3-0.9 between controls), so thousands of tokens do not replicate the
       between-organism spread.
    4. Benjamini-Hochberg, separately over the tokens the RM values at zero (the discoveries beyond the RM)
       and over those it values: two families, never mixed.

    Args:
        organism: [V] the organism's full-vocabulary log-ratio; controls: [K, V] the controls'.
        rm_map: token -> RM value (absent or 0: unvalued); it only sorts tokens into families and categories.
        tokens: the token ids to test (default: every id); strata: [V] a number per token to stratify by
            (e.g. the base model's mean log-probability; default: one stratum).
        alpha: FDR level, within each family.
    Returns:
        A :class:`Discovery` (``test`` ``vocabulary_vs_controls``): ``irm_value`` is the organism's value and
        ``control_value`` the controls' median (both relative to their stratum's median), ``effect`` their
        difference, ``control_count`` K, ``ci_low/high`` the range of organism values the test would not
        call at level alpha (before FDR), ``count`` the stratum's size.
    """
    ids, o, c, stratum = _stratified(organism, controls, tokens, strata, n_strata, alpha, "discover_vocabulary")
    k = c.shape[0]
    centre = np.empty(len(ids))
    effect, p, half, size = (np.zeros(len(ids)) for _ in range(4))
    for b in np.unique(stratum):
        rows = np.flatnonzero(stratum == b)
        ob = o[rows] - np.median(o[rows])
        cb = c[:, rows] - np.median(c[:, rows], axis=1, keepdims=True)
        med = np.median(cb, axis=0)
        dev = ob - med
        null = []
        for j in range(k):
            loo = cb[j] - np.median(np.delete(cb, j, axis=0), axis=0)
            scale_j = _robust_scale(loo)
            if scale_j > 0:
                null.append(loo / scale_j)
        scale = _robust_scale(dev)
        if not null or scale == 0:
            p[rows] = np.where(dev == 0, 1.0, 0.0)
            effect[rows], centre[rows] = dev, med
            continue
        df, spread = _t_tail(np.concatenate(null))
        p[rows] = 2 * stats.t.sf(np.abs(dev / scale), df, scale=spread)
        half[rows] = stats.t.isf(alpha / 2, df, scale=spread) * scale
        effect[rows], centre[rows], size[rows] = dev, med, len(rows)
        o[rows] = ob
    p = np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)
    valued = np.array([bool(rm_map.get(int(t), 0.0)) for t in ids], dtype=bool)
    q = np.ones(len(ids))
    for family in (~valued, valued):
        if family.any():
            q[family] = stats.false_discovery_control(p[family], method="bh")
    entries = []
    # Discoveries first, largest effect first (what the report names is ranked by effect); then the rest by q.
    for i in np.lexsort((np.where(q < alpha, 0.0, q), -np.abs(effect) * (q < alpha), q >= alpha)):
        t_id = int(ids[i])
        rm = rm_map.get(t_id)
        entries.append(TokenDiscovery(
            t_id, float(o[i]), float(centre[i] - half[i]), float(centre[i] + half[i]), int(size[i]),
            None if rm is None else float(rm), float(centre[i]), k, True, float(effect[i]), float(p[i]),
            float(q[i]), _category(effect[i], rm) if q[i] < alpha else None,
            decode(t_id) if decode is not None else None))
    return Discovery(tuple(entries), alpha, 0, len(ids), test="vocabulary_vs_controls")


def load_word_list(path) -> list[str]:
    """Words, one per line (a tab-separated line's first field; blank lines and ``#`` comments skipped), in order,
    each once.

    Raises:
        ValueError: the file does not exist or lists no word.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"word list {path} does not exist: give a text file with one word per line")
    words = [line.split("\t")[0].strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ValueError(f"word list {path} lists no word: one word per line (a tab-separated line's first field)")
    return words


def named_family(discovery: Discovery, token_ids, *, alpha: float | None = None) -> dict:
    """Named tokens as a family of their own: the p-values ``discovery`` gave them, Benjamini-Hochberg over them only.

    A list fixed before looking (the words a user suspects the tuning rewarded) is a smaller family than the open
    search's every word token, so the same evidence passes more often; it is a second family beside the open
    search's, each with its own false-discovery rate. Tokens ``discovery`` did not test (not in its tokens, or
    non-finite) are listed apart.

    The p-values are calibrated for a typical token of each base-probability stratum (the null is pooled over the
    stratum); words chosen together often move together in every organism, so a list can pass more often than
    ``alpha`` under the null. The discover stage judges a list by :func:`named_vocabulary` instead; this family
    measures what multiplicity alone costs (``benchmarks/calibration.py``).

    Returns:
        ``{"alpha", "n", "passed", "entries": [{token_id, token, effect, p, q, rm_value, direction, category}],
        "untested"}``: ``entries`` in the order of ``token_ids``, ``q`` within the family, ``direction``
        ``rewarded`` or ``penalised`` and ``category`` (one of :data:`CATEGORIES`: beyond the RM or not) where
        ``q < alpha``, else None; ``passed`` counts them.
    """
    alpha = discovery.alpha if alpha is None else alpha
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    by_id = {e.token_id: e for e in discovery.entries}
    ids = list(dict.fromkeys(int(t) for t in token_ids))
    tested = [by_id[t] for t in ids if t in by_id]
    q = stats.false_discovery_control([e.p for e in tested], method="bh") if tested else np.zeros(0)
    entries = [{"token_id": e.token_id, "token": e.token, "effect": e.effect, "p": e.p, "q": float(qi),
                "rm_value": e.rm_value,
                "direction": ("rewarded" if e.effect > 0 else "penalised") if qi < alpha else None,
                "category": _category(e.effect, e.rm_value) if qi < alpha else None}
               for e, qi in zip(tested, q)]
    return {"alpha": alpha, "n": len(entries), "passed": sum(e["direction"] is not None for e in entries),
            "entries": entries, "untested": [t for t in ids if t not in by_id]}


def stratum_z(organism: np.ndarray, controls: np.ndarray, stratum: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each organism's values centred by its median in each stratum and divided by its own robust spread there, the
    organism ([V]) and every control ([K, V]) alike: ``(z of the organism, z of the controls, the organism's spread
    per token)``; NaN in a stratum where an organism's spread is 0. (A spread against the others would compare the
    organism with K controls and each control with K - 1: unequal null variances.)"""
    k, v = controls.shape
    z_o, z_c, scale_o = np.full(v, np.nan), np.full((k, v), np.nan), np.full(v, np.nan)
    for b in np.unique(stratum):
        rows = np.flatnonzero(stratum == b)
        for j, x in enumerate(np.vstack([organism[rows], controls[:, rows]])):
            x = x - np.median(x)
            scale = _robust_scale(x)
            if scale > 0:
                (z_o if j == 0 else z_c[j - 1])[rows] = x / scale
                if j == 0:
                    scale_o[rows] = scale
    return z_o, z_c, scale_o


def _word_null(z_c: np.ndarray) -> np.ndarray:
    """The controls' own per-word p-values, sorted: each control's value of every token against the other K - 1
    controls' by the prediction t (K - 2 d.f.), the null that :func:`named_vocabulary` calibrates a word's p-value
    by. Random-reward organisms now and then move a single token far, so these p-values are not uniform in their
    tail; the share of them at or below a nominal p is that p's rate under the null (needs K >= 3)."""
    out = []
    for j in range(z_c.shape[0]):
        rest = np.delete(z_c, j, axis=0)
        ok = rest.std(axis=0, ddof=1) > 1e-9
        out.append(prediction_t(z_c[j, ok], rest[:, ok])[1])
    return np.sort(np.concatenate(out))


def named_vocabulary(organism: np.ndarray, controls: np.ndarray, named_ids, rm_map: dict[int, float], *,
                     tokens: np.ndarray | None = None, strata: np.ndarray | None = None, n_strata: int = 20,
                     alpha: float = 0.05, decode: Callable[[int], str] | None = None) -> dict:
    """Named tokens against the controls' values of the same tokens: the list as one set, then its words.

    Words chosen together (common nouns, a theme) often move together in every organism, tuned for a reward or not,
    and differ in how much they move; a null pooled over a stratum's typical token (:func:`discover_vocabulary`,
    :func:`named_family`) or over the listed words passes such a list far more often than alpha. Here each word is
    its own null, and the unit of replication is the organism:

    1. Each organism's full-vocabulary log-ratio is centred by its median in each base-probability stratum (the
       strata of :func:`discover_vocabulary`) and divided by its own robust spread there, the organism and every
       control alike, so an organism that moved more everywhere does not pass the list for that alone; call the
       result z.
    2. The list as one set, the decision: the organism's mean z over the words against each control's, a
       prediction t on K - 1 d.f., ``(mean - controls' mean) / (sd * sqrt(1 + 1/K))``, exact when the K + 1
       organisms' means are exchangeable normal draws, whatever the words' correlation (a mean over the words is
       near normal even where single words are not).
    3. Each word, only within a list that passes at ``alpha`` (a gate): the organism's z against the K controls' z
       of the same word, the same prediction t, two-sided; its nominal p-value is calibrated by the controls' own
       (with K >= 3: each control against the other K - 1 on every tested token, :func:`_word_null`), then
       Benjamini-Hochberg over the list. The nominal t is exact only for normal draws, and random-reward organisms
       move single words far now and then (on the calibration's six null organisms, one moved ` school` to t +16.5
       on 4 d.f. against the other five): ungated and uncalibrated it named words on 2 of 6 null organisms. The
       gate bounds a null list's passes by its set's. The calibration lowers the named words' false-discovery rate
       when some words truly moved and single tokens move heavy-tailed (simulated, six controls: 0.047 against 0.089
       nominal), but only partly: the controls' p-values are on K - 2 d.f. and the organism's on K - 1, so under
       heavy tails the null's tail is lighter than the organism's, and with 3 controls (a null on 1 d.f.) it
       corrects almost nothing. Pooling the words' spreads instead would give d.f. but runs above its level when
       the words' spreads differ or they move together along more than one direction (15-55% of simulated null
       lists).

    Also returned: ``shared_share``, the part of the controls' per-word variance the words share within a control
    (a control x word layout: 0 when the words move independently, near 1 when they move as one), a diagnostic.
    Tokens not in ``tokens``, without finite values or whose controls do not vary are listed apart (untested).

    Args:
        organism: [V] the organism's full-vocabulary log-ratio; controls: [K, V] the controls' (K >= 2).
        named_ids: the listed token ids (repeats dropped, order kept).
        rm_map, tokens, strata, n_strata, decode: as :func:`discover_vocabulary` (tokens and strata define the
            strata and each organism's spread; the test reads only the listed tokens).
    Returns:
        ``{"alpha", "n", "passed", "test": "list_vs_controls", "df", "word_null", "shared_share", "set": {"effect",
        "t", "df", "p", "passed"}, "entries": [{token_id, token, effect, z, t, p, q, rm_value, direction, category}],
        "untested"}``: ``p`` the calibrated p-value (nominal with 2 controls), ``word_null`` how many p-values
        calibrate it (None with 2 controls),
        ``z`` the organism's z minus the controls' mean, ``effect`` the same in the organism's nats (z times its
        spread in the word's stratum), ``set`` the list's mean ``z``, its t and whether it ``passed`` (p <= alpha);
        ``direction`` and ``category`` as :func:`named_family`, where the set passed and ``q < alpha``.
    Raises:
        ValueError: fewer than 2 controls, mismatched shapes, or alpha outside (0, 1).
    """
    ids, o, c, stratum = _stratified(organism, controls, tokens, strata, n_strata, alpha, "named_vocabulary")
    k = c.shape[0]
    z_o, z_c, scale_o = stratum_z(o, c, stratum)
    sd = z_c.std(axis=0, ddof=1)
    usable = np.isfinite(z_o) & np.isfinite(z_c).all(axis=0) & (sd > 1e-9)  # controls that do not vary test nothing
    where = {int(t): i for i, t in enumerate(ids)}
    listed = list(dict.fromkeys(int(t) for t in named_ids))
    cols = [where[t] for t in listed if t in where and usable[where[t]]]
    tested = [int(ids[i]) for i in cols]
    done = set(tested)
    out = {"alpha": alpha, "n": len(cols), "passed": 0, "test": "list_vs_controls", "df": k - 1,
           "word_null": None, "shared_share": None, "set": None, "entries": [],
           "untested": [t for t in listed if t not in done]}
    if not cols:
        return out
    zc, zo = z_c[:, cols], z_o[cols]
    n = len(cols)
    z = zo - zc.mean(axis=0)
    t, p = prediction_t(zo, zc)
    null = _word_null(z_c[:, usable]) if k >= 3 else None
    if null is not None:  # each nominal p as the share of the controls' own nominal p-values at or below it
        p = (1 + np.searchsorted(null, p, side="right")) / (1 + len(null))
        out["word_null"] = len(null)
    q = stats.false_discovery_control(p, method="bh")
    lists = zc.mean(axis=1)  # each control's mean over the listed words
    set_t, set_p = float("nan"), None
    if lists.std(ddof=1) > 1e-9:
        set_t, set_p = (float(x) for x in prediction_t(zo.mean(), lists))
    gate = set_p is not None and set_p <= alpha
    entries = []
    for i, tid in enumerate(tested):
        rm = rm_map.get(tid)
        passed = bool(gate and q[i] < alpha)
        entries.append({"token_id": tid, "token": decode(tid) if decode is not None else None,
                        "effect": float(z[i] * scale_o[cols[i]]), "z": float(z[i]), "t": float(t[i]),
                        "p": float(p[i]), "q": float(q[i]), "rm_value": None if rm is None else float(rm),
                        "direction": ("rewarded" if z[i] > 0 else "penalised") if passed else None,
                        "category": _category(z[i], rm) if passed else None})
    if n > 1:  # a control x word layout: the words' shift within each control against each word's own deviations
        resid = zc - zc.mean(axis=0)
        shift = resid.mean(axis=1)
        ms_shared = n * float(np.sum(shift ** 2)) / (k - 1)
        ms_word = float(np.sum((resid - shift[:, None]) ** 2)) / ((k - 1) * (n - 1))
        share = max(0.0, ms_shared - ms_word) / n
        out["shared_share"] = float(share / (share + ms_word)) if share + ms_word > 0 else None
    out |= {"passed": sum(e["direction"] is not None for e in entries),
            "set": {"effect": float(z.mean()), "t": set_t, "df": k - 1, "p": set_p, "passed": gate},
            "entries": entries}
    return out


def _category(effect: float, rm: float | None) -> str:
    """rewarded/penalised (IRM above/below control) x unvalued (RM 0 or absent)/against/valued."""
    direction = "rewarded" if effect > 0 else "penalised"
    return f"{direction}_{'unvalued' if not rm else 'valued' if (rm > 0) == (effect > 0) else 'against'}"


@dataclass(frozen=True)
class Concept:
    """An SAE feature the IRM weights but the RM does not track, with the discovered tokens it carries."""

    feature: str
    weight: float
    """The IRM's weight on the feature (positive: a rewarded concept)."""
    rm_corr: float
    """Pearson correlation of the feature with the RM value of the row's token."""
    tokens: tuple[int, ...]
    """Discovered tokens (same direction as ``weight``) the feature fires on most, strongest first."""
    min_q: float
    """Smallest q-value among ``tokens``."""
    activation: tuple[float, ...] = ()
    """The feature's mean activation over each token's occurrences (zeros included)."""
    labels: tuple[str | None, ...] = ()
    """Decoded tokens, when the discovery was decoded."""

    def to_dict(self) -> dict:
        return asdict(self)


def feature_rm_corr(X: sp.csr_matrix, r: np.ndarray) -> np.ndarray:
    """Pearson correlation of each (sparse) column with ``r``, 0 where either is constant."""
    mean_x = np.asarray(X.mean(axis=0)).ravel()
    var_x = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean_x**2
    cov = np.asarray(X.T @ (r - r.mean())).ravel() / X.shape[0]
    denom = np.sqrt(np.maximum(var_x, 0)) * r.std()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 1e-12, cov / denom, 0.0)


def concepts(discovery: Discovery, X, coef, token_ids, rm_row_values, feature_names, *, n: int = 5,
             n_tokens: int = 5, max_rm_corr: float = 0.1, categories=None) -> list[Concept]:
    """Group discovered tokens into concepts through the SAE features that carry them.

    Candidate features have ``|corr(feature, RM row value)| < max_rm_corr``; the ``n`` with the
    largest positive IRM weight and the ``n`` with the most negative are kept if they fire on at
    least one discovery of their direction (rewarded for positive weight, penalised for negative).

    Args:
        X: SAE features at rows (scipy.sparse, rows x features); ``coef``: the IRM's weight on each.
        token_ids, rm_row_values: the token at each row of ``X`` and its RM value (0 where none).
        categories: only discoveries of these categories (default: every discovery).
    Returns:
        Positive-weight concepts (largest weight first), then negative-weight ones.
    """
    X = sp.csr_matrix(X, dtype=np.float64)
    coef, token_ids = np.asarray(coef, dtype=np.float64), np.asarray(token_ids)
    if X.shape[1] != len(coef) or X.shape[1] != len(feature_names) or X.shape[0] != len(token_ids):
        raise ValueError(f"X {X.shape}, coef ({len(coef)}), feature_names ({len(feature_names)}) and "
                         f"token_ids ({len(token_ids)}) do not match")
    found = [e for e in discovery.discoveries if categories is None or e.category in categories]
    if not found:
        return []
    corr = feature_rm_corr(X, np.asarray(rm_row_values, dtype=np.float64))
    # Mean activation of every feature over each discovered token's occurrences: one sparse product.
    disc_ids = np.array([e.token_id for e in found])
    order = np.argsort(disc_ids)
    j = order[np.minimum(np.searchsorted(disc_ids, token_ids, sorter=order), len(order) - 1)]
    rows = np.flatnonzero(disc_ids[j] == token_ids)
    row_tok = j[rows]
    occ = np.bincount(row_tok, minlength=len(found))
    T = sp.csr_matrix((1.0 / occ[row_tok], (row_tok, rows)), shape=(len(found), X.shape[0]))
    M = (T @ X).toarray()  # discovered tokens x features
    sign = np.sign([e.effect for e in found])
    candidates = np.flatnonzero((np.abs(corr) < max_rm_corr) & (coef != 0))
    out = []
    for s in (1.0, -1.0):
        kept = 0
        for f in candidates[np.argsort(-s * coef[candidates], kind="stable")]:
            if kept == n or np.sign(coef[f]) != s:
                break
            act = np.where(sign == s, M[:, f], 0.0)
            top = [k for k in np.argsort(-act, kind="stable")[:n_tokens] if act[k] > 0]
            if not top:
                continue
            kept += 1
            out.append(Concept(str(feature_names[f]), float(coef[f]), float(corr[f]),
                               tuple(found[k].token_id for k in top), min(found[k].q for k in top),
                               tuple(float(act[k]) for k in top), tuple(found[k].token for k in top)))
    return out


def _crossfit(irm, rm, groups, seed):
    """Out-of-fold predictions of ``irm`` from ``rm``: linear, increasing and decreasing isotonic."""
    folds = (GroupKFold(2).split(irm, groups=groups) if groups is not None
             else KFold(2, shuffle=True, random_state=seed).split(irm))
    pred = {k: np.empty_like(irm) for k in ("linear", "increasing", "decreasing")}
    for tr, te in folds:
        if np.ptp(rm[tr]) == 0:
            for k in pred:
                pred[k][te] = irm[tr].mean()
            continue
        slope, icpt = np.polyfit(rm[tr], irm[tr], 1)
        pred["linear"][te] = slope * rm[te] + icpt
        for k in ("increasing", "decreasing"):
            iso = IsotonicRegression(increasing=k == "increasing", out_of_bounds="clip")
            pred[k][te] = iso.fit(rm[tr], irm[tr]).predict(rm[te])
    return pred


def _shares(irm, rm, groups, seed):
    irm, rm = np.asarray(irm, dtype=np.float64), np.asarray(rm, dtype=np.float64)
    if irm.shape != rm.shape or irm.ndim != 1 or len(irm) < 4:
        raise ValueError(f"irm_values {irm.shape} and rm_values {rm.shape} must be 1-d, one length, >= 4 values")
    if groups is not None and len(np.unique(groups)) < 2:
        raise ValueError("rm_variance_share needs at least 2 groups")
    pred = _crossfit(irm, rm, None if groups is None else np.asarray(groups), seed)
    sst = float(np.sum((irm - irm.mean()) ** 2))
    r2 = {k: (1 - float(np.sum((irm - p) ** 2)) / sst if sst > 0 else None) for k, p in pred.items()}
    return irm, rm, pred, r2


def rm_variance_share(irm_values, rm_values, *, groups=None, seed: int = 0) -> dict:
    """Share of the IRM's variance that a linear or a monotone function of the RM value explains.

    Both are fitted on one half and scored on the other (2 folds, by ``groups`` -- the prompts, for
    captured rows -- when given), so neither is flattered in-sample; out-of-fold R^2 below 0 is reported as 0.
    The monotone fit is isotonic regression, increasing and decreasing, whichever explains more.

    Returns ``linear``, ``monotone`` (shares in [0, 1]; None for a constant IRM), ``direction`` of
    the better monotone fit, ``residual_share`` = 1 - max(linear, monotone), ``n``.
    """
    irm, _, _, r2 = _shares(irm_values, rm_values, groups, seed)
    if r2["linear"] is None:
        return {"linear": None, "monotone": None, "direction": None, "residual_share": None, "n": len(irm),
                "note": "the IRM is constant: no variance to explain"}
    direction = "increasing" if r2["increasing"] >= r2["decreasing"] else "decreasing"
    lin, mono = max(0.0, r2["linear"]), max(0.0, r2[direction])
    return {"linear": lin, "monotone": mono, "direction": direction, "residual_share": 1 - max(lin, mono),
            "n": len(irm)}


def residual_top(token_ids, irm_values, rm_values, n: int = 10, *, min_count: int = 1, groups=None,
                 seed: int = 0, decode: Callable[[int], str] | None = None) -> dict:
    """Tokens whose IRM value the RM explains least: mean residual of the better cross-fitted
    monotone fit (as in :func:`rm_variance_share`) over each token's occurrences.

    Returns ``irm_over_rm`` (largest positive residual first) and ``rm_over_irm`` (most negative
    first); each entry has token_id, token (None without ``decode``), residual, irm, rm, count.
    """
    irm, rm, pred, r2 = _shares(irm_values, rm_values, groups, seed)
    better = pred["increasing"] if (r2["increasing"] or 0) >= (r2["decreasing"] or 0) else pred["decreasing"]
    ids, counts, res = _token_stats(token_ids, irm - better)[:3]
    irm_mean, rm_mean = _token_stats(token_ids, irm)[2], _token_stats(token_ids, rm)[2]
    keep = np.flatnonzero(counts >= min_count)
    row = lambda i: {"token_id": int(ids[i]), "token": decode(int(ids[i])) if decode else None,  # noqa: E731
                     "residual": float(res[i]), "irm": float(irm_mean[i]), "rm": float(rm_mean[i]),
                     "count": int(counts[i])}
    up = keep[np.argsort(-res[keep], kind="stable")]
    return {"irm_over_rm": [row(i) for i in up[:n] if res[i] > 0],
            "rm_over_irm": [row(i) for i in up[::-1][:n] if res[i] < 0]}


@dataclass(frozen=True)
class PreferencePairs:
    """(prompt, chosen, rejected) triples, from a file or from ranked generations."""

    prompts: tuple[str, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    source: str
    """The file, or ``generations``."""
    chosen_index: tuple[int, ...] | None = None
    rejected_index: tuple[int, ...] | None = None
    """Indices into the generations (for scorers of captured rows); None for file pairs."""

    def __len__(self) -> int:
        return len(self.chosen)

    def to_dict(self) -> dict:
        return asdict(self)


_COLUMNS = ("prompt", "chosen", "rejected")


def _check_record(record, where: str) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(_COLUMNS)}, got {type(record).__name__}")
    if missing := [c for c in _COLUMNS if record.get(c) is None]:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)} (need {', '.join(_COLUMNS)})")
    if bad := [c for c in _COLUMNS if not isinstance(record[c], str)]:
        raise ValueError(f"{where}: column(s) {', '.join(bad)} must be text, not a list or number")
    return record["prompt"], record["chosen"], record["rejected"]


def load_preference_file(path) -> PreferencePairs:
    """Read preference pairs from .jsonl (one object a line) or .csv with columns prompt, chosen,
    rejected (the RewardBench layout; other columns are ignored).

    Raises:
        ValueError: naming the file and line, for bad JSON, missing columns or non-text values.
    """
    path = Path(path)
    records = []
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in ((i, ln) for i, ln in enumerate(fh, 1) if ln.strip()):
                try:
                    records.append(_check_record(json.loads(line), f"{path}:{lineno}"))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    elif path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if missing := [c for c in _COLUMNS if c not in (reader.fieldnames or [])]:
                raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)} (need {', '.join(_COLUMNS)})")
            for rec in reader:
                if None in rec:
                    raise ValueError(f"{path}:{reader.line_num}: more fields than the header has columns")
                records.append(_check_record(rec, f"{path}:{reader.line_num}"))
    else:
        raise ValueError(f"{path}: preference pairs must be .jsonl or .csv")
    if not records:
        raise ValueError(f"{path}: no preference pairs")
    prompts, chosen, rejected = zip(*records)
    return PreferencePairs(prompts, chosen, rejected, str(path))


def pairs_from_generations(prompts, texts, rewards, prompt_index) -> PreferencePairs:
    """For each prompt, its highest- vs lowest-reward continuation (prompts whose best and worst tie,
    or with one continuation, are skipped). ``prompt_index[i]`` indexes ``prompts`` for ``texts[i]``."""
    rewards, prompt_index = np.asarray(rewards, dtype=np.float64), np.asarray(prompt_index)
    if not len(texts) == len(rewards) == len(prompt_index):
        raise ValueError(f"texts ({len(texts)}), rewards ({len(rewards)}) and prompt_index "
                         f"({len(prompt_index)}) differ in length")
    hi, lo = [], []
    for p in np.unique(prompt_index):
        rows = np.flatnonzero(prompt_index == p)
        best, worst = rows[np.argmax(rewards[rows])], rows[np.argmin(rewards[rows])]
        if rewards[best] > rewards[worst]:
            hi.append(int(best))
            lo.append(int(worst))
    return PreferencePairs(tuple(prompts[prompt_index[i]] for i in hi), tuple(texts[i] for i in hi),
                           tuple(texts[i] for i in lo), "generations", tuple(hi), tuple(lo))


def _wilson(successes: float, n: int, level: float = 0.95) -> list[float]:
    z = stats.norm.ppf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def _outcomes(a, b, what: str) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{what}: the two score arrays must be 1-d of one length, got {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def pairwise_accuracy(chosen_scores, rejected_scores, *, seed: int = 0, n_bootstrap: int = 0,
                      level: float = 0.95) -> dict:
    """Fraction of pairs where the scorer ranks chosen above rejected (ties count half), with a CI.

    The CI is Wilson's score interval by default (deterministic, and sensible at 0% or 100%, where
    a percentile bootstrap collapses to a point); ``n_bootstrap > 0`` gives a percentile bootstrap
    over pairs instead. Returns accuracy, ci, ci_method, n, n_ties (None figures for no pairs).
    """
    out = _outcomes(chosen_scores, rejected_scores, "pairwise_accuracy")
    n = len(out)
    if n == 0:
        return {"accuracy": None, "ci": None, "ci_method": None, "n": 0, "n_ties": 0}
    if n_bootstrap > 0:
        boot = out[np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))].mean(axis=1)
        ci = [float(c) for c in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])]
    return {"accuracy": float(out.mean()), "ci": ci if n_bootstrap > 0 else _wilson(float(out.sum()), n, level),
            "ci_method": "bootstrap" if n_bootstrap > 0 else "wilson", "n": n, "n_ties": int(np.sum(out == 0.5))}


def agreement_with_rm(scorer_chosen, scorer_rejected, rm_chosen, rm_rejected) -> dict:
    """How often a scorer prefers the same member of each pair as the RM does (Wilson 95% CI).
    Pairs the RM ties are left out (``n_rm_ties``); scorer ties count half."""
    scorer = _outcomes(scorer_chosen, scorer_rejected, "agreement_with_rm")
    rm = _outcomes(rm_chosen, rm_rejected, "agreement_with_rm")
    if scorer.shape != rm.shape:
        raise ValueError("agreement_with_rm: scorer and RM scores cover different numbers of pairs")
    keep, n = rm != 0.5, int(np.sum(rm != 0.5))
    agree = np.where(scorer[keep] == 0.5, 0.5, (scorer[keep] == rm[keep]).astype(float))
    return {"agreement": float(agree.mean()) if n else None, "ci": _wilson(float(agree.sum()), n) if n else None,
            "n": n, "n_rm_ties": int((~keep).sum())}


def continuation_sums(row_values, seq_index, position, prompt_lens) -> np.ndarray:
    """Each sequence's text score: the sum of ``row_values`` over its continuation rows (position >=
    its prompt length). Rows of sequences past ``len(prompt_lens)`` (extra texts) are left out."""
    row_values, seq_index, position = (np.asarray(a) for a in (row_values, seq_index, position))
    prompt_lens = np.asarray(prompt_lens)
    n_seq = len(prompt_lens)
    keep = seq_index < n_seq
    keep[keep] &= position[keep] >= prompt_lens[seq_index[keep]]
    return np.bincount(seq_index[keep], weights=row_values[keep].astype(np.float64), minlength=n_seq)


def generation_pairs(samples, seq_index, position, eval_rows, row_values: dict) -> tuple[PreferencePairs, dict]:
    """Preference pairs from held-out generations, and each scorer's text scores on them.

    Each pair is the best vs the worst continuation (by the RM reward) that one model wrote for one
    prompt, among the sequences whose rows are held out (``eval_rows``): never base vs tuned, whose
    log-ratio differs by sampling source alone. ``row_values`` maps a scorer to its value at every
    captured row; a text's score is the sum over its continuation rows (:func:`continuation_sums`).
    Returns the pairs and ``{scorer: (chosen scores, rejected scores)}``, the RM's rewards as ``rm``.
    """
    seq_index = np.asarray(seq_index)
    n_seq = len(samples.token_ids)
    idx = np.array(sorted({int(s) for s in np.unique(seq_index[eval_rows]) if s < n_seq}), dtype=np.int64)
    key = 2 * samples.prompt_index[idx] + (samples.source[idx] == "tuned")
    pp = pairs_from_generations([p for p in samples.prompts for _ in "bt"], [samples.completions[i] for i in idx],
                                samples.rewards[idx], key)
    ch, rj = idx[list(pp.chosen_index)], idx[list(pp.rejected_index)]
    sums = {name: continuation_sums(v, seq_index, position, samples.prompt_lens) for name, v in row_values.items()}
    sums["rm"] = np.asarray(samples.rewards, dtype=np.float64)
    pp = PreferencePairs(pp.prompts, pp.chosen, pp.rejected, "held-out generations (best vs worst by the RM of one "
                         "model's continuations of one prompt)", tuple(ch.tolist()), tuple(rj.tolist()))
    return pp, {name: (v[ch], v[rj]) for name, v in sums.items()}
