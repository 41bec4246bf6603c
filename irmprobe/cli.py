"""Command line: ``irmprobe run [CONFIG.yaml] [--set section.field=value ...]``, one subcommand
per stage (each runs the stages before it, reusing their cached output), and ``irmprobe report``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

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


def _stage_help(name: str) -> dict[str, str]:
    """What one stage does, for its subcommand (the first line of its class docstring or a default)."""
    return {
        "organism": "build (or reuse) the tuned model",
        "samples": "sample held-out continuations of both models",
        "layers": "rank blocks by how much the tuning changed them and print the table",
        "capture": "capture both models' activations and log-probs on the held-out text",
        "saes": "train (or load) the SAEs and measure them",
        "fit": "fit every IRM view on training sequences and score it on held-out ones",
        "compare": "compare the IRM views with the RM next to the matched control organism(s)",
        "discover": "find what the tuned model rewards beyond the RM, and score the IRM as a reward model",
        "depth": "per block, how much of the log-ratio the residual stream's change holds (direct path, logit lens)",
        "attribute": "attribute the implicit reward to SAE features and errors; faithfulness and completeness curves",
        "seeds": "redo the attribution with its dictionaries trained with other seeds: does the named set hold?",
        "interpret": "explain and judge the IRM's features",
        "ablate": "ablate feature sets in the tuned model and measure reward",
        "dashboard": "the report's coloured text views and feature cards",
        "report": "write metrics.json, the HTML report and the W&B run",
    }.get(name, name)


def _upstream(name: str) -> list:
    """The stage and every stage it needs (transitively), in graph order."""
    from irmprobe.pipeline.graph import GRAPH

    by_name = {s.name: s for s in GRAPH}
    seen: set[str] = set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for need in by_name[n].needs + by_name[n].control_needs:
            visit(need)

    visit(name)
    return [s for s in GRAPH if s.name in seen]


def reads_of(name: str | None) -> list[str]:
    """The config fields a subcommand's stages read (its own and its upstream stages'), from their declarations."""
    from irmprobe.pipeline.graph import GRAPH

    stages = GRAPH if name is None else _upstream(name)
    out: list[str] = []
    for stage in stages:
        for read in stage.reads:
            if read not in out:
                out.append(read)
    return out


def _config_help(reads: list[str]) -> str:
    top = RunConfig()
    lines = ["config fields this command reads (set in YAML or with --set section.field=value):"]
    for section in dict.fromkeys(r.split(".")[0] for r in reads):
        value = getattr(top, section)
        if section == "seed":
            lines.append(f"  seed = {value!r}: {field_docs(RunConfig).get('seed', '')}")
            continue
        names = [r.split(".", 1)[1] for r in reads if r.startswith(section + ".")]
        docs = field_docs(type(value))
        lines.append(f"  {section}:")
        for f in fields(value):
            if section in reads or f.name in names:
                lines.append(f"    {f.name} = {getattr(value, f.name)!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irmprobe",
        description="Measure how far an RLHF-tuned model's implicit reward model diverges from its RM.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pairs", help="list the named pairs of the registry")
    from irmprobe.pipeline.graph import STAGES

    commands = {"run": (None, "run the whole pipeline (every stage, each reused from the cache when unchanged)")}
    commands |= {name: (name, _stage_help(name)) for name in STAGES if name != "report"}
    for name, (stage, text) in commands.items():
        cmd = sub.add_parser(name, help=text, description=text + ". Earlier stages run first (or are reused).",
                             epilog=_config_help(reads_of(stage)), formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(until=stage)
        cmd.add_argument("config", nargs="?", help="YAML config (default: the embedded SmolLM2 VADER organism)")
        cmd.add_argument("--pair", metavar="NAME", help="start from a named pair of the registry (irmprobe pairs)")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override one config field, e.g. --set organism.steps=10 (repeatable)")
        cmd.add_argument("--force", action="append", default=[], metavar="STAGE", choices=STAGES,
                         help="re-run STAGE and every stage that needs it even if cached (repeatable); stages: "
                              + " ".join(STAGES))
        noise = cmd.add_mutually_exclusive_group()
        noise.add_argument("--quiet", action="store_true", help="no progress bars or stage lines; the summary only")
        noise.add_argument("--verbose", action="store_true", help="log every library message at INFO, and TRL's "
                                                                  "per-step logs")
    text = "score preference pairs with the run's IRM, the summed log-ratio (DPO implicit reward) and the RM"
    score = sub.add_parser("score-pairs", help=text, description=text + ". The stages up to fit run first (or are "
                           "reused); prints each scorer's pairwise accuracy and its agreement with the RM's choice.")
    score.add_argument("config", help="YAML config of the run whose IRM scores the pairs")
    score.add_argument("pairs", help="preference pairs with columns prompt, chosen, rejected (.jsonl or .csv)")
    score.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one config field (repeatable)")
    score.set_defaults(pair=None)
    report = sub.add_parser("report", help="write the HTML report of a finished run from its metrics.json")
    report.add_argument("metrics", help="a run's metrics.json")
    report.add_argument("--out", help="the HTML file to write (default: report.html beside metrics.json)")
    return parser


def _load_config(args) -> RunConfig:
    data: dict = {}
    if args.pair:
        from irmprobe.models.registry import registry_entry

        data = registry_entry(args.pair)
    if args.config:
        from pathlib import Path

        from irmprobe.config import _read_yaml

        loaded = _read_yaml(Path(args.config)) or {}  # one line with file and line for a file that is not YAML
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: a config must be a mapping of sections")
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section] = data[section] | values
            else:
                data[section] = values
    return RunConfig.from_dict(apply_overrides(data, args.overrides))


def _score_pairs(args) -> int:
    """``irmprobe score-pairs CONFIG PAIRS``: progress on stderr, the accuracy table on stdout."""
    from irmprobe.analysis.discovery import load_preference_file
    from irmprobe.api import run
    from irmprobe.pipeline.stages.discover import pairwise_rows, score_file_pairs
    from irmprobe.reporting.summary import pairwise_lines

    try:
        config = _load_config(args)
        pairs = load_preference_file(args.pairs)
        result = run(config, until="fit", echo=lambda line: print(line, file=sys.stderr))
    except (ValueError, TypeError, OSError) as exc:
        print(f"irmprobe: {exc}", file=sys.stderr)
        return 2
    r, ctx = result.results, result.context
    scores = score_file_pairs(pairs, ctx.pair_of(r["organism"]), r["fit"], r["saes"].saes, r["layers"].chosen,
                              config.capture.hook, ctx.rm)
    print(f"pairwise accuracy on {len(pairs)} pairs from {pairs.source} (Wilson 95% CIs; ties count half)")
    print("\n".join(pairwise_lines([row.to_json() for row in pairwise_rows(scores)])))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "score-pairs":
        return _score_pairs(args)
    if args.command == "pairs":
        from irmprobe.models.registry import registry

        for name, entry in registry().items():
            pair = entry["pair"]
            print(f"{name:<22} base={pair['base']}  tuned={pair.get('tuned') or '(organism)'}")
            print(f"{'':<22} {entry.get('description', '')}")
        return 0
    if args.command == "report":
        from irmprobe.reporting.html import write_html
        from irmprobe.results import RunMetrics

        metrics_path = Path(args.metrics)
        try:
            metrics = RunMetrics.from_json(json.loads(metrics_path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
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
    from irmprobe.api import run

    until = args.until
    echo = (lambda line: None) if args.quiet else print
    if args.verbose:
        os.environ["IRMPROBE_TRL_VERBOSE"] = "1"  # TRL's per-step dicts on the terminal too
        log_path = None
    else:
        # Library bars, warnings and messages (TRL's per-step logs among them) go to the run's log file.
        log_path = Path(config.report.out_dir) / "irmprobe.log"
    from irmprobe.console import library_output_to

    try:
        with library_output_to(log_path):
            result = run(config, until=until, force=tuple(args.force), echo=echo)
    except ValueError as exc:
        print(f"irmprobe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("irmprobe: interrupted; completed stages are cached, so running the same command again resumes",
              file=sys.stderr)
        return 130
    if result.metrics_path is None:
        print(f"stopped after stage {until!r}; its output is cached (irmprobe run reuses it)")
    else:
        if args.quiet:
            from irmprobe.reporting.summary import summary_lines

            print("\n".join(summary_lines(result.metrics)))
        print(f"report: {result.metrics_path.with_name('report.html')}")
        print(f"metrics: {result.metrics_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
