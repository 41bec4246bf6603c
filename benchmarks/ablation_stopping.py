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
mean lowered by share / diverge x g_p (so the set removes share x the gain on average). Random sets have share 0;
one targeted set has share 0.3. The defaults give random-set half-widths of about 0.13-0.17 after 4 samples, as
on the demo (0.166 at 4, 0.149 at 6).

It also measures the error rate of the causal call the report prints, on cases whose answer is known. At the rule's
stop, four targeted sets of the demo's sizes (3 of 10 features, 1 of 6) are judged by the stage's own rule
(:func:`irmprobe.validation.ablation.against_random`: the set's Bonferroni interval over the 4 targeted sets lies
wholly above the 2.5-97.5 percentile range of the 4 random sets of its size). With every targeted share 0, each call
is false; with shares ``--effects``, the calls are the rule's power. A run's own known-null check (each random set
against the other three of its size) is counted beside them: it is what a single run reports. The sets of one
dataset share its rewards and its random range, so rates are per set with a bootstrap CI over datasets. Every random
set is simulated alike whatever its size label (on the demo a larger set may diverge more often).

    python benchmarks/ablation_stopping.py            # 500 datasets (about 5 minutes on 2 cores)
    python benchmarks/ablation_stopping.py --reps 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import binomtest, bootstrap

from irmprobe.analysis.verdict import null_calls
from irmprobe.validation.ablation import adjusted_share, against_random, gain_share_row, shares_settled

# The demo's ablation design: 4 random sets of each of its two sizes, 4 targeted sets (3 of 10 features, 1 of 6).
RANDOM_SIZES = (6,) * 4 + (10,) * 4
TARGETED_SIZES = (10, 10, 10, 6)


def causal_calls(base, tuned, randoms, targeted, shares, index) -> tuple[list[bool], dict | None]:
    """The stage's causal rule (:func:`irmprobe.validation.ablation.against_random`) on one design: whether each
    targeted set is called causal against the random sets of its size, and the in-run known-null count
    (:func:`irmprobe.analysis.verdict.null_calls`) of the random sets judged against each other."""
    rows = []
    for kind, sizes, sets in (("random", RANDOM_SIZES, randoms), ("targeted", TARGETED_SIZES, targeted)):
        for i, (size, rewards) in enumerate(zip(sizes, sets)):
            rows.append({"set": f"random_{size} #{i}" if kind == "random" else f"targeted {i} (share {shares[i]:g})",
                         "mode": "zero", "n_features": size,
                         "gain_share": gain_share_row(base, tuned, rewards, index),
                         "gain_share_adjusted": adjusted_share(base, tuned, rewards, index, len(TARGETED_SIZES))})
    names = tuple(r["set"] for r in rows[len(randoms):])
    rows = against_random(rows, names)
    return [bool((r.get("random") or {}).get("above_random")) for r in rows[len(randoms):]], null_calls(rows)


def dataset(rng, *, n_prompts: int, most: int, gain: float, diverge: float, shares: list[float]):
    """Rewards [most, n_prompts] of base, tuned and each set (samples drawn up front: the rule reads a prefix),
    and the prompt effects (b, g)."""
    b = rng.normal(0.08, 0.3, n_prompts)
    g = rng.normal(gain, 0.3, n_prompts)
    base, tuned = b + rng.normal(0.0, 0.6, (most, n_prompts)), b + g + rng.normal(0.0, 0.6, (most, n_prompts))
    return base, tuned, more_sets(rng, b, g, tuned, shares, diverge), (b, g)


def more_sets(rng, b, g, tuned, shares: list[float], diverge: float) -> list[np.ndarray]:
    """One set's rewards per share: a set's continuation equals the tuned one unless it diverges."""
    sets = []
    for share in shares:
        fresh = b + g * (1 - share / diverge) + rng.normal(0.0, 0.6, tuned.shape)  # diverging slots carry it all
        sets.append(np.where(rng.random(tuned.shape) < diverge, fresh, tuned))
    return sets


def flat(a: np.ndarray, n: int) -> np.ndarray:
    """The first n samples of each prompt, in (prompt, sample) order."""
    return a[:n].T.reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--gain", type=float, default=0.44)
    parser.add_argument("--diverge", type=float, default=0.6)
    parser.add_argument("--random-sets", type=int, default=len(RANDOM_SIZES))
    parser.add_argument("--effects", type=float, nargs="+", default=[0.3, 0.3, 0.5, 0.5],
                        help="the shares of the four targeted sets of the causal rule's positive design")
    parser.add_argument("--target", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.random_sets != len(RANDOM_SIZES) or len(args.effects) != len(TARGETED_SIZES):
        parser.error(f"the causal rule's design has {len(RANDOM_SIZES)} random and {len(TARGETED_SIZES)} targeted "
                     "sets (the demo's)")
    rng = np.random.default_rng(args.seed)
    # The causal rule's targeted sets come from a stream of their own: the coverage datasets stay as they were.
    rng_targeted = np.random.default_rng(args.seed + 1)
    shares = [0.0] * args.random_sets + [0.3]
    calls = {"null": [], "effect": [], "known_nulls": [], "gain_not_positive": 0}
    fixed = (4, 6, 8)
    covered = {k: np.zeros(len(shares)) for k in (*fixed, "rule")}
    stops, widths = [], []
    for _ in range(args.reps):
        base, tuned, sets, (b, g) = dataset(rng, n_prompts=args.prompts, most=8, gain=args.gain,
                                            diverge=args.diverge, shares=shares)
        designs = {"null": [0.0] * len(TARGETED_SIZES), "effect": list(args.effects)}
        targeted = {name: more_sets(rng_targeted, b, g, tuned, values, args.diverge)
                    for name, values in designs.items()}

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
        if not check["gain_positive"]:  # the stage computes no share, so it calls nothing causal
            calls["gain_not_positive"] += 1
        for name, values in designs.items():
            called, known = ((causal_calls(flat(base, n), flat(tuned, n), [flat(s, n) for s in sets[:-1]],
                                           [flat(s, n) for s in targeted[name]], values, index))
                             if check["gain_positive"] else ([False] * len(values), None))
            calls[name].append(called)
            if name == "null":
                calls["known_nulls"].append((0, 0) if known is None else (known["called"], known["n"]))
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
    print()

    def rate(per_dataset: np.ndarray, count: str) -> str:
        """The mean over datasets of each dataset's share of calls, with a 95% percentile bootstrap over datasets
        (the independent unit: the sets of one dataset share its rewards and random range); where each dataset gives
        one yes or no (a single set, or "any"), the exact binomial interval, which stays informative at 0 calls."""
        per_dataset = np.asarray(per_dataset, dtype=np.float64)
        if set(np.unique(per_dataset)) <= {0.0, 1.0}:  # one yes/no per dataset: an exact binomial interval
            ci = binomtest(int(per_dataset.sum()), len(per_dataset)).proportion_ci(0.95)
            return f"{per_dataset.mean():.3f} [{ci.low:.3f}, {ci.high:.3f}] ({count})"
        ci = bootstrap((per_dataset,), np.mean, n_resamples=2000, method="percentile",
                       random_state=np.random.default_rng(args.seed)).confidence_interval
        return f"{per_dataset.mean():.3f} [{ci.low:.3f}, {ci.high:.3f}] ({count})"

    null, effect = np.array(calls["null"], dtype=float), np.array(calls["effect"], dtype=float)
    known = np.array(calls["known_nulls"], dtype=float)
    print(f"the causal rule at the rule's stop (4 targeted sets of {', '.join(map(str, TARGETED_SIZES))} features, "
          f"Bonferroni over 4, each against the 4 random sets of its size; {calls['gain_not_positive']} datasets "
          "with no significant gain, where nothing is called); rates per set, 95% CI by bootstrap over datasets (exact "
          "binomial over datasets where each gives one yes or no):")
    print(f"  targeted sets with share 0 called causal (false calls): {rate(null.mean(1), f'{int(null.sum())} calls')}")
    print(f"  datasets with any false call among their 4 null targeted sets: "
          f"{rate(null.any(1), f'{int(null.any(1).sum())} of {len(null)}')}")
    print("  the run's own known-null check (each random set against the other 3 of its size) called: "
          + rate(known[:, 0] / np.maximum(known[:, 1], 1), f"{int(known[:, 0].sum())} of {int(known[:, 1].sum())}"))
    for value in sorted(set(args.effects)):
        column = effect[:, [i for i, v in enumerate(args.effects) if v == value]]
        print(f"  targeted sets with share {value:g} called causal (power): "
              f"{rate(column.mean(1), f'{int(column.sum())} of {column.size}')}")


if __name__ == "__main__":
    main()
