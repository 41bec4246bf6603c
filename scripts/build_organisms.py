#!/usr/bin/env python
"""Build model organisms of a base model with RLOO, GRPO and DPO, and print their reports.

Each organism is the base tuned against the RM (default: VADER lexicon) on the shipped prompts;
the report compares base and tuned on held-out prompts (RM reward, VADER compound score, KL,
samples side by side) and prints the per-block, per-submodule layer divergence table.
Organisms are cached: a second run only re-reports.

    python scripts/build_organisms.py                      # default base, all three methods
    python scripts/build_organisms.py --methods rloo --steps 60 --base /path/to/model
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.config import OrganismConfig, RewardConfig  # noqa: E402
from irmprobe.models.divergence import layer_divergence  # noqa: E402
from irmprobe.models.loading import DEFAULT_BASE, load_pair  # noqa: E402
from irmprobe.models.rewards import reward_model  # noqa: E402
from irmprobe.organisms.report import organism_report, report_lines  # noqa: E402
from irmprobe.organisms.tuning import make_organism  # noqa: E402
from irmprobe.prompts import load_prompts, split_prompts  # noqa: E402

# DPO sees one pair per prompt and step, so it gets more prompts per step and a smaller step size.
DPO_OVERRIDES = {"prompts_per_step": 8, "learning_rate": 5e-5, "beta": 0.1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="base model spec (default: the bundled SmolLM2)")
    parser.add_argument("--methods", nargs="+", default=["rloo", "grpo", "dpo"], choices=["rloo", "grpo", "dpo"])
    parser.add_argument("--steps", type=int, default=OrganismConfig.steps, help="optimiser steps per organism")
    parser.add_argument("--heldout", type=int, default=80, help="prompts held out from tuning")
    parser.add_argument("--report-prompts", type=int, default=64, help="held-out prompts used in the report")
    parser.add_argument("--samples", type=int, default=2, help="samples per report prompt and model")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rm = reward_model(RewardConfig(), device=args.device)
    train, heldout = split_prompts(load_prompts(), args.heldout, args.seed)
    for method in args.methods:
        config = OrganismConfig(method=method, steps=args.steps, lora_rank=args.lora_rank)
        if method == "dpo":
            config = dataclasses.replace(config, **DPO_OVERRIDES)
        start = time.perf_counter()
        org = make_organism(args.base, rm, config, train, seed=args.seed, device=args.device)
        print(f"\n=== {method.upper()} organism: {org.path} "
              f"({'reused from cache' if org.reused else f'trained in {org.seconds:.0f} s'}) ===")
        print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
        pair = load_pair(args.base, str(org.path), device=args.device)
        report = organism_report(pair, rm, heldout[: args.report_prompts], samples_per_prompt=args.samples,
                                 seed=args.seed)
        for line in report_lines(report, rm.name):
            print(line)
        div = layer_divergence(pair, top_k=3)
        print("layer divergence (|dθ| = sum of Frobenius norms of tuned - base; rel = over base norms; * = top 3):")
        for line in div.table():
            print(line)
        print(f"[{method}] {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
