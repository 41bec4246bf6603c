#!/usr/bin/env python
"""Sweep one setting (layers kept, SAE size, sparsity, IRM estimator...) and compare the IRM views.

Each value runs the pipeline up to the comparison (stages the value does not touch are reused from
the cache) and prints the SAE IRM's and the log-ratio's tau, with 95% CIs, per value.

    python scripts/sweep.py configs/default.yaml --field sae.expansion --values 1 2 4
    python scripts/sweep.py configs/default.yaml --field capture.top_k_layers --values 1 3 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded SmolLM2 VADER organism)")
    parser.add_argument("--field", required=True, help="SECTION.FIELD to sweep, e.g. sae.expansion")
    parser.add_argument("--values", nargs="+", required=True, help="values (parsed as JSON where possible)")
    args = parser.parse_args(argv)

    from irmprobe.api import run
    from irmprobe.cli import apply_overrides
    from irmprobe.config import RunConfig

    base = RunConfig.from_yaml(args.config).to_dict() if args.config else RunConfig().to_dict()
    base["compare"]["control"] = False  # the sweep compares settings, not organisms
    print(f"{args.field:<20} {'view':<22} {'tau':>7} {'95% CI':>17} {'text tau':>8}")
    for value in args.values:
        data = apply_overrides(json.loads(json.dumps(base)), [f"{args.field}={value}"])
        data["validate"]["enabled"] = False
        result = run(RunConfig.from_dict(data), until="compare", echo=lambda line: print(line, file=sys.stderr))
        for r in (row.to_json() for row in result.results["compare"].agreement):
            if r["name"] in ("log_ratio (no model)", "sae_irm") and r.get("tau") is not None:
                ci = r.get("tau_ci") or [float("nan")] * 2
                text = f"{r['text_tau']:+.3f}" if r.get("text_tau") is not None else "-"
                print(f"{value:<20} {r['name']:<22} {r['tau']:>+7.3f} [{ci[0]:+.3f},{ci[1]:+.3f}] {text:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
