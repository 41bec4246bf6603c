"""Write the reference timings a first run prints its estimates from (irmprobe/data/reference_seconds.json).

Run it after a cold ``make demo`` on a quiet 2-core machine, pointing at the cache that run filled:

    IRMPROBE_CACHE=<that cache> .venv/bin/python scripts/reference_timings.py --machine "2-core Xeon, quiet"

It plans the config's run (every stage on every branch, with its cache key), takes each stage's time from the
cache's record of its last run (``stage-seconds.json``), and writes one entry per stage: its seconds and its key.
A stage whose output is complete but that left no time is written with 0 s where its own ``skips`` rule says it
did no work (the seeds stage with ``seeds.checks: 0``); any other stage without a time of its key is an error (a
record overwritten by a later run with other settings, or a stage resumed after an interruption). The runner
uses an entry only for a stage of the same key (the same work); tests/unit/test_stage_graph.py fails when an
entry is no longer of the demo's current work, so rewrite the file whenever a stage of the demo changes: rerun
`make demo` in the cache that wrote it (only what changed runs again), then this script.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def reference(runner) -> dict:
    """``{label: {"seconds", "key"}}`` for every stage ``runner`` (:func:`irmprobe.api.prepare`) plans, from the
    cache's records.

    Raises:
        ValueError: a planned stage has no recorded time of its key and did not skip (the cache holds no complete
            run of this config, a later run with other settings overwrote the record, or the stage resumed).
    """
    from irmprobe.pipeline.runner import _last_seconds

    recorded = _last_seconds()
    stages, missing = {}, []
    for p in runner.plan():
        last = recorded.get(p.label)
        if last is not None and last.get("key") == p.key:
            stages[p.label] = {"seconds": last["seconds"], "key": p.key}
        elif p.reused and _skips(runner, p):  # a skip's instant is never recorded: it took no time
            stages[p.label] = {"seconds": 0.0, "key": p.key}
        else:
            missing.append(p.label)
    if missing:
        raise ValueError(f"no recorded time of this config's run for {', '.join(missing)} in this cache: run the "
                         "config in it first (a cold `make demo` with IRMPROBE_CACHE pointing here)")
    return stages


def _skips(runner, p) -> bool:
    """Whether the planned stage ``p`` does no work on its settings and inputs (its own ``skips`` rule, given its
    inputs' cached outputs)."""
    stage = runner.graph[p.name]
    return stage.skips(stage.sections(runner.config), p.ctx, runner.inputs(p.ctx, p.name)) is not None


def main(argv: list[str] | None = None) -> None:
    from irmprobe.api import prepare
    from irmprobe.cache import write_json
    from irmprobe.config import RunConfig
    from irmprobe.pipeline.runner import REFERENCE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--machine", required=True, help="the machine the cold run was timed on, in words")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="the CPU cores of that machine (default: "
                    "this machine's)")
    ap.add_argument("--commit", help="the commit the cold run ran (default: this checkout's, marked -dirty if it "
                    "has changes)")
    ap.add_argument("--out", default=str(REFERENCE))
    args = ap.parse_args(argv)
    stages = reference(prepare(RunConfig.from_yaml(args.config), echo=lambda _: None))
    commit = args.commit or subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                           capture_output=True, text=True).stdout.strip()
    data = {"config": os.path.relpath(args.config, ROOT), "machine": args.machine, "cpus": args.cpus,
            "python": platform.python_version(), "written": datetime.date.today().isoformat(),
            "commit": commit or None, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
            "stages": stages}
    write_json(Path(args.out), data)
    print(f"{args.out}: {len(stages)} stages, {data['total_seconds'] / 60:.1f} min in all")


if __name__ == "__main__":
    sys.exit(main())
