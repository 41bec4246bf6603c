#!/usr/bin/env python
"""The per-word calibration of ``discover.words`` against a like-for-like null, on simulated organisms.

:func:`irmprobe.analysis.discovery.named_vocabulary` tests each listed word of the organism against the K controls'
values of that word (a prediction t on K - 1 d.f.) and calibrates the nominal p-value by the controls' own per-word
p-values, each control against the other K - 1 (K - 2 d.f.: :func:`irmprobe.analysis.discovery._word_null`). Under
heavy-tailed single-token moves the null's tail is then lighter than the organism's. A like-for-like null tests the
organism against K - 1 controls at a time, on the null's d.f.; this script measures what it would buy and cost:

- ``nominal``: the organism's nominal p-values, uncalibrated;
- ``built``: calibrated as the stage does;
- ``drop_one``: the organism against the first K - 1 controls, calibrated by the same null (like for like);
- ``twice_mean`` / ``twice_median``: the K drop-one calibrated p-values combined as twice their mean (median), a
  valid p-value whatever their dependence.

Each organism's full-vocabulary log-ratio is simulated as in ``tests/unit/test_discovery.py`` (token spread growing
as base log-probability falls, a shared low-rank drift, each organism's change of normaliser); ``heavy`` adds
Student-t (2 d.f.) moves of single tokens to every organism. The first 10 of 30 listed tokens are raised in the
organism by ``--size`` sds. A word is named, as in the stage, only where the list passes as one set (p <= 0.05)
and its Benjamini-Hochberg q over the list is below 0.05. Printed per K: the false-discovery rate among named words,
the share of organisms naming a false word and the raised words named on average.

    python benchmarks/named_words_null.py                         # heavy tails, 8 sd, 120 organisms per K
    python benchmarks/named_words_null.py --noise normal --size 6 --organisms 80 --controls 4 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.analysis.agreement import prediction_t  # noqa: E402
from irmprobe.analysis.discovery import _stratified, _word_null, stratum_z  # noqa: E402

RULES = ("nominal", "built", "drop_one", "twice_mean", "twice_median")
LISTED, RAISED = 30, 10


def organisms(seed: int, k: int, noise: str, size: float, v: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """(k + 1 organisms' full-vocabulary log-ratios [k + 1, v], each token's base log-probability [v]); the first
    row is the organism, whose first RAISED tokens are raised by ``size`` sds."""
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-20, -2, v)
    sd = 0.02 * np.exp(-logp / 8)
    x = rng.standard_normal((k + 1, v)) * sd + rng.standard_normal((k + 1, 3)) @ rng.standard_normal((3, v)) * 0.3 * sd
    x += rng.normal(0, 0.05, (k + 1, 1))
    if noise == "heavy":
        x += np.random.default_rng(500 + seed).standard_t(2, x.shape) * sd * 2
    x[0, :RAISED] += size * sd[:RAISED]
    return x, logp


def p_values(x: np.ndarray, logp: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
    """Each rule's p-values of the LISTED tokens, and whether the list passes as one set (the stage's gate)."""
    _, o, c, stratum = _stratified(x[0], x[1:], None, logp, 20, 0.05, "named_words_null")
    zo, zc, _ = stratum_z(o, c, stratum)  # as named_vocabulary scales them
    k = len(zc)
    usable = np.isfinite(zo) & np.isfinite(zc).all(axis=0) & (zc.std(axis=0, ddof=1) > 1e-9)
    cols = [i for i in range(LISTED) if usable[i]]
    null = _word_null(zc[:, usable])

    def calibrated(p):
        return (1 + np.searchsorted(null, p, side="right")) / (1 + len(null))

    nominal = prediction_t(zo[cols], zc[:, cols])[1]
    drops = np.array([calibrated(prediction_t(zo[cols], np.delete(zc[:, cols], j, axis=0))[1]) for j in range(k)])
    out = {"nominal": nominal, "built": calibrated(nominal), "drop_one": drops[-1],
           "twice_mean": np.minimum(1.0, 2 * drops.mean(axis=0)),
           "twice_median": np.minimum(1.0, 2 * np.median(drops, axis=0))}
    gate = float(prediction_t(zo[cols].mean(), zc[:, cols].mean(axis=1))[1]) <= 0.05
    return {rule: np.asarray(p) for rule, p in out.items()}, gate


def simulate(k: int, n_organisms: int, noise: str, size: float, seed: int = 0) -> dict[str, dict]:
    """Per rule: ``fdr`` (mean false share among named words, 0 where none is named), ``any_false`` (share of
    organisms naming a false word) and ``true_named`` (raised words named, on average)."""
    tally = {rule: ([], [], []) for rule in RULES}
    for s in range(seed, seed + n_organisms):
        x, logp = organisms(s, k, noise, size)
        ps, gate = p_values(x, logp)
        for rule, p in ps.items():
            q = stats.false_discovery_control(p, method="bh")
            named = set(np.flatnonzero((q < 0.05) & gate).tolist())
            false = named - set(range(RAISED))
            fdp, anyf, hits = tally[rule]
            fdp.append(len(false) / max(1, len(named)))
            anyf.append(bool(false))
            hits.append(len(named) - len(false))
    return {rule: {"fdr": float(np.mean(f)), "any_false": float(np.mean(a)), "true_named": float(np.mean(h))}
            for rule, (f, a, h) in tally.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--controls", type=int, nargs="+", default=[3, 4, 6], help="K values (each >= 3)")
    ap.add_argument("--organisms", type=int, default=120, help="simulated organisms per K")
    ap.add_argument("--noise", choices=("heavy", "normal"), default="heavy")
    ap.add_argument("--size", type=float, default=8.0, help="how far the 10 raised words move, in sds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if min(args.controls) < 3:
        ap.error("--controls: each K must be at least 3 (the null has each control against the other K - 1)")
    print(f"{args.noise} draws, {RAISED} of {LISTED} listed words raised by {args.size:g} sd, {args.organisms} "
          "organisms per K\n\n| K | rule | FDR of named words | organisms naming a false word | raised words named |\n"
          "| --- | --- | --- | --- | --- |")
    for k in args.controls:
        for rule, r in simulate(k, args.organisms, args.noise, args.size, args.seed).items():
            print(f"| {k} | {rule} | {r['fdr']:.3f} | {r['any_false']:.2f} | {r['true_named']:.1f} of {RAISED} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
