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
    sub.add_parser("pairs", help="list the named pairs of the registry")
    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("config", nargs="?", help="YAML config (default: the embedded SmolLM2 VADER organism)")
    run.add_argument("--pair", metavar="NAME", help="start from a named pair of the registry (irmprobe pairs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override one config field, e.g. --set organism.steps=10 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pairs":
        from irmprobe.pairs import registry

        for name, entry in registry().items():
            pair = entry["pair"]
            print(f"{name:<22} base={pair['base']}  tuned={pair.get('tuned') or '(organism)'}")
            print(f"{'':<22} {entry.get('description', '')}")
        return 0
    if args.command == "run":
        import yaml

        data: dict = {}
        try:
            if args.pair:
                from irmprobe.pairs import registry_entry

                data = registry_entry(args.pair)
            if args.config:
                with open(args.config) as fh:
                    loaded = yaml.safe_load(fh) or {}
                if not isinstance(loaded, dict):
                    raise ValueError(f"{args.config}: a config must be a mapping of sections")
                for section, values in loaded.items():
                    if isinstance(values, dict) and isinstance(data.get(section), dict):
                        data[section] = data[section] | values
                    else:
                        data[section] = values
            config = RunConfig.from_dict(apply_overrides(data, args.overrides))
        except (ValueError, TypeError, OSError) as exc:
            print(f"irmprobe: invalid config: {exc}", file=sys.stderr)
            return 2
        from irmprobe.pipeline import run

        result = run(config)
        print(f"metrics: {result.metrics_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
