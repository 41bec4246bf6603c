"""The dashboard stage: the report's coloured text views and feature cards (:mod:`irmprobe.reporting.dashboard`)."""

from __future__ import annotations

import json
import time

import numpy as np

from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage


def dashboard(cfg, ctx, inputs) -> dict:
    from irmprobe.analysis.views import probe_inputs
    from irmprobe.models.loading import readout
    from irmprobe.models.tokens import word_tokens
    from irmprobe.reporting.dashboard import feature_cards, named_features, text_views, written_words
    from irmprobe.saes.evaluate import decoder_directions

    started = time.perf_counter()
    pair = ctx.pair_of(inputs["organism"])
    samples, capture, fit = inputs["samples"], inputs["capture"], inputs["fit"]
    rm_map = ctx.rm.token_values(pair.tokenizer)
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    texts = text_views(samples, capture, fit.predictions, fit.eval_rows, rm_map, decode,
                       max_prompts=cfg.report.text_prompts)
    vocab = capture.vocab_log_ratio() if capture.vocab_logp_sum is not None else None
    words = written_words(samples, vocab, {t: decode(t) for t in word_tokens(pair.tokenizer)}, rm_map)
    interpretation = inputs["interpret"]
    interpretation = None if "skipped" in interpretation else interpretation
    attribution = inputs["attribute"]
    cmp = inputs["compare"]
    layers = inputs["layers"].chosen
    saes = inputs["saes"].saes
    cards: list[dict] = []
    absent = None
    if not all(("tuned", layer) in saes for layer in layers):
        absent = "the run has no SAEs of the tuned model: no feature to show"
    else:
        X, names = probe_inputs("tuned", capture.acts, saes, layers)
        named = named_features(list(fit.record.feature_names), fit.coef, fit.decision_coef, cfg.validate.top_k,
                               interpretation, attribution, cmp.feature_alignment,
                               inputs["discover"].concepts, ablated=bool(inputs["ablate"]))
        # The cards' weights are the IRM's weights of the tuned features, read by name: with irm.inputs other
        # than tuned (base, diff, raw) the IRM's columns are not the tuned features, and the cards show weight 0.
        column = {n: i for i, n in enumerate(fit.record.feature_names)}
        at = np.array([column.get(n, -1) for n in names])

        def by_name(weights):
            return None if weights is None else np.where(at >= 0, np.asarray(weights)[np.maximum(at, 0)], 0.0)

        coef, decision = by_name(fit.coef), by_name(fit.decision_coef)
        rm_rows = np.array([rm_map.get(int(t), 0.0) for t in capture.token_ids])
        unembed, gamma = readout(pair.tuned)
        cards = feature_cards(named, X, names, coef, decision, capture, fit.eval_rows, rm_rows,
                              list(samples.token_ids), decode,
                              {layer: decoder_directions(saes["tuned", layer]) for layer in layers}, unembed, gamma,
                              interpretation=interpretation, attribution=attribution,
                              n_contexts=cfg.report.feature_contexts, seed=cfg.seed)
    return {"texts": texts, "words": words, "features": cards, "features_absent": absent,
            "irm_inputs": cfg.irm.inputs, "seconds": time.perf_counter() - started}


class DashboardStage(Stage):
    """Coloured text views of the held-out continuations and a card for every feature the report names."""

    name, version = "dashboard", 1
    reads = ("report.text_prompts", "report.feature_contexts", "validate.top_k", "irm.inputs", "seed")
    needs = ("organism", "samples", "layers", "capture", "saes", "fit", "compare", "discover", "attribute",
             "interpret", "ablate")

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe()

    def run(self, cfg, ctx, inputs, out):
        result = dashboard(cfg, ctx, inputs)
        write_json(out / "dashboard.json", result)
        return result

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "dashboard.json").read_text())

    def summary(self, result):
        return (f"{len(result['texts']['prompts'])} prompts as coloured text, {len(result['features'])} feature "
                f"cards ({result['seconds']:.0f} s)")
