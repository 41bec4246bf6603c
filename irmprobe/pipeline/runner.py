"""One runner for the stage graph: ordering, ``until``, cascading ``force``, reuse, timings,
completion markers with checksums, and one progress line per stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

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
    done = _marker(directory, key)
    if done is None:
        return False
    bad = tuple(directory / rel for rel, digest in done["files"].items()
                if not (directory / rel).is_file() or sha256_file(directory / rel) != digest)
    if bad:
        raise CacheError(f"cached output {', '.join(str(p) for p in bad)} is missing or corrupted (checksum "
                         f"mismatch): the {done['stage']} stage recomputes it", bad)
    return True


def _marker(directory: Path, key: str) -> dict | None:
    """The completion marker in ``directory`` if it is of ``key`` (its checksums unchecked), else None."""
    try:
        done = json.loads((directory / DONE).read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("key") == key else None


class Planned(NamedTuple):
    """A stage as :meth:`Runner.plan` lists it."""

    ctx: Context
    name: str
    label: str
    """``name`` on the organism branch, ``<branch>/<name>`` on a control's."""
    key: str
    reused: bool
    """Its output is in the cache (completion marker of this key), and it is not forced."""


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
        self.pending: list[tuple[str, str]] = []
        """(label, key) of every stage this run computes rather than reuses, in the order it runs them."""
        self.against_reference: list[tuple[float, float]] = []
        """(seconds here, seconds in the reference run) of each stage run here with the reference's key."""

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

    def plan(self) -> list[Planned]:
        """Every stage :meth:`run` ensures on every branch, in the order it runs them, with its cache key and
        whether its output is already in the cache (nothing is computed)."""
        out: list[Planned] = []
        seen: set[tuple[str, str]] = set()

        def visit(ctx: Context, name: str) -> None:
            if (ctx.branch.name, name) in seen:
                return
            stage = self.graph[name]
            for need in stage.needs:
                visit(ctx, need)
            for cctx in self.controls if stage.control_needs else ():
                for need in stage.control_needs:
                    visit(cctx, need)
            seen.add((ctx.branch.name, name))
            out.append(Planned(ctx, name, _label(ctx, name), self._key(ctx, name), self._complete(ctx, name)))

        for name in self.order():
            visit(self.ctx, name)
        return out

    def run(self) -> dict[str, Any]:
        """Every stage up to ``until`` for the organism branch (controls as joint stages need them)."""
        # What this run will compute, not reuse: the stages the remaining-time estimate adds up.
        self.pending = [(p.label, p.key) for p in self.plan() if not p.reused]
        for name in self.order():
            self.ensure(self.ctx, name)
        return {name: self.results[("organism", name)] for name in self.order()}

    def _key(self, ctx: Context, name: str) -> str:
        """The cache key of stage ``name`` on ``ctx``'s branch: its declared config, its fingerprint and its inputs'
        keys. It needs no stage's output, so :meth:`run` knows every key before the first stage runs."""
        branch = ctx.branch.name
        if (branch, name) not in self.keys:
            stage = self.graph[name]
            input_keys = [self._key(ctx, need) for need in stage.needs]
            if not stage.needs and ctx.branch.is_control:
                # A control branch's root stages (hence all its stages) never share an output with the organism's.
                input_keys.append(f"{branch}:{ctx.train_reward.describe()}")
            input_keys += [self._key(c, n) for c in (self.controls if stage.control_needs else ())
                           for n in stage.control_needs]
            self.keys[(branch, name)] = stage.key(self.config, ctx, input_keys)
        return self.keys[(branch, name)]

    def _complete(self, ctx: Context, name: str) -> bool:
        """Whether ``name``'s output on this branch is in the cache and will be reused (its marker alone is read:
        the checksums are checked when the stage is reached)."""
        stage, key = self.graph[name], self._key(ctx, name)
        return stage.cached and name not in self.forced and _marker(stage_dir(name, key), key) is not None

    def result(self, name: str, branch: str = "organism") -> Any:
        return self.results[(branch, name)]

    def key(self, name: str, branch: str = "organism") -> str:
        return self.keys[(branch, name)]

    def inputs(self, ctx: Context, name: str) -> dict[str, Any]:
        """What stage ``name`` is handed on ``ctx``'s branch: each need's result (ensured first) and, for a joint
        stage, ``controls``: the results of its ``control_needs`` on every control branch."""
        stage = self.graph[name]
        inputs = {need: self.ensure(ctx, need) for need in stage.needs}
        if stage.control_needs:
            inputs["controls"] = [{n: self.ensure(c, n) for n in stage.control_needs} for c in self.controls]
        return inputs

    def ensure(self, ctx: Context, name: str) -> Any:
        branch = ctx.branch.name
        if (branch, name) in self.results:
            return self.results[(branch, name)]
        stage = self.graph[name]
        inputs = self.inputs(ctx, name)
        key, label = self._key(ctx, name), _label(ctx, name)
        out = stage_dir(name, key)
        cfg = stage.sections(self.config)
        start = time.perf_counter()
        ctx.echo(f"[{label}] ...")
        reuse, result, resumed = False, None, False
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
            if out.exists() and (name in self.forced or not stage.resumable or (out / DONE).is_file()):
                shutil.rmtree(out)
            # A resumable stage that picks up an interrupted run's files does part of its work: its time is no
            # guide to a whole run's (temporary files, named with a leading dot, are not a part done).
            resumed = stage.resumable and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())
            guess = self.estimate(label, key) if skipping is None else None
            if guess is not None and guess[0] >= ESTIMATE_FROM:
                whole = "it resumes an interrupted run; a whole one takes " if resumed else ""
                ctx.echo(f"[{label}] running: {whole}about {guess[0]:.0f} s ({guess[1]})" + self._left(label))
            if stage.cached:
                out.mkdir(parents=True, exist_ok=True)
            run_ctx = dataclasses.replace(ctx, forced=name in self.forced,
                                          input_keys={need: self._key(ctx, need) for need in stage.needs})
            result = stage.run(cfg, run_ctx, inputs, out)
            if stage.cached:
                mark_done(out, stage, key)
        self.seconds[label] = round(time.perf_counter() - start, 1)
        self.status[label] = "reused" if reuse else "ran"
        if not reuse and skipping is None and not resumed:  # a skip's instant is no guide to a real run's length
            _record_seconds(label, self.seconds[label], key)
            ref = _reference_seconds().get(label)
            if ref is not None and ref.get("key") == key:
                self.against_reference.append((self.seconds[label], ref["seconds"]))
        summary = stage.summary(result)
        ctx.echo(f"[{label}] {'reused the cached output' if reuse else 'done'} in {self.seconds[label]:.1f} s"
                 + (f": {summary}" if summary else ""))
        self.results[(branch, name)] = result
        return result

    def estimate(self, label: str, key: str) -> tuple[float, str] | None:
        """How long the stage ``label`` with cache key ``key`` should take here, and where that figure comes from.

        In order: its last run in this cache with the same key; the reference run's time for the same key (the
        same work: the embedded demo on 2 CPU cores, :data:`REFERENCE`), scaled by how this machine compares with
        the reference on the stages this run has computed so far; its last run with another key (a rough guide).
        None: no figure.
        """
        last = _last_seconds().get(label)
        if last is not None and last.get("key") == key:
            return last["seconds"], "its last run on this machine"
        ref = _reference_seconds().get(label)
        if ref is not None and ref.get("key") == key:
            factor = self.speed()
            return ref["seconds"] * (1.0 if factor is None else factor), (
                "a reference run on 2 CPU cores" + ("" if factor is None else
                                                    f", times {factor:.2f}: this machine's pace on the stages so far"))
        if last is not None:
            return last["seconds"], "its last run on this machine, " + ROUGH
        return None

    def speed(self) -> float | None:
        """This machine's time over the reference run's on the stages this run computed with the reference's keys
        (those of at least :data:`ESTIMATE_FROM` s there: short stages are mostly start-up); None before any."""
        pairs = [(here, ref) for here, ref in self.against_reference if ref >= ESTIMATE_FROM]
        return sum(h for h, _ in pairs) / sum(r for _, r in pairs) if pairs else None

    def _left(self, label: str) -> str:
        """The rest of the run from stage ``label`` on (that stage included), as the end of its estimate line."""
        labels = [lab for lab, _ in self.pending]
        if label not in labels:
            return ""
        rest = self.pending[labels.index(label):]
        guesses = [self.estimate(lab, key) for lab, key in rest]
        known = sum(g[0] for g in guesses if g is not None)
        unknown = sum(g is None for g in guesses)
        rough = sum(g is not None and g[1].endswith(ROUGH) for g in guesses)
        if len(rest) == 1 or known == 0:
            return ""
        return (f"; the run's {len(rest)} stages left from here: about {_duration(known)}"
                + (f", {rough} of them timed by a run with other settings or inputs" if rough else "")
                + (f", {unknown} of them with no figure and not counted" if unknown else ""))


def _label(ctx: Context, name: str) -> str:
    return name if ctx.branch.name == "organism" else f"{ctx.branch.name}/{name}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


ROUGH = "with other settings or inputs: a rough guide"


REFERENCE = Path(__file__).resolve().parent.parent / "data" / "reference_seconds.json"
"""Each stage's time in a cold ``make demo`` on 2 CPU cores, with its cache key (``scripts/reference_timings.py``
writes it from that run's cache): a first run of the same work starts each stage with an estimate."""


def _reference_seconds() -> dict:
    """``{label: {"seconds": s, "key": key}}`` of :data:`REFERENCE`; empty if it is missing or unreadable."""
    try:
        return json.loads(REFERENCE.read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


ESTIMATE_FROM = 30.0
"""Seconds from which a stage's estimate is printed before it runs; the reference stages shorter than this are
left out of this machine's pace (mostly start-up)."""


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
