#!/usr/bin/env python
"""Coverage of the ablation's share intervals when sampling stops on their width (``validate.share_half_width``).

The ablate stage samples 4 continuations per prompt, then one more per round, until every random feature set's
share of the reward gain has a 95% CI half-width of at most 0.15 (at most 8; docs/validation.md). Stopping on a
width is not stopping on an estimate, but a ratio's width also moves with its estimate, and the prompts are fixed.
This simulates paired rewards of the demo's shape and measures how often the reported 95% interval (the stage's
own bootstrap over prompts, :func:`irmprobe.validation.ablation.gain_share_row`) covers the true share, with the
rule (:func:`irmprobe.validation.ablation.shares_settled`) and at fixed sample counts, on the same datasets.

The model, per prompt p and sample s (80 prompts): base reward b_p + e, tuned b_p + g_p + e', with prompt effects
b_p ~ N(0.08, 0.3), g_p ~ N(gain, 0.3) and sample noise sd 0.6; a feature set's continuation equals the tuned one
with probability 1 - ``diverge`` (it changed no sampled token), else it is a fresh draw with the tuned model's
mean lowered by share / diverge x g_p (so the set removes share x the gain on average). Random sets have share 0; one targeted set has share 0.3. The defaults give random-set
half-widths of about 0.13-0.17 after 4 samples, as on the demo (0.166 at 4, 0.149 at 6).

    python benchmarks/ablation_stopping.py            # 500 datasets (about 3 minutes on 2 cores)
    python benchmarks/ablation_stopping.py --reps 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import binomtest

from irmprobe.validation.ablation import gain_share_row, shares_settled


def dataset(rng, *, n_prompts: int, most: int, gain: float, diverge: float, shares: list[float]):
    """Rewards [most, n_prompts] of base, tuned and each set (samples drawn up front: the rule reads a prefix)."""
    b = rng.normal(0.08, 0.3, n_prompts)
    g = rng.normal(gain, 0.3, n_prompts)
    noise = lambda: rng.normal(0.0, 0.6, (most, n_prompts))  # noqa: E731
    base, tuned = b + noise(), b + g + noise()
    sets = []
    for share in shares:
        fresh = b + g * (1 - share / diverge) + noise()  # diverging slots carry the whole effect: mean share
        sets.append(np.where(rng.random((most, n_prompts)) < diverge, fresh, tuned))
    return base, tuned, sets


def flat(a: np.ndarray, n: int) -> np.ndarray:
    """The first n samples of each prompt, in (prompt, sample) order."""
    return a[:n].T.reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--gain", type=float, default=0.44)
    parser.add_argument("--diverge", type=float, default=0.6)
    parser.add_argument("--random-sets", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    shares = [0.0] * args.random_sets + [0.3]
    fixed = (4, 6, 8)
    covered = {k: np.zeros(len(shares)) for k in (*fixed, "rule")}
    stops, widths = [], []
    for _ in range(args.reps):
        base, tuned, sets = dataset(rng, n_prompts=args.prompts, most=8, gain=args.gain, diverge=args.diverge,
                                    shares=shares)

        def rows(n):
            index = np.repeat(np.arange(args.prompts), n)
            return [gain_share_row(flat(base, n), flat(tuned, n), flat(s, n), index) for s in sets], index

        n = 4
        while True:  # the stage's rule: random sets' widths, gain significantly positive, at most 8
            out, index = rows(n)
            check = shares_settled(flat(base, n), flat(tuned, n), [flat(s, n) for s in sets[:-1]], index,
                                   args.target)
            if check["settled"] or not check["gain_positive"] or n == 8:
                break
            n += 1
        stops.append(n)
        widths.append(check["widest"])
        for k, result in [*((k, rows(k)[0]) for k in fixed), ("rule", out)]:
            covered[k] += [r is not None and None not in r["ci"] and r["ci"][0] <= true <= r["ci"][1]
                           for r, true in zip(result, shares)]
    print(f"{args.reps} simulated datasets of {args.prompts} prompts (gain {args.gain:g}, divergence "
          f"{args.diverge:g}); rule: {args.random_sets} random sets, target half-width {args.target:g}, 4 to 8 "
          f"samples per prompt; {time.perf_counter() - started:.0f} s")
    counts = np.bincount(stops, minlength=9)[4:]
    print("rule stopped at 4/5/6/7/8 samples: " + " / ".join(str(c) for c in counts)
          + f" (mean {np.mean(stops):.2f}); widest random half-width at the stop: median "
          f"{np.median([w for w in widths if w is not None]):.3f}")
    print(f"{'samples per prompt':<22} {'random sets (share 0)':>32} {'targeted set (share 0.3)':>32}")
    for k, c in covered.items():
        cells = []
        for hits, n in ((c[:-1].sum(), args.reps * args.random_sets), (c[-1], args.reps)):
            ci = binomtest(int(hits), n).proportion_ci(0.95)
            cells.append(f"{hits / n:.3f} [{ci.low:.3f}, {ci.high:.3f}]")
        print(f"{str(k):<22} {cells[0]:>32} {cells[1]:>32}")
    print("(coverage of the nominal 95% interval, with a 95% binomial CI; the random sets of one dataset share its "
          "base and tuned rewards, so their hits are not independent)")


if __name__ == "__main__":
    main()
