"""One branch's IRM views from its capture and SAEs: probe inputs, contrastive triples cut from
training and from held-out sequences, and :func:`irmprobe.analysis.views.analyse`."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from irmprobe.activations.capture import last_token_activations
from irmprobe.analysis.views import Analysis, analyse, probe_inputs, prompt_folds
from irmprobe.cache import cache_root, config_key, write_json
from irmprobe.irm.triples import Triples, build_triples, llm_swap_words
from irmprobe.pipeline.stage import Stage, read_result
from irmprobe.prompts import load_prompts
from irmprobe.results import Record, ViewRow

log = logging.getLogger(__name__)


_KINDS = {"tuned": ["tuned"], "raw": ["tuned"], "base": ["base"], "diff": ["base", "tuned"]}


def chat_client(llm):
    """The chat client of the ``llm`` section (needs ``base_url`` and ``model``)."""
    from irmprobe.llm import ChatClient

    if not llm.base_url:
        raise ValueError("an LLM step is on (compare.llm_triples or validate.judge=llm) but llm.base_url is not set")
    return ChatClient(llm.base_url, llm.model, api_key_env=llm.api_key_env)


def triples_for(cfg, pair, streams: list[list[int]], rm_map: dict, seed: int) -> Triples | None:
    try:
        triples = build_triples(streams, rm_map, pair.tokenizer, n_max=cfg.compare.n_triples, seed=seed)
    except ValueError as exc:
        log.warning("no contrastive probe: %s", exc)
        return None
    if cfg.compare.llm_triples:
        triples = llm_swap_words(triples, pair.tokenizer, rm_map, chat_client(cfg.llm))
    return triples


def triple_inputs(inputs: str, hook: str, pair, saes: dict, layers, triples: Triples, cache_key: str) -> tuple:
    """Probe inputs at the last token of each triple variant (activations cached by the triples)."""
    bridges = {k: pair.bridge(k) for k in _KINDS[inputs]}
    key = config_key("triples-v2", cache_key, pair.base_spec, pair.tuned_spec, list(layers), hook,
                     [list(p) for p in triples.prefixes], triples.positive, triples.negative, triples.neutral,
                     sorted(bridges))
    path = cache_root() / "stages" / "triples" / key / "activations.safetensors"
    if path.is_file():
        arrays = load_file(str(path))
    else:
        arrays = {}
        for variant in ("positive", "negative", "neutral"):
            for kind, bridge in bridges.items():
                acts = last_token_activations(bridge, triples.sequences(variant), tuple(layers), hook=hook)
                arrays.update({f"{variant}/{kind}.{b}": a for b, a in acts.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        tmp.replace(path)
    out = []
    for variant in ("positive", "negative", "neutral"):
        acts = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(variant + "/")}
        out.append(probe_inputs(inputs, acts, saes, layers)[0])
    return (*out, triples.positive, triples.negative)


def fit_views(cfg, pair, samples, capture, saes: dict, layers, rm, *, cache_key: str) -> tuple[Analysis, object, list,
                                                                                               dict | None]:
    """Every view of one branch; returns (analysis, probe inputs, feature names, triples info)."""
    ic, cc, seed = cfg.irm, cfg.compare, cfg.seed
    rm_map = rm.token_values(pair.tokenizer)
    X, names = probe_inputs(ic.inputs, capture.acts, saes, layers)
    raw = None if ic.inputs == "raw" else probe_inputs("raw", capture.acts, saes, layers)[0]
    triple_x, info = None, None
    if cc.rm_informed:
        _, folds = prompt_folds(capture, samples, seed)
        if cc.triples_path:
            streams = [pair.tokenizer(t, add_special_tokens=True)["input_ids"] for t in load_prompts(cc.triples_path)]
            first = set(np.flatnonzero(np.random.default_rng(seed).random(len(streams)) < 0.5).tolist())
        else:
            streams = [list(t) for t in samples.token_ids]
            first = {int(s) for s in np.unique(capture.seq_index[folds[0]])}
        # Triples cut from one fold's sequences train the probe that scores the other fold.
        parts = [[s for i, s in enumerate(streams) if (i in first) == inside] for inside in (True, False)]
        built = [triples_for(cfg, pair, part, rm_map, seed) for part in parts]
        if all(t is not None for t in built):
            args = (ic.inputs, cfg.capture.hook, pair, saes, layers)
            triple_x = tuple(triple_inputs(*args, t, cache_key) for t in built)
            source = cc.triples_path or "held-out generations"
            info = {"n_per_fold": [len(t) for t in built],
                    "source": source + (", LLM swap words" if cc.llm_triples else ", offline swap words")}
    decision = None
    if "decision" in ic.positions:
        from irmprobe.activations.patching import decision_rows
        from irmprobe.analysis.views import bilinear_inputs
        from irmprobe.models.loading import readout

        rows, prev = decision_rows(capture.seq_index, capture.position)
        X_prev = X[prev]
        # The bilinear decision-side view: features at t-1 times their direct effect on the written token.
        unembed, gamma = readout(pair.tuned)
        Z = bilinear_inputs(X_prev, capture.token_ids[rows], column_directions(ic.inputs, saes, layers, X.shape[1]),
                            unembed, gamma)
        decision = (X_prev, rows, prev, Z)  # features at t-1, target r_t
    analysis = analyse(capture, X, samples, rm_map, ic, cc, seed=seed, raw=raw, triple_inputs=triple_x, n_jobs=2,
                       decision=decision, device=cfg.pair.device)
    return analysis, X, names, info


def column_directions(inputs: str, saes: dict, layers, n_columns: int) -> np.ndarray:
    """Each probe-input column's direction in the residual stream: the SAE decoder row of its feature (the tuned
    SAE's for ``diff``), a unit vector for ``raw``."""
    from irmprobe.saes.evaluate import decoder_directions

    if inputs == "raw":
        d = n_columns // len(layers)
        return np.vstack([np.eye(d, dtype=np.float32)] * len(layers))
    model = "base" if inputs == "base" else "tuned"
    return np.vstack([decoder_directions(saes[model, layer]) for layer in layers]).astype(np.float32)


def measured_views(cfg, ctx, inputs, pair) -> Analysis:
    """A measured-only control's views: the log-ratio and the full-vocabulary log-ratio, nothing fitted."""
    from irmprobe.activations.patching import decision_rows

    capture = inputs["capture"]
    # The rows a full control scores, so its log-ratio row is the full control's too: with a decision-side view,
    # those whose t-1 was captured (which drops each extra capture text's first captured token); only the
    # indices are read.
    decision = (None, decision_rows(capture.seq_index, capture.position)[0], None) \
        if "decision" in cfg.irm.positions else None
    return analyse(capture, None, inputs["samples"], ctx.rm.token_values(pair.tokenizer), cfg.irm, cfg.compare,
                   seed=cfg.seed, decision=decision, measured_only=True)


@dataclass(frozen=True)
class FitRecord(Record):
    """Every IRM view of one branch, cross-fitted on two halves of the prompts (every value out of fold)."""

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
    """The decision-side IRM's weights (features at t-1 predicting r_t; the bilinear view's when fitted)."""

    def token_map(self, name: str) -> dict[int, float]:
        return {int(t): v for t, v in self.record.maps[name].items()}


_KEEP_MAPS = ("log_ratio (no model)", "sae_irm", "sae_irm_decision", "sae_irm_bilinear", "full_vocab_log_ratio",
              "shuffled_0")


class FitStage(Stage):
    name, version = "fit", 11
    reads = ("irm", "compare.rm_informed", "compare.n_bootstrap", "compare.n_triples", "compare.triples_path",
             "compare.llm_triples", "llm", "capture.hook", "pair.device", "seed")
    needs = ("organism", "samples", "layers", "capture", "saes")

    def fingerprint(self, cfg, ctx):
        path = cfg.compare.triples_path
        return ctx.rm.describe(), hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None

    def run(self, cfg, ctx, inputs, out):

        pair, capture = ctx.pair_of(inputs["organism"]), inputs["capture"]
        if ctx.branch.measured_only:  # a measured-only control: nothing fitted, no weights
            analysis, names, kind, intercept, triples = measured_views(cfg, ctx, inputs, pair), [], \
                "none (a measured-only control)", 0.0, None
            arrays = {"coef": np.zeros(0), "scale": np.zeros(0), "predictions": np.zeros(0)}
        else:
            analysis, _, names, triples = fit_views(cfg, pair, inputs["samples"], capture, inputs["saes"].saes,
                                                    inputs["layers"].chosen, ctx.rm,
                                                    cache_key=ctx.input_keys["capture"])
            primary = analysis.fits["sae_irm"]
            kind, intercept = cfg.irm.inputs, float(primary.intercept)
            arrays = {"coef": primary.coef, "scale": primary.scale, "predictions": primary.predictions}
            # The ablation targets the decision-side view that can fit: the bilinear one when it was fitted.
            decision = analysis.fits.get("sae_irm_bilinear") or analysis.fits.get("sae_irm_decision")
            if decision is not None:
                arrays["decision_coef"] = decision.coef
        record = FitRecord(
            [ViewRow.from_json(r) for r in analysis.rows], [ViewRow.from_json(r) for r in analysis.full_vocabulary],
            {n: {str(t): v for t, v in analysis.maps[n].items()} for n in _KEEP_MAPS if n in analysis.maps},
            {n: {"alpha": f.alpha, "test_r2": f.test_r2, "is_zero": f.is_zero,
                 "n_nonzero": int(np.count_nonzero(f.coef)) if f.coef is not None else None}
             for n, f in analysis.fits.items()},
            names, kind, intercept, int(len(capture.token_ids)), int(len(analysis.eval_rows)), triples)
        arrays["eval_rows"] = analysis.eval_rows
        for name, array in arrays.items():
            np.save(out / f"{name}.npy", np.asarray(array), allow_pickle=False)
        write_json(out / "fit.json", record.to_json())
        return self.load(cfg, ctx, inputs, out)

    def load(self, cfg, ctx, inputs, out):
        arrays = [np.load(out / f"{k}.npy", allow_pickle=False) for k in ("coef", "scale", "eval_rows", "predictions")]
        decision = out / "decision_coef.npy"
        return Fit(FitRecord.from_json(read_result(out, "fit.json")), *arrays, out,
                   np.load(decision, allow_pickle=False) if decision.is_file() else None)

    def summary(self, result):
        row = next((r for r in result.record.rows if r.name == "sae_irm"), None)
        if row is None:
            full = next((r for r in result.record.full_vocabulary if r.tau is not None), None)
            return "measured views only" + (f": full-vocabulary tau {full.tau:+.3f}" if full else "")
        return ("primary IRM identically zero" if row.is_zero else
                f"sae_irm held-out tau {row.tau:+.3f} on {row.n_tokens} tokens" if row.tau is not None else row.note or "")
