"""The SAE and fit stages of each branch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from irmprobe.cache import sha256_file, write_json
from irmprobe.pipeline.stage import Stage
from irmprobe.results import Record, ViewRow


WEIGHTS = "sae_weights.safetensors"


def _read(out: Path, name: str = "result.json") -> dict:
    return json.loads((out / name).read_text())


def _pair(ctx, inputs):
    from irmprobe.pipeline.stages import pair_of

    return pair_of(ctx, inputs["organism"])


# ---------------------------------------------------------------------------------------------- SAEs


@dataclass(frozen=True)
class SAERecord(Record):
    """Each SAE's held-out metrics and where it lives; per-layer tuned-only feature counts."""

    rows: list[dict]
    layer_rows: list[dict]
    paths: dict
    """``"tuned.9"`` -> directory of the SAELens SAE."""
    checksums: dict = field(default_factory=dict)
    """``"tuned.9"`` -> sha256 of its weights file, checked whenever the SAE is reused."""


@dataclass
class SAEs:
    """The SAE stage's record with the SAEs loaded (``{("tuned", 9): sae}``)."""

    record: SAERecord
    saes: dict


class SAEStage(Stage):
    name, version = "saes", 5
    reads = ("sae", "seed", "irm.inputs", "pair.device")
    needs = ("organism", "samples", "capture")

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.saes import sae_rows

        capture = inputs["capture"]
        kinds = ("base", "tuned") if ctx.branch.diagnostics or cfg.irm.inputs in ("base", "diff") else ("tuned",)
        pair = _pair(ctx, inputs) if ctx.branch.diagnostics and cfg.sae.splice_sequences else None
        rows, layer_rows, saes, paths = sae_rows(cfg.sae, capture, inputs["samples"], pair, kinds=kinds,
                                                 seed=cfg.seed, capture_key=ctx.input_keys["capture"],
                                                 meta=inputs["organism"], device=ctx.runtime.device,
                                                 diagnostics=ctx.branch.diagnostics, force=ctx.forced)
        sums = {k: sha256_file(Path(p) / WEIGHTS) for k, p in paths.items()}
        record = SAERecord(rows, layer_rows, paths, sums)
        write_json(out / "result.json", record.to_json())
        return SAEs(record, saes)

    def load(self, cfg, ctx, inputs, out):
        import shutil

        from irmprobe.features import load_sae
        from irmprobe.pipeline.runner import CacheError

        record = SAERecord.from_json(_read(out))
        # The weights live in a cache shared across runs: check each file before it is trusted.
        bad = [k for k, p in record.paths.items() if not (Path(p) / WEIGHTS).is_file()
               or sha256_file(Path(p) / WEIGHTS) != record.checksums.get(k)]
        if bad:
            for k in bad:
                shutil.rmtree(record.paths[k], ignore_errors=True)
            raise CacheError(f"SAE weights of {', '.join(bad)} are missing or corrupted (checksum mismatch): "
                             "retraining those SAEs alone")
        saes = {(k.split(".")[0], int(k.split(".")[1])): load_sae(Path(p), device=ctx.runtime.device)
                for k, p in record.paths.items()}
        return SAEs(record, saes)

    def summary(self, result):
        ev = [r["explained_variance"] for r in result.record.rows]
        return f"{len(ev)} SAEs, explained variance {min(ev):.3f}..{max(ev):.3f}" if ev else ""


# ---------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class FitRecord(Record):
    """Every IRM view of one branch, fitted on training sequences and scored on held-out ones."""

    rows: list[ViewRow]
    full_vocabulary: list[ViewRow]
    maps: dict
    """View -> token id (as a string) -> held-out value, for the views the comparison reads."""
    fits: dict
    feature_names: list[str]
    inputs: str
    intercept: float
    n_rows: int
    n_heldout_rows: int
    triples: dict | None = None


@dataclass
class Fit:
    """The fit stage's record, with the primary IRM's weights and its held-out predictions."""

    record: FitRecord
    coef: np.ndarray
    scale: np.ndarray
    eval_rows: np.ndarray
    predictions: np.ndarray
    """The primary IRM's prediction at every captured row."""
    path: Path
    decision_coef: np.ndarray | None = None
    """The decision-side IRM's weights (features at t-1 predicting r_t), when fitted."""

    def token_map(self, name: str) -> dict[int, float]:
        return {int(t): v for t, v in self.record.maps[name].items()}


_KEEP_MAPS = ("log_ratio (no model)", "sae_irm", "sae_irm_decision", "full_vocab_log_ratio", "shuffled_0")


class FitStage(Stage):
    name, version = "fit", 9
    reads = ("irm", "compare.rm_informed", "compare.n_bootstrap", "compare.n_triples", "compare.triples_path",
             "compare.llm_triples", "llm", "capture.hook", "pair.device", "seed")
    needs = ("organism", "samples", "layers", "capture", "saes")

    def fingerprint(self, cfg, ctx):
        path = cfg.compare.triples_path
        return ctx.rm.describe(), hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.fitting import fit_views

        pair = _pair(ctx, inputs)
        analysis, X, names, triples = fit_views(cfg, pair, inputs["samples"], inputs["capture"], inputs["saes"].saes,
                                                inputs["layers"].chosen, ctx.rm, cache_key=ctx.input_keys["capture"])
        primary = analysis.fits["sae_irm"]
        record = FitRecord(
            [ViewRow.from_json(r) for r in analysis.rows], [ViewRow.from_json(r) for r in analysis.full_vocabulary],
            {n: {str(t): v for t, v in analysis.maps[n].items()} for n in _KEEP_MAPS if n in analysis.maps},
            {n: {"alpha": f.alpha, "test_r2": f.test_r2, "is_zero": f.is_zero,
                 "n_nonzero": int(np.count_nonzero(f.coef)) if f.coef is not None else None}
             for n, f in analysis.fits.items()},
            names, cfg.irm.inputs, float(primary.intercept), int(X.shape[0]), int(len(analysis.eval_rows)), triples)
        arrays = {"coef": primary.coef, "scale": primary.scale, "eval_rows": analysis.eval_rows,
                  "predictions": primary.predictions}
        decision = analysis.fits.get("sae_irm_decision")
        if decision is not None:
            arrays["decision_coef"] = decision.coef
        for name, array in arrays.items():
            np.save(out / f"{name}.npy", np.asarray(array), allow_pickle=False)
        write_json(out / "fit.json", record.to_json())
        return self.load(cfg, ctx, inputs, out)

    def load(self, cfg, ctx, inputs, out):
        arrays = [np.load(out / f"{k}.npy", allow_pickle=False) for k in ("coef", "scale", "eval_rows", "predictions")]
        decision = out / "decision_coef.npy"
        return Fit(FitRecord.from_json(_read(out, "fit.json")), *arrays, out,
                   np.load(decision, allow_pickle=False) if decision.is_file() else None)

    def summary(self, result):
        row = next(r for r in result.record.rows if r.name == "sae_irm")
        return ("primary IRM identically zero" if row.is_zero else
                f"sae_irm held-out tau {row.tau:+.3f} on {row.n_tokens} tokens" if row.tau is not None else row.note or "")

