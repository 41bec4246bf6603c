"""The comparison stage: the organism's views next to its matched control organisms, the one
declared primary comparison the verdict rests on, and the organism reports of every branch."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from irmprobe.cache import write_json
from irmprobe.compare import against_control
from irmprobe.pipeline.stage import Stage
from irmprobe.results import ControlInfo, PrimaryComparison, Record, ViewRow
from irmprobe.verdict import primary_comparison

PRIMARY = "sae_irm"
"""The view the verdict rests on: the primary behavioural IRM over SAE features."""


@dataclass(frozen=True)
class CompareRecord(Record):
    """The organism against its controls, the RM and the baselines."""

    agreement: list[ViewRow]
    full_vocabulary: list[ViewRow]
    control_agreement: list[list[ViewRow]]
    control: list[ControlInfo]
    primary: PrimaryComparison | None
    report: dict
    """The organism report: RM reward and VADER compound (base vs tuned), KL, examples."""
    disagreements: dict
    feature_alignment: dict | None
    tokens: dict
    pca: dict


def with_controls(rows: list[ViewRow], controls: list[list[ViewRow]]) -> list[ViewRow]:
    """Each view's row with its control organisms' taus (mean over controls) and its margin above them."""
    merged = against_control([r.to_json() for r in rows], *[[c.to_json() for c in rows_c] for rows_c in controls])
    return [ViewRow.from_json(r) for r in merged]


class CompareStage(Stage):
    name, version = "compare", 1
    reads = ("compare.n_disagreements", "compare.n_alignment", "irm.inputs", "irm.min_token_count", "seed")
    needs = ("organism", "samples", "layers", "capture", "saes", "fit")
    control_needs = ("organism", "samples", "layers", "capture", "fit")

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe()

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.comparison import organism_side

        fit = inputs["fit"]
        controls = inputs.get("controls", [])
        agreement = with_controls(fit.record.rows, [c["fit"].record.rows for c in controls])
        full = with_controls(fit.record.full_vocabulary, [c["fit"].record.full_vocabulary for c in controls])
        infos = [control_info(f"control-{i}", c, inputs["organism"]) for i, c in enumerate(controls)]
        primary = primary_comparison(next(r for r in agreement if r.name == PRIMARY),
                                     [next((r for r in c["fit"].record.rows if r.name == PRIMARY), None)
                                      for c in controls])
        side = organism_side(cfg, ctx, inputs)
        record = CompareRecord(agreement, full, [c["fit"].record.rows for c in controls], infos, primary, **side)
        write_json(out / "result.json", record.to_json())
        return record

    def load(self, cfg, ctx, inputs, out):
        return CompareRecord.from_json(json.loads((out / "result.json").read_text()))

    def summary(self, result):
        p = result.primary
        if p is None or p.z is None:
            return "no primary comparison (no control or no tau)"
        return f"primary {p.view} tau {p.tau:+.3f} vs control {np.mean(p.control_taus):+.3f}: z {p.z:+.1f} ({p.outcome})"


def control_info(name: str, c: dict, organism) -> ControlInfo:
    """What a control branch was, and whether it matched the organism's recipe."""
    from irmprobe.organisms import report_from

    org = c["organism"]
    report = report_from(c["samples"], c["capture"])
    settings = org.settings or {}
    keys = ("method", "steps", "learning_rate", "beta", "lora_rank", "prompts_per_step", "generations_per_prompt",
            "max_new_tokens")
    reference = organism.settings if organism.settings and "method" in organism.settings else None
    matched = reference is not None and all(settings.get(k) == reference.get(k) for k in keys)
    note = None if reference is not None else ("the tuned model was given, so its recipe is unknown: the control "
                                               "follows the organism.* settings")
    return ControlInfo(name, org.reward, settings.get("method", "?"), settings.get("steps", 0),
                       settings.get("learning_rate", 0.0), settings.get("beta", 0.0), settings.get("lora_rank", 0),
                       settings.get("prompts_per_step", 0) * settings.get("generations_per_prompt", 0), matched,
                       org.path, list(c["layers"].chosen), float(c["capture"].log_ratio.mean()),
                       report["reward"], report["kl"], note)
