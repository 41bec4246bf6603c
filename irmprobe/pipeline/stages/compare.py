"""The comparison stage: the organism's views next to its matched control organisms, the one
declared primary comparison the verdict rests on, and the organism reports of every branch."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from irmprobe.analysis.agreement import against_control, disagreements, feature_alignment
from irmprobe.analysis.verdict import primary_comparison
from irmprobe.analysis.views import probe_inputs
from irmprobe.cache import write_json
from irmprobe.organisms.report import report_from
from irmprobe.pipeline.stage import Stage
from irmprobe.results import ControlInfo, PrimaryComparison, Record, ViewRow

VIEWS = ("full_vocab_log_ratio", "sae_irm")
"""The views a comparison can rest on (``compare.primary`` picks one; the other is the explanation)."""


@dataclass(frozen=True)
class CompareRecord(Record):
    """The organism against its controls, the RM and the baselines."""

    agreement: list[ViewRow]
    full_vocabulary: list[ViewRow]
    control_agreement: list[list[ViewRow]]
    control: list[ControlInfo]
    primary: PrimaryComparison | None
    explanation: PrimaryComparison | None
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
    name, version = "compare", 2
    reads = ("compare.n_disagreements", "compare.n_alignment", "compare.primary", "compare.alpha",
             "compare.assume_matched", "irm.inputs", "irm.min_token_count", "seed")
    optional_reads = ("compare.control_views",)
    needs = ("organism", "samples", "layers", "capture", "saes", "fit")
    control_needs = ("organism", "samples", "layers", "capture", "fit")

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe()

    def run(self, cfg, ctx, inputs, out):

        fit = inputs["fit"]
        controls = inputs.get("controls", [])
        agreement = with_controls(fit.record.rows, [c["fit"].record.rows for c in controls])
        full = with_controls(fit.record.full_vocabulary, [c["fit"].record.full_vocabulary for c in controls])
        infos = [control_info(f"control-{i}", c, inputs["organism"], cfg.compare.assume_matched,
                              cfg.compare.control_views) for i, c in enumerate(controls)]
        matched = [info.matched for info in infos]

        def row_of(rows: list[ViewRow], name: str) -> ViewRow | None:
            return next((r for r in rows if r.name == name), None)

        def test(name: str) -> PrimaryComparison | None:
            row = row_of(agreement + full, name)
            if row is None:
                return None
            return primary_comparison(row, [row_of(c["fit"].record.rows + c["fit"].record.full_vocabulary, name)
                                            for c in controls], alpha=cfg.compare.alpha, matched=matched)

        primary = test(cfg.compare.primary) or test(next(v for v in VIEWS if v != cfg.compare.primary))
        explanation = test(next(v for v in VIEWS if v != primary.view)) if primary is not None else None
        if (explanation is not None and cfg.compare.control_views == "measured" and controls
                and explanation.outcome not in ("zero", "undetermined")):
            row = row_of(agreement + full, explanation.view)
            explanation = dataclasses.replace(
                primary_comparison(row, [], alpha=cfg.compare.alpha), outcome="no call",
                reason="the controls carry the measured views only (compare.control_views: measured), so the fitted "
                       "SAE IRM has no null to be tested against; compare.control_views=all fits it on every control")
        side = organism_side(cfg, ctx, inputs)
        record = CompareRecord(agreement, full, [c["fit"].record.rows for c in controls], infos, primary, explanation,
                               **side)
        write_json(out / "result.json", record.to_json())
        return record

    def load(self, cfg, ctx, inputs, out):
        return CompareRecord.from_json(json.loads((out / "result.json").read_text()))

    def summary(self, result):
        p = result.primary
        if p is None or p.z is None:
            return "no primary comparison" + (f" ({p.outcome}: {p.reason})" if p is not None and p.reason else
                                              " (no control or no tau)")
        return (f"primary {p.view} tau {p.tau:+.3f} vs controls {np.mean(p.control_taus):+.3f}: t({p.df}) {p.z:+.1f} "
                f"({p.outcome})")


def control_info(name: str, c: dict, organism, assume_matched: bool = False, views: str = "all") -> ControlInfo:
    """What a control branch was, and whether it matched the organism's recipe.

    A control built here matches an organism built here when every setting but the reward is the same. Where
    irmprobe did not make one of them (a given tuned model, a control named in ``compare.controls``) it cannot
    know: the control matches only if the user vouches for it (``compare.assume_matched``)."""
    from irmprobe.organisms.report import report_from

    org = c["organism"]
    report = report_from(c["samples"], c["capture"])
    settings = org.settings or {}
    keys = ("method", "steps", "learning_rate", "beta", "lora_rank", "prompts_per_step", "generations_per_prompt",
            "max_new_tokens")
    reference = organism.settings if organism.settings and "method" in organism.settings else None
    named = "method" not in settings
    if reference is not None and not named:
        matched, note = all(settings.get(k) == reference.get(k) for k in keys), None
    else:
        matched = assume_matched
        what = ("a control named in compare.controls" if named else
                "the tuned model was given, so its recipe is unknown: the control follows the organism.* settings")
        note = what + ("; compare.assume_matched vouches that it differs from the organism in its reward only"
                       if assume_matched else "; set compare.assume_matched=true if you know it matches")
    return ControlInfo(name, org.reward, settings.get("method", "?"), settings.get("steps", 0),
                       settings.get("learning_rate", 0.0), settings.get("beta", 0.0), settings.get("lora_rank", 0),
                       settings.get("prompts_per_step", 0) * settings.get("generations_per_prompt", 0), matched,
                       org.path, list(c["layers"].chosen), float(c["capture"].log_ratio.mean()),
                       report["reward"], report["kl"], note, views)


def organism_side(cfg, ctx, inputs) -> dict:
    """Everything of the comparison stage that reads only the organism branch."""

    pair = ctx.pair_of(inputs["organism"])
    samples, capture, fit = inputs["samples"], inputs["capture"], inputs["fit"]
    rm_map = ctx.rm.token_values(pair.tokenizer)
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    report = report_from(samples, capture)
    X, names = probe_inputs(cfg.irm.inputs, capture.acts, inputs["saes"].saes, inputs["layers"].chosen)
    rm_rows = np.array([rm_map.get(int(t), 0.0) for t in capture.token_ids])
    alignment = None
    if cfg.irm.inputs != "raw":
        full = feature_alignment(X, fit.coef, rm_rows, capture.token_ids, decode, names, n=cfg.compare.n_alignment)
        alignment = {k: full[k] for k in ("irm_not_rm", "rm_not_irm")}
    maps = {name: fit.token_map(name) for name in fit.record.maps}
    disagree = {name: disagreements(maps[name], rm_map, decode, cfg.compare.n_disagreements)
                for name in ("sae_irm", "log_ratio (no model)") if name in maps}
    held = fit.eval_rows
    ids, counts = np.unique(capture.token_ids[held], return_counts=True)
    count = dict(zip(ids.tolist(), counts.tolist()))
    lr, sae = maps["log_ratio (no model)"], maps["sae_irm"]
    token_rows = [[decode(t), rm_map[t], count[t], lr[t], sae[t], maps.get("full_vocab_log_ratio", {}).get(t),
                   maps.get("shuffled_0", {}).get(t)]
                  for t in sorted(set(lr) & set(rm_map), key=lambda t: -count[t])]
    return {"report": report, "disagreements": disagree, "feature_alignment": alignment,
            "tokens": {"columns": ["token", "rm_value", "heldout_count", "log_ratio", "sae_irm", "full_vocab",
                                   "shuffled_0"], "rows": token_rows},
            "pca": pca(X, rm_rows, cfg.seed)}


def pca(X, rm_rows: np.ndarray, seed: int, n: int = 3000) -> dict:
    """Two principal components of a row sample of the probe inputs (scikit-learn TruncatedSVD)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import MaxAbsScaler

    if X.shape[1] < 3 or X.shape[0] < 3:
        return {}
    rows = np.random.default_rng(seed).permutation(X.shape[0])[:n]
    svd = TruncatedSVD(2, random_state=seed)
    xy = svd.fit_transform(MaxAbsScaler().fit_transform(X[rows]))
    return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "rm": rm_rows[rows].tolist(),
            "explained": svd.explained_variance_ratio_.tolist()}
