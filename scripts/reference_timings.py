"""Write the reference timings a first run prints its estimates from (irmprobe/data/reference_seconds.json).

Run it after a cold ``make demo`` on a quiet 2-core machine, pointing at the cache that run filled:

    IRMPROBE_CACHE=<that cache> .venv/bin/python scripts/reference_timings.py --machine "2-core Xeon, quiet"

It plans the config's run (every stage on every branch, with its cache key), takes each stage's time from the
cache's record of its last run (``stage-seconds.json``), and writes one entry per stage: its seconds and its key.
A stage whose output is complete but that left no time skipped its work (the seeds stage with ``seeds.checks: 0``)
and is written with 0 s. The runner uses an entry only for a stage of the same key (the same work), so entries
go stale one by one as stages or their settings change, and such a stage starts with no reference estimate.
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


def reference(config, echo=lambda _: None) -> dict:
    """``{label: {"seconds", "key"}}`` for every stage the run of ``config`` plans, from the cache's records.

    Raises:
        ValueError: a planned stage has neither a recorded time of its key nor a complete output (the cache holds
            no complete run of this config, or its times come from other settings).
    """
    from irmprobe.api import prepare
    from irmprobe.pipeline.runner import _last_seconds

    recorded = _last_seconds()
    stages, missing = {}, []
    for p in prepare(config, echo=echo).plan():
        last = recorded.get(p.label)
        if last is not None and last.get("key") == p.key:
            stages[p.label] = {"seconds": last["seconds"], "key": p.key}
        elif p.reused:  # complete, yet no time of this key: it skipped (a skip's instant is never recorded)
            stages[p.label] = {"seconds": 0.0, "key": p.key}
        else:
            missing.append(p.label)
    if missing:
        raise ValueError(f"no recorded time of this config's run for {', '.join(missing)} in this cache: run the "
                         "config in it first (a cold `make demo` with IRMPROBE_CACHE pointing here)")
    return stages


def main(argv: list[str] | None = None) -> None:
    from irmprobe.cache import write_json
    from irmprobe.config import RunConfig
    from irmprobe.pipeline.runner import REFERENCE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--machine", required=True, help="the machine the cold run was timed on, in words")
    ap.add_argument("--out", default=str(REFERENCE))
    args = ap.parse_args(argv)
    stages = reference(RunConfig.from_yaml(args.config))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    data = {"config": os.path.relpath(args.config, ROOT), "machine": args.machine, "cpus": os.cpu_count(),
            "python": platform.python_version(), "written": datetime.date.today().isoformat(),
            "commit": commit or None, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
            "stages": stages}
    write_json(Path(args.out), data)
    print(f"{args.out}: {len(stages)} stages, {data['total_seconds'] / 60:.1f} min in all")


if __name__ == "__main__":
    sys.exit(main())
