"""The SAEs of one branch: train (or reuse) one per (model, layer) with SAELens, measure them on
held-out activations, and compare dictionaries (1x vs 2x MMCS, tuned-only features)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from irmprobe.activations.samples import row_prompts
from irmprobe.cache import cache_root, config_key, sha256_file, write_json
from irmprobe.pipeline.stage import Stage, read_result
from irmprobe.results import Record
from irmprobe.saes.evaluate import decoder_directions, evaluate_sae, mmcs, unmatched_features
from irmprobe.saes.load import load_sae, save_sae
from irmprobe.saes.splice import splice_metrics
from irmprobe.saes.train import evaluation_rows, train_sae, uses_autocast

_TRAINING = ("architecture", "expansion", "l1_coefficient", "k", "training_samples", "batch_size", "lr",
             "early_stop_every", "early_stop_tolerance")


def get_sae(sc, acts: np.ndarray, eval_rows: np.ndarray, *, seed: int, key_parts: tuple, meta: dict, device: str,
            force: bool = False, units: np.ndarray | None = None):
    """Train (or load the cached) SAE of one (model, layer, size); evaluate it on held-out rows.

    ``units``: each row's prompt; early stopping then holds out whole prompts of the training rows.

    Cached under ``$IRMPROBE_CACHE/sae-weights`` by the settings that change training only, so
    analysis settings (splice text, match threshold) never retrain an SAE.
    """
    # ``autocast: auto`` enters the key as what it resolves to on this machine.
    training = {k: getattr(sc, k) for k in _TRAINING} | {"autocast": uses_autocast(sc, device)}
    # v6: early stopping holds out whole prompts (v5: single rows)
    sae_dir = cache_root() / "sae-weights" / config_key("sae-v6", *key_parts, training, seed)
    if force and sae_dir.exists():
        shutil.rmtree(sae_dir)
    if not (sae_dir / "cfg.json").is_file():
        sae = train_sae(acts[~eval_rows], sc, seed=seed, metadata=meta, device=device,
                        groups=None if units is None else units[~eval_rows])
        save_sae(sae, sae_dir)
    sae = load_sae(sae_dir, device=device)  # the inference form that every later stage uses
    metrics = evaluate_sae(sae, acts[eval_rows])
    write_json(sae_dir / "irmprobe_metrics.json", metrics)
    return sae, metrics, sae_dir


def training_point(sae, sc) -> dict:
    """Where training ended: samples seen, whether early stopping ended it, and the held-out explained
    variance gained over the last four checks (a large gain: the SAE was still improving)."""
    meta = sae.cfg.metadata
    curve = list(getattr(meta, "irmprobe_curve", None) or [])
    stopped = getattr(meta, "irmprobe_stopped_at", None)
    gain = (curve[-1]["explained_variance"] - curve[-5]["explained_variance"]) if len(curve) >= 5 else None
    return {"trained_samples": int(stopped) if stopped else int(sc.training_samples), "stopped_early": bool(stopped),
            "ev_gain_last_checks": gain, "training_curve": curve,
            "stopping_rows": getattr(meta, "irmprobe_stopping_rows", None),
            "stopping_prompts": getattr(meta, "irmprobe_stopping_groups", None)}


def sae_rows(sc, capture, samples, pair, *, kinds, seed: int, capture_key: str, meta, device: str,
             diagnostics: bool = True, force: bool = False):
    """Every SAE of a branch with its metrics; returns (rows, layer rows, saes, paths).

    Args:
        sc: the ``sae`` config section.
        capture: the branch's capture; ``samples`` its generations (splice text).
        pair: the model pair, for the splice loss (None skips it).
        kinds: which models get SAEs (``("tuned",)`` when only the tuned features are read).
        capture_key: the capture stage's key (part of each SAE's cache key).
        meta: the organism result (provenance saved beside each SAE).
        diagnostics: also train the match-size dictionaries (MMCS) and measure the splice loss.
    """
    units = row_prompts(samples, capture.seq_index)
    eval_rows = evaluation_rows(units, seed)
    if sc.pretrained:
        return released_rows(sc, capture, samples, pair, kinds=kinds, eval_rows=eval_rows, device=device,
                             diagnostics=diagnostics)
    half, n_half = len(samples.token_ids) // 2, sc.splice_sequences // 2
    # Half the splice text from each model's continuations (base ones come first in the samples).
    splice = list(samples.token_ids[:n_half]) + list(samples.token_ids[half: half + sc.splice_sequences - n_half])
    rows, saes, dirs, paths = [], {}, {}, {}
    for kind in kinds:
        for layer in capture.layers:
            acts = capture.acts[f"{kind}.{layer}"]
            info = {"model_name": meta.tuned_id if kind == "tuned" else meta.base, "hook_name": capture.hook_name(layer),
                    "irmprobe_model": kind, "irmprobe_reward": meta.reward.get("name")}
            parts = (capture_key, kind, layer)
            sae, metrics, sae_dir = get_sae(sc, acts, eval_rows, seed=seed + layer, key_parts=parts, meta=info,
                                            device=device, force=force, units=units)
            row = {"model": kind, "layer": layer, "d_sae": int(sae.cfg.d_sae), "path": str(sae_dir), **asdict(metrics),
                   **training_point(sae, sc)}
            dirs[kind, layer] = decoder_directions(sae)
            if diagnostics and sc.match_expansion and sc.match_expansion != sc.expansion:
                other, _, _ = get_sae(replace(sc, expansion=sc.match_expansion), acts, eval_rows, seed=seed + layer,
                                      key_parts=parts, meta=info, device=device, force=force, units=units)
                # MMCS of the smaller dictionary against the larger one, whichever is the IRM's.
                small, large = sorted((decoder_directions(other), dirs[kind, layer]), key=len)
                row["mmcs_small_vs_large"] = mmcs(small, large)
                row["mmcs_small_vs_large_one_to_one"] = mmcs(small, large, one_to_one=True)
            if diagnostics and splice and pair is not None:
                cached = sae_dir / f"splice-{len(splice)}.json"
                if cached.is_file() and not force:
                    row.update(json.loads(cached.read_text()))
                else:
                    measured = splice_metrics(pair.bridge(kind), sae, capture.hook_name(layer), splice)
                    write_json(cached, measured)
                    row.update(measured)
            rows.append(row)
            saes[kind, layer] = sae
            paths[f"{kind}.{layer}"] = str(sae_dir)
    layer_rows = []
    if diagnostics and set(kinds) == {"base", "tuned"}:
        for layer in capture.layers:
            new = unmatched_features(dirs["tuned", layer], dirs["base", layer], sc.match_threshold)
            layer_rows.append({"layer": layer, "tuned_only_features": int(len(new)),
                               "mmcs_tuned_vs_base": mmcs(dirs["tuned", layer], dirs["base", layer]),
                               "tuned_only_indices": new.tolist()})
    return rows, layer_rows, saes, paths


def released_rows(sc, capture, samples, pair, *, kinds, eval_rows, device: str, diagnostics: bool):
    """:func:`sae_rows` for ``sae.pretrained``: one released SAE per block serves both models; each is measured on
    each model's held-out activations (how well a base SAE reads the tuned model is itself a finding). A copy is
    kept in SAELens's format under ``$IRMPROBE_CACHE/sae-weights`` so reuse is checked like a trained SAE's."""
    from irmprobe.saes import pretrained

    rows, saes, paths = [], {}, {}
    splice = list(samples.token_ids[: sc.splice_sequences])
    for layer in capture.layers:
        spec = pretrained.spec_of(sc, layer)
        sae_dir = cache_root() / "sae-weights" / config_key("released-v1", pretrained.fingerprint(spec))
        if not (sae_dir / "cfg.json").is_file():
            save_sae(pretrained.load(spec, device=device), sae_dir)
        sae = load_sae(sae_dir, device=device)
        for kind in kinds:
            metrics = evaluate_sae(sae, capture.acts[f"{kind}.{layer}"][eval_rows])
            row = {"model": kind, "layer": layer, "d_sae": int(sae.cfg.d_sae), "path": str(sae_dir),
                   **asdict(metrics), "trained_samples": 0, "stopped_early": False, "ev_gain_last_checks": None,
                   "training_curve": [], "stopping_rows": None, "stopping_prompts": None,
                   "pretrained": pretrained.describe(spec)}
            if diagnostics and splice and pair is not None:
                row.update(splice_metrics(pair.bridge(kind), sae, capture.hook_name(layer), splice))
            rows.append(row)
            saes[kind, layer] = sae
            paths[f"{kind}.{layer}"] = str(sae_dir)
    return rows, [], saes, paths


WEIGHTS = "sae_weights.safetensors"


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
    name, version = "saes", 7
    reads = ("sae", "seed", "irm.inputs", "pair.device")
    needs = ("organism", "samples", "capture")

    def fingerprint(self, cfg, ctx):
        from irmprobe.saes import pretrained

        if not cfg.sae.pretrained:
            return None
        return {b: pretrained.fingerprint(pretrained.spec_of(cfg.sae, b)) for b in pretrained.blocks(cfg.sae)}

    def run(self, cfg, ctx, inputs, out):

        capture = inputs["capture"]
        kinds = ("base", "tuned") if ctx.branch.diagnostics or cfg.irm.inputs in ("base", "diff") else ("tuned",)
        pair = ctx.pair_of(inputs["organism"]) if ctx.branch.diagnostics and cfg.sae.splice_sequences else None
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

        from irmprobe.pipeline.runner import CacheError
        from irmprobe.saes.load import load_sae

        record = SAERecord.from_json(read_result(out))
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
