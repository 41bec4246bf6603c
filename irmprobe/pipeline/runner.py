"""One runner for the stage graph: ordering, ``until``, cascading ``force``, reuse, timings,
completion markers with checksums, and one progress line per stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from irmprobe.cache import cache_root, sha256_file, write_json
from irmprobe.config import RunConfig
from irmprobe.pipeline.stage import Context, Stage

DONE = "done.json"
"""Written last into a stage's directory: the stage's key and the checksum of every file it wrote."""


class CacheError(ValueError):
    """A cached stage output no longer matches its completion marker (``bad``: the files at fault)."""

    def __init__(self, message: str, bad: tuple[Path, ...] = ()) -> None:
        super().__init__(message)
        self.bad = bad


def stage_dir(name: str, key: str) -> Path:
    return cache_root() / "stages" / name / key




def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the marker itself, by relative path."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != DONE and not p.name.startswith(".")}


def mark_done(directory: Path, stage: Stage, key: str) -> None:
    write_json(directory / DONE, {"stage": stage.name, "version": stage.version, "key": key,
                                  "files": checksums(directory)})


def verify(directory: Path, key: str) -> bool:
    """True when ``directory`` holds a completed output of ``key`` whose files match their checksums.

    Raises:
        CacheError: a file was changed or removed after the stage completed.
    """
    marker = directory / DONE
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    if done.get("key") != key:
        return False
    bad = tuple(directory / rel for rel, digest in done["files"].items()
                if not (directory / rel).is_file() or sha256_file(directory / rel) != digest)
    if bad:
        raise CacheError(f"cached output {', '.join(str(p) for p in bad)} is missing or corrupted (checksum "
                         f"mismatch): the {done['stage']} stage recomputes it", bad)
    return True


class Runner:
    """Runs the stages of ``graph`` in dependency order, per branch, reusing completed outputs.

    Args:
        graph: every stage, in the order their names are listed to users.
        config: the run's config; each stage sees only what it declares.
        ctx: the organism branch's context.
        controls: one context per control branch (empty: no control).
        force: stage names to run again; every stage that depends on one is forced too.
        until: stop after this stage.
    """

    def __init__(self, graph: list[Stage], config: RunConfig, ctx: Context, controls: list[Context], *,
                 force: tuple[str, ...] = (), until: str | None = None) -> None:
        self.graph = {s.name: s for s in graph}
        for name in ((until,) if until else ()) + tuple(force):
            if name not in self.graph:
                raise ValueError(f"unknown stage {name!r}: stages are {', '.join(self.graph)}")
        self.config, self.ctx, self.controls, self.until = config, ctx, controls, until
        self.forced = {name for name in self.graph if self._depends_on(name, set(force))}
        self.results: dict[tuple[str, str], Any] = {}
        self.keys: dict[tuple[str, str], str] = {}
        self.seconds: dict[str, float] = {}
        self.status: dict[str, str] = {}

    def _depends_on(self, name: str, targets: set[str]) -> bool:
        stage = self.graph[name]
        return name in targets or any(self._depends_on(n, targets) for n in stage.needs + stage.control_needs)

    def order(self) -> list[str]:
        """Stage names in the order they run (their needs first), up to ``until``."""
        out: list[str] = []

        def visit(name):
            for need in self.graph[name].needs + self.graph[name].control_needs:
                visit(need)
            if name not in out:
                out.append(name)

        for name in self.graph:
            visit(name)
            if name == self.until:
                break
        return out

    def run(self) -> dict[str, Any]:
        """Every stage up to ``until`` for the organism branch (controls as joint stages need them)."""
        for name in self.order():
            self.ensure(self.ctx, name)
        return {name: self.results[("organism", name)] for name in self.order()}

    def result(self, name: str, branch: str = "organism") -> Any:
        return self.results[(branch, name)]

    def key(self, name: str, branch: str = "organism") -> str:
        return self.keys[(branch, name)]

    def ensure(self, ctx: Context, name: str) -> Any:
        branch = ctx.branch.name
        if (branch, name) in self.results:
            return self.results[(branch, name)]
        stage = self.graph[name]
        for need in stage.needs:
            self.ensure(ctx, need)
        inputs = {need: self.results[(branch, need)] for need in stage.needs}
        input_keys = [self.keys[(branch, need)] for need in stage.needs]
        if not stage.needs and ctx.branch.is_control:
            # A control branch's root stages (hence all its stages) never share an output with the organism's.
            input_keys.append(f"{branch}:{ctx.train_reward.describe()}")
        if stage.control_needs:
            for cctx in self.controls:
                for need in stage.control_needs:
                    self.ensure(cctx, need)
            inputs["controls"] = [{n: self.results[(c.branch.name, n)] for n in stage.control_needs}
                                  for c in self.controls]
            input_keys += [self.keys[(c.branch.name, n)] for c in self.controls for n in stage.control_needs]
        key = stage.key(self.config, ctx, input_keys)
        label = name if branch == "organism" else f"{branch}/{name}"
        out = stage_dir(name, key)
        cfg = stage.sections(self.config)
        start = time.perf_counter()
        ctx.echo(f"[{label}] ...")
        reuse, result = False, None
        if stage.cached and name not in self.forced:
            try:
                if verify(out, key):
                    result, reuse = stage.load(cfg, ctx, inputs, out), True
            except CacheError as exc:
                # A resumable stage recomputes only the files at fault; any other stage runs again whole.
                ctx.echo(f"[{label}] {exc}")
                (out / DONE).unlink(missing_ok=True)
                for path in exc.bad:
                    path.unlink(missing_ok=True)
        skipping = None if reuse else stage.skips(cfg, ctx, inputs)
        if not reuse:
            last = _last_seconds().get(label)
            if skipping is None and last is not None and last["seconds"] >= ESTIMATE_FROM:
                same = last.get("key") == key
                ctx.echo(f"[{label}] running: about {last['seconds']:.0f} s (its last run on this machine"
                         + ("" if same else ", with other settings or inputs: a rough guide") + ")")
            if out.exists() and (name in self.forced or not stage.resumable or (out / DONE).is_file()):
                shutil.rmtree(out)
            if stage.cached:
                out.mkdir(parents=True, exist_ok=True)
            run_ctx = dataclasses.replace(ctx, forced=name in self.forced,
                                          input_keys=dict(zip(stage.needs, input_keys)))
            result = stage.run(cfg, run_ctx, inputs, out)
            if stage.cached:
                mark_done(out, stage, key)
        self.seconds[label] = round(time.perf_counter() - start, 1)
        self.status[label] = "reused" if reuse else "ran"
        if not reuse and skipping is None:  # a skip's instant says nothing of the next real run's length
            _record_seconds(label, self.seconds[label], key)
        summary = stage.summary(result)
        ctx.echo(f"[{label}] {'reused the cached output' if reuse else 'done'} in {self.seconds[label]:.1f} s"
                 + (f": {summary}" if summary else ""))
        self.results[(branch, name)] = result
        self.keys[(branch, name)] = key
        return result


ESTIMATE_FROM = 30.0
"""Seconds a stage took last time above which its next run starts with an estimate of its length."""


def _timings_path() -> Path:
    return cache_root() / "stage-seconds.json"


def _last_seconds() -> dict:
    """Each stage's last run in this cache: ``{label: {"seconds": s, "key": its key}}`` (an estimate shown when it
    runs again; an older file's bare seconds read with no key)."""
    try:
        data = json.loads(_timings_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v if isinstance(v, dict) else {"seconds": float(v), "key": None} for k, v in data.items()
            if isinstance(v, (dict, int, float))}


def _record_seconds(label: str, seconds: float, key: str) -> None:
    try:
        write_json(_timings_path(), _last_seconds() | {label: {"seconds": seconds, "key": key}})
    except OSError:
        pass  # an estimate is a convenience: a read-only cache must not fail the run
