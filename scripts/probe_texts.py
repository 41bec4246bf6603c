#!/usr/bin/env python
"""Probe a pair on your own texts: each token's IRM value next to the RM's, highlighted.

Runs (or reuses from the cache) every stage up to the IRM fit for CONFIG, then runs both models
over your texts and scores each token with the primary IRM (``sae_irm``), beside the raw
log-ratio log p_tuned - log p_base and the RM's value of the token (blank where it has none).

    python scripts/probe_texts.py configs/default.yaml --text "What a lovely, awful day"
    python scripts/probe_texts.py configs/default.yaml --file my_texts.txt --html probe.html
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _colour(value: float, scale: float) -> str:
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    return f"rgba(0,160,0,{x:.2f})" if x > 0 else f"rgba(200,0,0,{-x:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded SmolLM2 VADER organism)")
    parser.add_argument("--text", action="append", default=[], help="a text to probe (repeatable)")
    parser.add_argument("--file", type=Path, help="a file with one text per line")
    parser.add_argument("--html", type=Path, help="also write the tokens, coloured by IRM value, to this HTML file")
    args = parser.parse_args(argv)
    texts = list(args.text) + ([t for t in args.file.read_text().splitlines() if t.strip()] if args.file else [])
    if not texts:
        parser.error("give at least one --text or a --file")

    from irmprobe.api import FittedIRM
    from irmprobe.config import RunConfig

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    irm = FittedIRM(config, echo=lambda line: print(line, file=sys.stderr))
    blocks = []
    for text, summary in zip(texts, irm.score(texts)):
        rows = irm.token_values(text)
        print(f"\n{text!r}\n  IRM score {summary['irm']:+.3f}   log-ratio sum {summary['log_ratio']:+.3f}   "
              f"RM reward {summary['rm']:+.3f}")
        print(f"  {'token':<16} {'IRM':>8} {'log-ratio':>10} {'RM':>6}")
        for r in rows:
            rm = "" if r["rm"] is None else f"{r['rm']:+.2f}"
            print(f"  {r['token']!r:<16} {r['irm']:>+8.3f} {r['log_ratio']:>+10.3f} {rm:>6}")
        scale = max(abs(r["irm"]) for r in rows)
        spans = "".join(f'<span title="IRM {r["irm"]:+.3f}, RM {r["rm"]}" style="background:{_colour(r["irm"], scale)}">'
                        f"{html.escape(r['token'])}</span>" for r in rows)
        blocks.append(f"<p>{spans}<br><small>IRM {summary['irm']:+.3f}, RM {summary['rm']:+.3f}</small></p>")
    if args.html:
        args.html.write_text("<!doctype html><meta charset='utf-8'><h1>IRM per token</h1>" + "".join(blocks))
        print(f"\nwrote {args.html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
