"""Command line: ``irmprobe run [CONFIG.yaml] [--set section.field=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys

from irmprobe.config import RunConfig


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` overrides (values parsed as JSON where possible)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        dotted, value = item.split("=", 1)
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irmprobe",
        description="Measure how far an RLHF-tuned model's implicit reward model diverges from its RM.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("config", nargs="?", help="YAML config (default: the embedded SmolLM2 VADER organism)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override one config field, e.g. --set organism.steps=10 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        import yaml

        data = {}
        if args.config:
            with open(args.config) as fh:
                data = yaml.safe_load(fh) or {}
        try:
            config = RunConfig.from_dict(apply_overrides(data, args.overrides))
        except (ValueError, TypeError) as exc:
            print(f"irmprobe: invalid config: {exc}", file=sys.stderr)
            return 2
        from irmprobe.pipeline import run

        result = run(config)
        print(f"metrics: {result.metrics_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
