"""The Stage protocol: what a stage reads, what it needs, and how its cache key follows from both.

A stage declares its ``name``, a ``version``, the config it ``reads`` (whole sections such as
``"irm"``, single fields such as ``"irm.inputs"``, or the top-level ``"seed"``) and the stages it
``needs``. The runner hands it only what it declared (:class:`Sections`), so a setting the stage
uses can never be missing from its key: reading an undeclared section raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from irmprobe.cache import config_key
from irmprobe.config import RunConfig, Runtime


def digest(obj) -> str:
    """A short hash of a JSON-able object (the prompts, a settings dict) for a fingerprint or memo key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_result(out: Path, name: str = "result.json") -> dict:
    """A stage's JSON result read back from its output directory."""
    return json.loads((out / name).read_text())


def declared_values(config: RunConfig, reads: tuple[str, ...]) -> dict[str, Any]:
    """``{"irm": IRMConfig(...), "compare.n_triples": 200, "seed": 0}`` for a stage's ``reads``."""
    out = {}
    for name in reads:
        section, _, fname = name.partition(".")
        if not hasattr(config, section):
            raise ValueError(f"a stage reads {name!r}, which is not a section of RunConfig")
        value = getattr(config, section)
        if fname:
            if not dataclasses.is_dataclass(value) or not hasattr(value, fname):
                raise ValueError(f"a stage reads {name!r}, which is not a field of RunConfig.{section}")
            value = getattr(value, fname)
        out[name] = value
    return out


class _Section:
    """The declared fields of one section (a stage that read only ``irm.inputs`` sees just that)."""

    def __init__(self, section: str, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(f"this stage did not declare {object.__getattribute__(self, '_section')}.{name} "
                                 "in its reads: add it, so that it enters the stage's cache key")
        return values[name]


class Sections:
    """The part of a :class:`RunConfig` a stage declared; anything else raises AttributeError."""

    def __init__(self, config: RunConfig, reads: tuple[str, ...]) -> None:
        values: dict[str, Any] = {}
        for name, value in declared_values(config, reads).items():
            section, _, fname = name.partition(".")
            if fname:
                if not isinstance(values.get(section), _Section):
                    values[section] = _Section(section, {})
                object.__getattribute__(values[section], "_values")[fname] = value
            else:
                values[section] = value
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(f"this stage did not declare {name!r} in its reads: add it, so that it enters "
                                 "the stage's cache key")
        return values[name]


@dataclass
class Branch:
    """One run of the per-organism stages: the organism itself, or a control tuned against a random reward."""

    name: str
    """``organism`` or ``control-<i>``."""
    train_reward: Any = None
    """What the organism is tuned against; None: the RM."""
    diagnostics: bool = True
    """Measure dictionary diagnostics (MMCS, splice loss) that no comparison reads; off for controls."""
    tuned: str | None = None
    """A control the user named (``compare.controls``): its model, given rather than tuned here."""
    measured_only: bool = False
    """A control that computes only the measured views (``compare.control_views: measured``): its layers stage
    chooses no block (no patching ranking), so its capture keeps log-probabilities only, and its SAE and fit
    stages train and fit nothing."""

    @property
    def is_control(self) -> bool:
        return self.name != "organism"


@dataclass
class Context:
    """What every stage may use besides its declared config: the RM, the runtime, the prompts, the branch."""

    rm: Any
    """The RM every comparison is made against."""
    runtime: Runtime
    train_prompts: list[str]
    heldout: list[str]
    branch: Branch = field(default_factory=lambda: Branch("organism"))
    echo: Any = print
    resources: dict = field(default_factory=dict)
    """Live objects shared by the stages of one run (loaded model pairs), keyed by what they are."""
    forced: bool = False
    """Set by the runner while a forced stage runs (a stage with a cache of its own clears it)."""
    input_keys: dict = field(default_factory=dict)
    """Set by the runner: the cache key of each input stage (for caches a stage keeps of its own)."""
    chat_template: str | None = None
    """The chat template the prompts were formatted with (``pair.chat_template`` resolved); None: plain prompts."""

    def pair_of(self, organism) -> Any:
        """The (base, tuned) :class:`~irmprobe.models.loading.ModelPair` of an organism result, loaded once per
        run and shared by the stages (kept in :attr:`resources`)."""
        from irmprobe.models.loading import load_pair  # torch and transformers: only when a stage needs a model

        key = ("pair", organism.base, organism.tuned)
        if key not in self.resources:
            rt = self.runtime
            self.resources[key] = load_pair(organism.base, organism.tuned, device=rt.device, dtype=rt.dtype,
                                            trust_remote_code=rt.trust_remote_code, device_map=rt.device_map,
                                            max_memory=rt.max_memory)
        return self.resources[key]

    def for_branch(self, branch: Branch) -> Context:
        return dataclasses.replace(self, branch=branch)

    @property
    def train_reward(self):
        return self.branch.train_reward if self.branch.train_reward is not None else self.rm


class Stage:
    """One stage of the graph. Subclasses set the class attributes and implement ``run`` and ``load``.

    ``run(cfg, ctx, inputs, out)`` computes the result and writes it under ``out`` (a resumable
    stage may write as it goes: the runner marks completion only after ``run`` returns);
    ``load(cfg, ctx, inputs, out)`` reads a completed ``out`` back. ``inputs`` maps each name in
    ``needs`` to that stage's result.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    reads: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    per_branch: ClassVar[bool] = True
    """Runs once per branch (organism and each control); False: once, with every branch's results."""
    control_needs: ClassVar[tuple[str, ...]] = ()
    """For a joint stage: the stages whose results it takes from every control branch too."""
    cached: ClassVar[bool] = True
    """False: always runs (the report)."""
    resumable: ClassVar[bool] = False
    """True: ``out`` is kept after an interruption, and ``run`` picks up what is there."""

    measured_only_differs: ClassVar[bool] = False
    """True: on a measured-only control branch (:attr:`Branch.measured_only`) the stage makes a smaller output,
    so that branch's key for it differs from a full control's (stages before it, the training above all, keep
    theirs and are shared)."""

    measured_only_ignores: ClassVar[tuple[str, ...]] = ()
    """Settings (of ``reads`` or ``optional_reads``) left out of a measured-only control's key: they set only what
    such a branch does not make (which blocks to capture, at which hook), so changing them reuses its output."""

    optional_reads: ClassVar[tuple[str, ...]] = ()
    """Settings added to a stage after its caches existed: read like ``reads``, but they enter the key only when
    they differ from their default, so a run that leaves them alone keeps its cached outputs."""

    def fingerprint(self, cfg: Sections, ctx: Context) -> Any:
        """Contents the declared settings point at (a file's hash, the RM's description); None by default."""
        return None

    def sections(self, config: RunConfig) -> Sections:
        """The config as this stage may read it: its ``reads`` and ``optional_reads``."""
        return Sections(config, self.reads + self.optional_reads)

    def key(self, config: RunConfig, ctx: Context, input_keys: list[str]) -> str:
        cfg = self.sections(config)
        ignored = self.measured_only_ignores if ctx.branch.measured_only else ()
        reads = tuple(r for r in self.reads if r not in ignored)
        optional = tuple(r for r in self.optional_reads if r not in ignored)
        default = declared_values(type(config)(), optional)
        changed = {k: v for k, v in declared_values(config, optional).items() if v != default[k]}
        light = ("measured views only",) if self.measured_only_differs and ctx.branch.measured_only else ()
        return config_key(self.name, self.version, declared_values(config, reads), self.fingerprint(cfg, ctx),
                          input_keys, *((changed,) if changed else ()), *light)

    def skips(self, cfg: Sections, ctx: Context, inputs: dict[str, Any]) -> str | None:
        """Why ``run`` will do no work on these settings and inputs (it then records that it skipped), or None:
        the runner neither prints a running-time estimate for a skip nor lets its instant replace the last
        real run's time."""
        return None

    def run(self, cfg: Sections, ctx: Context, inputs: dict[str, Any], out: Path) -> Any:  # pragma: no cover
        raise NotImplementedError

    def load(self, cfg: Sections, ctx: Context, inputs: dict[str, Any], out: Path) -> Any:  # pragma: no cover
        raise NotImplementedError

    def summary(self, result: Any) -> str:
        """Key figures for the stage's progress line."""
        return ""
