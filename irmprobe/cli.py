"""Command line: ``irmprobe run [CONFIG.yaml] [--set section.field=value ...]``, one subcommand
per stage (each runs the stages before it, reusing their cached output), and ``irmprobe report``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from irmprobe.config import RunConfig, field_docs


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


# Subcommand -> (the last pipeline stage it runs, the config sections it reads, what it does).
COMMANDS = {
    "run": (None, None, "run the whole pipeline (every stage, each reused from the cache when unchanged)"),
    "organism": ("organism", ("pair", "reward", "prompts", "organism"), "build (or reuse) the tuned model"),
    "divergence": ("layers", ("capture",), "rank blocks by weight divergence and print the table"),
    "capture": ("capture", ("samples", "capture"), "sample held-out continuations and capture both models"),
    "saes": ("saes", ("sae",), "train (or load) the SAEs and measure them"),
    "fit": ("fit", ("irm", "compare"), "fit every IRM view (and the control organism's)"),
    "compare": ("compare", ("compare",), "compare the IRM views with the RM"),
    "interpret": ("interpret", ("validate", "llm"), "explain and judge the IRM's features"),
    "ablate": ("ablate", ("validate",), "ablate feature sets in the tuned model and measure reward"),
}


def _config_help(sections) -> str:

    top = RunConfig()
    lines = ["config fields this command reads (set in YAML or with --set section.field=value):"]
    for section in sections:
        value = getattr(top, section)
        docs = field_docs(type(value))
        lines.append(f"  {section}:")
        for f in fields(value):
            lines.append(f"    {f.name} = {getattr(value, f.name)!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irmprobe",
        description="Measure how far an RLHF-tuned model's implicit reward model diverges from its RM.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pairs", help="list the named pairs of the registry")
    for name, (_, sections, text) in COMMANDS.items():
        shown = sections or tuple(f.name for f in fields(RunConfig) if f.name != "seed")
        cmd = sub.add_parser(name, help=text, description=text + ". Earlier stages run first (or are reused).",
                             epilog=_config_help(shown), formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("config", nargs="?", help="YAML config (default: the embedded SmolLM2 VADER organism)")
        cmd.add_argument("--pair", metavar="NAME", help="start from a named pair of the registry (irmprobe pairs)")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override one config field, e.g. --set organism.steps=10 (repeatable)")
        cmd.add_argument("--force", action="append", default=[], metavar="STAGE",
                         help="re-run STAGE and every later stage even if cached (repeatable); stages: "
                              "organism layers samples capture saes fit compare interpret ablate report")
        noise = cmd.add_mutually_exclusive_group()
        noise.add_argument("--quiet", action="store_true", help="no progress bars or stage lines; the summary only")
        noise.add_argument("--verbose", action="store_true", help="log every library message at INFO")
    report = sub.add_parser("report", help="write the HTML report of a finished run from its metrics.json")
    report.add_argument("metrics", help="a run's metrics.json")
    report.add_argument("--out", help="the HTML file to write (default: report.html beside metrics.json)")
    return parser


def _load_config(args) -> RunConfig:
    import yaml

    data: dict = {}
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
    return RunConfig.from_dict(apply_overrides(data, args.overrides))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pairs":
        from irmprobe.pairs import registry

        for name, entry in registry().items():
            pair = entry["pair"]
            print(f"{name:<22} base={pair['base']}  tuned={pair.get('tuned') or '(organism)'}")
            print(f"{'':<22} {entry.get('description', '')}")
        return 0
    if args.command == "report":
        from pathlib import Path

        from irmprobe.reporting import write_html

        metrics_path = Path(args.metrics)
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"irmprobe: cannot read {metrics_path}: {exc}", file=sys.stderr)
            return 2
        out = write_html(metrics, Path(args.out) if args.out else metrics_path.with_name("report.html"))
        print(f"report: {out}")
        return 0
    try:
        config = _load_config(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"irmprobe: invalid config: {exc}", file=sys.stderr)
        return 2
    import logging
    import os

    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from irmprobe.pipeline import run

    until = COMMANDS[args.command][0]
    echo = (lambda line: None) if args.quiet else print
    try:
        result = run(config, until=until, force=tuple(args.force), echo=echo)
    except ValueError as exc:
        print(f"irmprobe: {exc}", file=sys.stderr)
        return 2
    if result.metrics_path is None:
        print(f"stopped after stage {until!r}; its output is cached (irmprobe run reuses it)")
    else:
        if args.quiet:
            from irmprobe.reporting import summary_lines

            print("\n".join(summary_lines(result.metrics)))
        print(f"report: {result.metrics_path.with_name('report.html')}")
        print(f"metrics: {result.metrics_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
