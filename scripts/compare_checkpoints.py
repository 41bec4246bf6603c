#!/usr/bin/env python
"""How the IRM emerges during RLHF: the IRM views of each organism checkpoint against the RM.

Builds (or reuses) the organism of CONFIG with checkpoints every N steps, then runs the pipeline up
to the comparison with each checkpoint as the tuned model, and prints one row per checkpoint:
tuned - base reward, and Kendall tau (with 95% CI) of the log-ratio map and the SAE IRM.

    python scripts/compare_checkpoints.py configs/default.yaml --every 12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config whose organism is built (pair.tuned must be null)")
    parser.add_argument("--every", type=int, default=12, help="keep a checkpoint every N optimiser steps")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from irmprobe.api import run
    from irmprobe.config import RunConfig
    from irmprobe.models.rewards import reward_model
    from irmprobe.organisms.tuning import make_organism
    from irmprobe.prompts import load_prompts, split_prompts

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    if config.pair.tuned is not None or config.pair.null:
        parser.error("the config must build its organism (pair.tuned: null, pair.null: false)")
    config = replace(config, organism=replace(config.organism, checkpoint_every=args.every),
                     validate=replace(config.validate, enabled=False), compare=replace(config.compare, control=False))
    pc = config.prompts
    train, _ = split_prompts(load_prompts(pc.path, dataset=pc.dataset, column=pc.column, split=pc.split),
                             pc.n_heldout, config.seed)
    org = make_organism(config.pair.base, reward_model(config.reward), config.organism, train, seed=config.seed,
                        device=config.pair.device, trust_remote_code=config.pair.trust_remote_code)
    rows = []
    for ckpt in [*org.checkpoints, org.path]:
        step = ckpt.name if ckpt != org.path else f"final ({config.organism.steps})"
        result = run(replace(config, pair=replace(config.pair, tuned=str(ckpt))), until="compare",
                     echo=lambda line: print(line, file=sys.stderr))
        compared = result.results["compare"]
        views = {r.name: r.to_json() for r in compared.agreement + compared.full_vocabulary}
        rows.append((step, views))
    print(f"{'checkpoint':<18} {'view':<22} {'tau':>7} {'95% CI':>17} {'sign+':>6} {'sign-':>6}")
    for step, views in rows:
        for name in ("log_ratio (no model)", "full_vocab_log_ratio", "sae_irm"):
            r = views.get(name)
            if r is None or r.get("tau") is None:
                continue
            ci = r.get("tau_ci") or [float("nan")] * 2
            print(f"{step:<18} {name:<22} {r['tau']:>+7.3f} [{ci[0]:+.3f},{ci[1]:+.3f}] "
                  f"{r['sign_acc_pos'] or 0:>6.2f} {r['sign_acc_neg'] or 0:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
