#!/usr/bin/env python
"""The ablation's sampler with the last position's logits only, against every position's, in one process.

``irmprobe.activations.patching.generate_conditions`` asks the model for the last position's logits at each step
(``logits_to_keep=1``); before, a prompt's first step computed a logit for every prompt position and kept the last.
This samples the same continuations both ways (the baseline by switching ``logits_to_keep`` off) and prints the
seconds of each, their ratio, and whether the samples are identical (they must be: only the head's unused rows
are dropped).

    python benchmarks/sampler_logits.py                        # the default SmolLM2 base as both models
    python benchmarks/sampler_logits.py --tuned DIR --prompts 40 --conditions 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import irmprobe.activations.patching as patching  # noqa: E402
from irmprobe.activations.patching import Condition, generate_conditions  # noqa: E402
from irmprobe.models.loading import DEFAULT_BASE, load_model  # noqa: E402
from irmprobe.prompts import load_prompts  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--tuned", default=None, help="the tuned model (default: a second copy of the base)")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--conditions", type=int, default=4, help="conditions in the shared batch; the last one "
                        "patches the base's MLP output at block 1, so the base runs in lockstep on its rows")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating; the best counts")
    args = parser.parse_args(argv)
    if args.conditions < 1 or args.prompts < 1 or args.repeats < 1:
        parser.error("--conditions, --prompts and --repeats must be >= 1")
    base, tokenizer = load_model(args.base)
    tuned, _ = load_model(args.tuned or args.base)
    prompts = load_prompts()[: args.prompts]
    conditions = [Condition(None)] * (args.conditions - 1) + [Condition(None, (1,))]
    keeps = patching._keeps_logits

    def sample(last_only: bool):
        patching._keeps_logits = keeps if last_only else (lambda model_type: False)
        try:
            started = time.perf_counter()
            out = generate_conditions(base, tuned, tokenizer, prompts, conditions, "mlp_out", n_per_prompt=1,
                                      max_new_tokens=args.max_new_tokens, seed=0, batch_size=args.batch_size)
            return time.perf_counter() - started, [c.token_ids for c in out]
        finally:
            patching._keeps_logits = keeps

    sample(True)  # warm-up
    best = {True: float("inf"), False: float("inf")}
    samples = {}
    for _ in range(args.repeats):
        for last_only in (False, True):
            seconds, samples[last_only] = sample(last_only)
            best[last_only] = min(best[last_only], seconds)
    rows = args.prompts * args.conditions
    print(f"{rows} continuations ({args.prompts} prompts x {args.conditions} conditions, {args.max_new_tokens} "
          f"tokens, batch {args.batch_size}); best of {args.repeats}")
    print(f"every position's logits (baseline): {best[False]:.2f} s")
    print(f"the last position's logits only:    {best[True]:.2f} s")
    print(f"time ratio (last only / baseline):  {best[True] / best[False]:.3f}")
    identical = samples[True] == samples[False]
    print(f"identical samples: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
