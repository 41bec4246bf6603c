#!/usr/bin/env python
"""How often the attribution names a feature set whose true faithfulness is below its threshold, and how often it
names one that reaches it, on planted models, through the attribute stage's own measures.

The attribute stage names the smallest set of SAE features whose faithfulness (the share of what the hook points
carry of the implicit reward, everything else at its base value) reaches ``attribute.threshold`` (0.6) by point
estimate on its held-out half of the prompts (``smallest_faithful(curves, threshold, "feature_rows")``), with a
bootstrap CI over those prompts printed beside it. Near the threshold a point estimate on 12 prompts errs both
ways; this measures how often, against the set's faithfulness on many more prompts (the truth).

Each replicate (seed ``--seed`` + 1000 x fraction index + r) builds the planted model of
``benchmarks/causal_calibration.py`` (a random 4-block Llama whose tuned copy writes ``--strength`` x u into block
2's MLP output; u raises five planted words), with the base's block-2 MLP made to write nothing along u, and an SAE
at that output whose 63 random features read nothing along u and whose feature 0 reads ``--carried`` x (the change
along u + a context direction v) and writes along u: where the context reads negative along v it carries less of
the change, so what it carries varies from prompt to prompt, as a real feature's does (the rest of the change stays
in the SAE's error). Feature 0 is the one feature that carries anything; its true faithfulness rises with
``carried`` and differs between models (by 0.2-0.3 at one fraction). Each fraction has models of its own, so
replicates are independent.
Both models continue 24 prompts (3 samples each, 12 tokens; the stage's two halves of 12: ranking by integrated
gradients on one, the curves on the other), and 96 further prompts give the truth.

    python benchmarks/naming_calibration.py                 # 30 models per carried fraction (about 10 minutes)
    python benchmarks/naming_calibration.py --reps 10 --carried 0.9
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one progress bar per curve would drown the table

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causal_calibration import LAYER, planted_case, planted_setup, rate  # noqa: E402

from irmprobe.activations.samples import sample_continuations  # noqa: E402
from irmprobe.prompts import load_prompts  # noqa: E402
from irmprobe.validation.attribution import (  # noqa: E402
    ImplicitReward,
    Node,
    attribution_curves,
    node_setter,
    ranked_nodes,
    ratio_ci,
    smallest_faithful,
)

K_GRID = (1, 2, 5, 10, 20, 30)


def naming_case(tokenizer, ids: list[int], seed: int, strength: float, carried: float, prompts: list[str]):
    """(base, tuned, sae): :func:`causal_calibration.planted_case` with the base's block-``LAYER`` MLP writing
    nothing along u and the random features reading nothing along u; feature 0 reads ``carried`` x (the change along
    u + a context direction v), scaled so that its reading of v has the spread of the change, and writes along u.
    Its tuned value exceeds its base value by up to ``carried`` x strength, by less where the context reads
    negative along v: what it carries depends on the context, as a real feature's does."""
    base, tuned, sae = planted_case(tokenizer, ids, seed, strength, 1.0, feature_scale=0.3)
    u = sae.W_dec[0].detach().clone()
    off = torch.eye(len(u)) - torch.outer(u, u)
    g = torch.Generator().manual_seed(seed)
    v = off @ torch.randn(len(u), generator=g)
    v /= v.norm()
    with torch.no_grad():
        for model in (base, tuned):
            proj = model.model.layers[LAYER].mlp.down_proj
            proj.weight.copy_(off @ proj.weight)
        seen = []
        handle = base.model.layers[LAYER].mlp.register_forward_hook(lambda m, i, o: seen.append(o[0] @ v))
        for prompt in prompts:
            base(torch.tensor([tokenizer(prompt)["input_ids"]]))
        handle.remove()
        spread = float(torch.cat(seen).std())
        sae.W_enc.copy_(off @ sae.W_enc)
        sae.W_enc[:, 0] = carried * (u + (strength / spread) * v)
        sae.b_enc[0] = 0.0
    return base, tuned, sae


def continuations(base, tuned, tokenizer, prompts: list[str], seed: int, first: int = 0):
    """Both models' continuations of ``prompts`` as the metric takes them: (sequences, prompt lengths, prompt
    index (from ``first``), source)."""
    seqs, lens, index, source = [], [], [], []
    for name, model in (("base", base), ("tuned", tuned)):
        ids, plens, pidx, _ = sample_continuations(model, tokenizer, prompts, n_per_prompt=3, max_new_tokens=12,
                                                   batch_size=64, seed=seed)
        seqs += ids
        lens += plens
        index += [first + i for i in pidx]
        source += [name] * len(ids)
    return seqs, np.asarray(lens), np.asarray(index), np.asarray(source)


def replicate(tokenizer, ids, prompts: list[str], truth_prompts: list[str], seed: int, carried: float,
              strength: float, threshold: float) -> dict:
    base, tuned, sae = naming_case(tokenizer, ids, seed, strength, carried, prompts)
    seqs, lens, index, source = continuations(base, tuned, tokenizer, prompts, seed)
    halves = np.random.default_rng(seed).permutation(len(prompts))
    rank_half, eval_half = np.sort(halves[:len(prompts) // 2]), np.sort(halves[len(prompts) // 2:])

    def metric(half, parts=(seqs, lens, index, source)):
        keep = np.flatnonzero(np.isin(parts[2], half))
        return ImplicitReward(base, tuned, {LAYER: sae}, "mlp_out", [parts[0][i] for i in keep], parts[1][keep],
                              parts[2][keep], parts[3][keep], batch_size=32)

    ranked = ranked_nodes(metric(rank_half).integrated_gradients(8))
    candidates = [Node(LAYER, i) for i in range(sae.cfg.d_sae)]
    curves = attribution_curves(metric(eval_half), ranked, K_GRID, n_random=3, candidates=candidates, seed=seed)
    named = smallest_faithful(curves, threshold, "feature_rows")
    first_feature = next(node for node, _ in ranked if not node.is_error)
    # The truth: feature 0's faithfulness (features only: every other node at its base value) on many more prompts.
    wide = ImplicitReward(base, tuned, {LAYER: sae}, "mlp_out",
                          *continuations(base, tuned, tokenizer, truth_prompts, seed + 10_000, first=len(prompts)),
                          batch_size=32)
    full, empty = wide.evaluate(None), wide.evaluate(lambda layer, part: False)
    tuned_set = wide.evaluate(node_setter([Node(LAYER, 0)], {LAYER: sae}))
    true = (tuned_set.mean() - empty.mean()) / (full.mean() - empty.mean())
    true_ci = ratio_ci(tuned_set - empty, full - empty, seed=seed)  # the truth is itself an estimate (96 prompts)
    row = curves["feature_rows"][0]
    at_named = next((r for r in curves["feature_rows"] if r["k"] == named), None)
    return {"carried": carried, "true": float(true), "true_ci": true_ci, "estimate": row["faithfulness"]["value"],
            "ci": row["faithfulness"]["ci"], "first_is_planted": first_feature == Node(LAYER, 0),
            "named": named, "named_planted": named == 1 and first_feature == Node(LAYER, 0),
            "named_ci": None if at_named is None else at_named["faithfulness"]["ci"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="replicates (models) per carried fraction")
    parser.add_argument("--carried", type=float, nargs="+", default=[0.7, 0.8, 0.85, 0.9, 0.95, 1.05])
    parser.add_argument("--strength", type=float, default=0.03)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, _, ids = planted_setup(Path(tmp))
    prompts = load_prompts()
    started = time.perf_counter()
    out = []
    for j, carried in enumerate(args.carried):  # other models at each fraction (seed + 1000 j + r): independent
        out += [replicate(tokenizer, ids, prompts[:24], prompts[24:120], args.seed + 1000 * j + r, carried,
                          args.strength, args.threshold) for r in range(args.reps)]
    print(f"{len(out)} replicates ({time.perf_counter() - started:.0f} s); threshold {args.threshold:g}; named: the "
          "smallest features-only set reaching it by point estimate on 12 held-out prompts")
    print(f"{'carried':>8} {'true faithfulness':>20} {'estimate (sd)':>16} {'CI covers truth':>22} "
          f"{'planted ranked first':>24} {'named (k = 1)':>24}")
    for carried in args.carried:
        group = [r for r in out if r["carried"] == carried]
        true = np.array([r["true"] for r in group])
        est = np.array([r["estimate"] for r in group], dtype=float)
        covered = [r["ci"][0] is not None and r["ci"][0] <= r["true"] <= r["ci"][1] for r in group]
        print(f"{carried:>8g} {np.mean(true):>11.3f} [{true.min():.2f}, {true.max():.2f}] "
              f"{np.nanmean(est):>8.3f} ({np.nanstd(est, ddof=1):.3f}) {rate(covered):>22} "
              f"{rate([r['first_is_planted'] for r in group]):>24} {rate([r['named_planted'] for r in group]):>24}")
    print(f"by true faithfulness (every replicate; named: any set of <= {max(K_GRID)} features reaches the threshold)")
    edges = [-np.inf, args.threshold - 0.1, args.threshold - 0.05, args.threshold, args.threshold + 0.05,
             args.threshold + 0.1, np.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        group = [r for r in out if lo <= r["true"] < hi]
        if group:
            label = (f"below {hi:.2f}" if lo == -np.inf else f"{lo:.2f} or more" if hi == np.inf else
                     f"{lo:.2f} to {hi:.2f}")
            print(f"  truth {label:<14} named {rate([r['named'] is not None for r in group])}")
    below = [r["named"] is not None for r in out if r["true"] < args.threshold]
    above = [r["named"] is not None for r in out if r["true"] >= args.threshold]
    print(f"a set named where the truth is below the threshold: {rate(below)}; named where it reaches it: "
          f"{rate(above)}")
    wrong = [r for r in out if r["named"] is not None and r["true"] < args.threshold]
    reaching = sum(r["named_ci"][0] is not None and r["named_ci"][0] < args.threshold for r in wrong)
    print(f"of the {len(wrong)} sets named below the threshold, {reaching} had a printed CI reaching below it; the "
          f"truth's own 95% CI (96 prompts) has a median half-width of "
          f"{np.median([(r['true_ci'][1] - r['true_ci'][0]) / 2 for r in out if None not in r['true_ci']]):.3f}")
    return out


if __name__ == "__main__":
    main()
