"""Typed stage results with a JSON round-trip, and the run's metrics with a generated JSON Schema.

Every result is a frozen dataclass deriving from :class:`Record`: ``to_json()`` gives plain JSON
types, ``from_json`` rebuilds the object (nested records and lists of records included), and
:func:`json_schema` derives a JSON Schema from the annotations, so ``metrics.json`` is checked
against the same definition that wrote it. Dicts appear only at the logging edge.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

SCHEMA_VERSION = 2
"""Bumped whenever a field of :class:`RunMetrics` changes meaning or is removed."""


def _resolve(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(tp, value):
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(args[0], value) if len(args) == 1 else value
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value)
    if origin in (list, tuple) and typing.get_args(tp):
        inner = typing.get_args(tp)[0]
        items = [_decode(inner, v) for v in value]
        return items if origin is list else tuple(items)
    return value


def _encode(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


class Record:
    """Base of typed results: JSON round-trip from the dataclass fields."""

    def to_json(self) -> dict:
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = _resolve(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{cls.__name__}: missing field(s) {missing}")
        return cls(**{k: _decode(hints[k], v) for k, v in data.items() if k in names})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _schema(tp) -> dict:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return {"type": "null"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema(a) for a in typing.get_args(tp)]}
    if isinstance(tp, type) and issubclass(tp, Record):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return {"type": "array", "items": _schema(args[0])} if args else {"type": "array"}
    if origin is dict or tp is dict:
        return {"type": "object"}
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"},
            str: {"type": "string"}}.get(tp, {})


def json_schema(cls=None) -> dict:
    """A JSON Schema (draft 2020-12) of ``cls`` (default :class:`RunMetrics`) and every record it holds."""
    cls = cls or RunMetrics
    defs: dict[str, dict] = {}

    def visit(rec):
        if rec.__name__ in defs:
            return
        hints = _resolve(rec)
        props, required = {}, []
        defs[rec.__name__] = {}
        for f in dataclasses.fields(rec):
            props[f.name] = _schema(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
            for sub in _records(hints[f.name]):
                visit(sub)
        defs[rec.__name__] = {"type": "object", "description": (rec.__doc__ or "").strip().split("\n")[0],
                              "properties": props, "required": required}

    visit(cls)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": cls.__name__,
            "$ref": f"#/$defs/{cls.__name__}", "$defs": defs}


def _records(tp):
    if isinstance(tp, type) and issubclass(tp, Record):
        yield tp
    for arg in typing.get_args(tp):
        yield from _records(arg)


@dataclass(frozen=True)
class ViewRow(Record):
    """One IRM view against the RM on out-of-fold token values (and its control organism's figures)."""

    name: str
    family: str
    """``behavioural``, ``rm_informed``, ``baseline`` or ``full_vocabulary`` (its own table and token set)."""
    n_tokens: int
    is_zero: bool
    tau: float | None = None
    p_value: float | None = None
    tau_ci: list[float] | None = None
    """Percentile bootstrap 95% CI (``ci_method`` says what was resampled)."""
    tau_ci_tokens: list[float] | None = None
    """The token-type bootstrap's 95% CI beside the prompt-cluster one (the one-control rule reads both)."""
    ci_method: str | None = None
    """``prompt cluster bootstrap`` (prompts drawn with replacement, token means recomputed: views averaged
    from captured rows) or ``token bootstrap`` (token types drawn, means held fixed: the full vocabulary)."""
    tau_range: list[float] | None = None
    """For the shuffled baseline: min and max tau over its fits (a range, not a CI)."""
    sign_acc_pos: float | None = None
    sign_acc_neg: float | None = None
    n_pos: int = 0
    n_neg: int = 0
    neutral_point: float | None = None
    spearman: float | None = None
    spearman_p: float | None = None
    error_vs_frequency: dict | None = None
    text_tau: float | None = None
    text_p: float | None = None
    n_texts: int | None = None
    test_r2: float | None = None
    alpha: float | None = None
    estimator: str | None = None
    n_nonzero: int | None = None
    n_fits: int | None = None
    tau_sd: float | None = None
    tau_max: float | None = None
    pairwise_accuracy: float | None = None
    n_triples: int | None = None
    triple_map_tau: float | None = None
    """Contrastive probe: tau of the paper's triple-based lexicon, from held-out triples only."""
    triple_map_n: int | None = None
    position: str | None = None
    """``reader`` (features at t) or ``decision`` (features at t-1, where x_t was chosen)."""
    note: str | None = None
    control_tau: float | None = None
    control_tau_ci: list[float] | None = None
    control_taus: list[float] | None = None
    """One tau per control organism."""
    control_text_tau: float | None = None
    control_is_zero: bool | None = None
    above_control: float | None = None
    above_control_ci: bool | None = None
    control_flag: str | None = None


@dataclass(frozen=True)
class PrimaryComparison(Record):
    """The one declared comparison the verdict rests on: the primary IRM against the matched control(s)."""

    view: str
    tau: float | None
    tau_se: float | None
    control_taus: list[float]
    control_se: float | None
    """The controls' spread: the standard deviation of their taus (k >= 2 matched controls; None with fewer)."""
    difference: float | None
    z: float | None
    """The test statistic with k >= 2 matched controls: the prediction-interval t (tau - mean control tau) /
    (sd * sqrt(1 + 1/k)) (:func:`irmprobe.analysis.agreement.prediction_t`); None with fewer (no call)."""
    outcome: str
    """``agrees`` / ``opposes`` (the t-test significant at ``alpha``, by sign), ``unrelated``, ``no call`` (fewer
    than 2 controls known to match: see ``reason``), ``zero`` or ``undetermined``."""
    test: str | None = None
    """Which test: ``t, k-1 d.f.`` against k >= 2 matched controls (a prediction-interval t-test)."""
    df: int | None = None
    """Degrees of freedom of the t-test (None when no test was made)."""
    p_value: float | None = None
    """Two-sided p-value of the statistic."""
    alpha: float | None = None
    """The two-sided level the call was made at (``compare.alpha``)."""
    reason: str | None = None
    """Why no call was made (``outcome`` ``no call``)."""


@dataclass(frozen=True)
class ControlInfo(Record):
    """What the control organism was, and whether it matched the organism."""

    branch: str
    reward: dict
    method: str
    steps: int
    learning_rate: float
    beta: float
    lora_rank: int
    batch: int
    """Prompts per step x generations per prompt."""
    matched: bool
    """Same method and settings as the organism, differing only in the reward."""
    path: str | None
    layers: list[int]
    mean_log_ratio: float
    reward_diff: dict
    """The RM's reward, control tuned - base (paired by prompt)."""
    kl: dict
    note: str | None = None
    views: str = "all"
    """``all``: every view was fitted on the control; ``measured``: its measured views only (no layers, SAEs or
    fits: ``compare.control_views``)."""


@dataclass(frozen=True)
class RunMetrics(Record):
    """Everything a run measured: what reporting, the figures, W&B and scripts read."""

    schema_version: int
    config: dict
    organism: dict
    layers: dict
    capture: dict
    saes: list[dict]
    sae_layers: list[dict]
    reward: dict
    kl: dict
    vader_compound: dict
    examples: list[dict]
    irm: dict
    agreement: list[ViewRow]
    full_vocabulary: list[ViewRow]
    primary: PrimaryComparison | None
    control: list[ControlInfo]
    control_agreement: list[list[ViewRow]]
    disagreements: dict
    feature_alignment: dict | None
    tokens: dict
    rm: dict
    verdict: list[str]
    stage_seconds: dict
    stage_status: dict
    pca: dict = field(default_factory=dict)
    validation: dict | None = None
    discovery: dict | None = None
    wandb_dir: str | None = None
    explanation: PrimaryComparison | None = None
    """The view that is not primary (the SAE IRM when the full-vocabulary log-ratio is), tested the same way."""
    attribution: dict | None = None
    """The attribute stage's result: nodes ranked by attribution, exact checks, faithfulness/completeness curves."""
    depth: dict | None = None
    """The depth stage's result: per block, the out-of-fold R^2 of the log-ratio from the residual stream's change
    (direct path, logit lens); None in a file written before it existed."""
    dashboard: dict | None = None
    """The report's text views (held-out continuations, each token's log-ratio, IRM and RM values) and feature
    cards (:mod:`irmprobe.reporting.dashboard`); None in a file written before they existed."""

    kind: ClassVar[str] = "irmprobe-metrics"

    def to_json(self) -> dict:
        return {"kind": self.kind} | super().to_json()

    @classmethod
    def from_json(cls, data) -> RunMetrics:
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise ValueError("not an irmprobe metrics file (no \"kind\": \"irmprobe-metrics\"): pass the "
                             "metrics.json a run wrote")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"metrics schema version {data.get('schema_version')} is not {SCHEMA_VERSION}: "
                             "re-run the pipeline (cached stages are reused) to rewrite it")
        return super().from_json(data)

    def view(self, name: str) -> ViewRow:
        for row in self.agreement + self.full_vocabulary:
            if row.name == name:
                return row
        raise KeyError(f"no view {name!r}: views are {[r.name for r in self.agreement]}")
