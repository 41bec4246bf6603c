"""The seeds stage: the attribution redone with its dictionaries (the tuned model's SAEs, or dictionaries of the
change) trained with other seeds, so that a named set is reported as the tuning's only when it holds across them."""

from __future__ import annotations

import json
import time

from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage
from irmprobe.pipeline.stages.attribute import attribute, change_dictionaries

SEED_STEP = 100
"""Check i trains block l's dictionary with ``seed + SEED_STEP * i + l``: seeds no other check or block uses (in
models of fewer than SEED_STEP blocks)."""


def activation_dictionaries(cfg, capture, samples, layers, *, capture_key: str, device: str, seed: int,
                            force: bool = False) -> tuple[dict, list[dict]]:
    """The tuned model's SAEs at ``layers`` as the saes stage trains them (same settings, training rows and
    held-out prompts), but with block l's seed ``seed + l``. Returns ``(layer -> SAE, rows)`` like
    :func:`irmprobe.pipeline.stages.attribute.change_dictionaries`."""
    from dataclasses import asdict

    from irmprobe.activations.samples import row_prompts
    from irmprobe.pipeline.stages.saes import get_sae
    from irmprobe.saes.train import evaluation_rows

    units = row_prompts(samples, capture.seq_index)
    eval_rows = evaluation_rows(units, cfg.seed)
    saes, rows = {}, []
    for layer in layers:
        info = {"hook_name": capture.hook_name(layer), "irmprobe_model": "tuned (seed check)"}
        sae, metrics, sae_dir = get_sae(cfg.sae, capture.acts[f"tuned.{layer}"], eval_rows, seed=seed + layer,
                                        key_parts=(capture_key, "tuned", layer), meta=info, device=device,
                                        force=force, units=units)
        saes[layer] = sae
        rows.append({"layer": layer, "d_sae": int(sae.cfg.d_sae), "path": str(sae_dir), "seed": seed + layer,
                     **asdict(metrics)})
    return saes, rows


def seed_check(result: dict, seed: int) -> dict:
    """What one other seed's attribution says (:func:`irmprobe.pipeline.stages.attribute.attribute`'s ``result``):
    its smallest faithful set of features, the faithfulness and completeness there, its best set, every feature
    together, what the hook points carry and, where the run named a set, its features' counterparts in this
    seed's dictionaries (``matched``: each named feature's closest decoder direction, what they carry together,
    and the range of random feature sets of as many features from this seed's dictionaries, ``random``: the
    control the counterparts' share is read against, None where the curve has no row of that size)."""
    curves = result["curves"]
    rows = [r for r in curves.get("feature_rows", []) if r["faithfulness"]["value"] is not None]
    k = result.get("smallest_k_features")
    at_k = next((r for r in rows if r["k"] == k), None)
    best = max(rows, key=lambda r: r["faithfulness"]["value"], default=None)
    matched = result.get("matched")
    if matched is not None:
        size = next((r for r in curves.get("feature_rows", []) if r["k"] == len(matched["features"])), None)
        matched = matched | {"random": None if size is None else (size.get("random") or {}).get("range")}
    return {"seed": seed, "block_seeds": [seed + layer for layer in result["layers"]],
            "explained_variance": [d.get("explained_variance") for d in result.get("dictionaries") or []],
            "smallest_k_features": k,
            "faithfulness": None if at_k is None else at_k["faithfulness"]["value"],
            "completeness": None if at_k is None else at_k["completeness"]["value"],
            "best": None if best is None else {"k": best["k"], "faithfulness": best["faithfulness"]["value"]},
            "features_all": (curves.get("features_all") or {}).get("value"),
            "bound": curves["bound"]["value"], "named": [n["node"] for n in result.get("named") or []],
            **({"matched": matched} if matched is not None else {}),
            "seconds": result.get("seconds")}


def ranked_features(primary: dict, top_k: int) -> tuple[list, float | None]:
    """The features whose counterparts each seed check measures: the attribution's named set; where it named none,
    the features the ablate stage takes in its place, the ``top_k`` of largest positive attribution (errors left
    out; :func:`irmprobe.validation.ablation.attributed_features`), so that the set ablated while the tuned model
    samples is checked across seeds too. Returns ``(nodes, what they carry)``: the faithfulness of the run's
    features-only curve at their count where the curve has it (None for a named set, whose share the verdict
    already gives, or a count off the curve's grid)."""
    from irmprobe.validation.ablation import attributed_features
    from irmprobe.validation.attribution import Node

    if primary.get("named"):
        return [Node.parse(n["node"]) for n in primary["named"]], None
    chosen = attributed_features(primary, top_k)
    if chosen is None:
        return [], None
    nodes = [Node(layer, i) for layer, idx in sorted(chosen[1].items()) for i in idx]
    # The curve's k-sets are the top k features by signed attribution, errors left out: with the positive ones
    # first, its set of len(nodes) features is ``nodes``.
    row = next((r for r in primary["curves"].get("feature_rows", []) if r["k"] == len(nodes)), None)
    return nodes, None if row is None else row["faithfulness"]["value"]


class SeedsStage(Stage):
    """Redo the attribution with ``seeds.checks`` more sets of its dictionaries (other seeds). Resumable: each
    check's summary is written as it ends, and an interrupted run redoes only the checks not written."""

    # 2: the named features' counterparts in each seed's dictionaries; 3: without a named set, the ablated top k's;
    # 4: beside the counterparts' share, the range of random sets of as many features of that seed's dictionaries
    name, version, resumable = "seeds", 4, True
    reads = ("seeds", "attribute", "capture.hook", "seed", "sae", "validate.top_k")
    needs = ("organism", "samples", "layers", "capture", "saes", "attribute")

    def skips(self, cfg, ctx, inputs):
        if not cfg.seeds.checks:
            return "seeds.checks is 0"
        if "skipped" in inputs["attribute"]:
            return f"no attribution ({inputs['attribute']['skipped']})"
        return None

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.validation.attribution import counterparts

        ac, primary = cfg.attribute, inputs["attribute"]
        reason = self.skips(cfg, ctx, inputs)
        if reason is not None:
            result = {"skipped": reason}
        else:
            started = time.perf_counter()
            layers, capture, samples = inputs["layers"].chosen, inputs["capture"], inputs["samples"]
            change = ac.dictionary == "change"
            first = cfg.seed if not change or ac.change_seed is None else ac.change_seed
            kw = dict(capture_key=ctx.input_keys["capture"], device=ctx.runtime.device, force=ctx.forced)
            named, ranked = ranked_features(primary, cfg.validate.top_k)
            # The run's own dictionaries, whose named features are matched to each check's by decoder cosine: the
            # change's from the paths the attribute stage recorded (an error if they left the cache, never a silent
            # retraining that the named indices would not point into); the activations' are the saes stage's SAEs.
            own = None
            if named:
                from irmprobe.validation.ablation import load_change_dictionaries

                own = (load_change_dictionaries(primary, ctx.runtime.device) if change
                       else {layer: inputs["saes"].saes["tuned", layer] for layer in layers})
            checks = []
            for i in range(1, cfg.seeds.checks + 1):
                seed = first + SEED_STEP * i
                done = out / f"check-{seed}.json"
                if done.is_file():  # an interrupted run's finished check
                    ctx.echo(f"seeds: check {i} of {cfg.seeds.checks} (seed {seed}) was done before")
                    checks.append(json.loads(done.read_text()))
                    continue
                ctx.echo(f"seeds: check {i} of {cfg.seeds.checks}: dictionaries of the "
                         f"{'change' if change else 'activations'} with seed {seed} (block l: {seed} + l)")
                saes, rows = (change_dictionaries(cfg, capture, samples, layers, change_seed=seed, **kw) if change
                              else activation_dictionaries(cfg, capture, samples, layers, seed=seed, **kw))
                other = attribute(ac, cfg.seed, ctx.runtime, ctx.pair_of(inputs["organism"]), samples, capture, saes,
                                  layers, cfg.capture.hook, echo=ctx.echo, change=change, dictionaries=rows,
                                  hook_points=False,  # no dictionary in them: the run's own
                                  match=counterparts(named, own, saes) if named else None)
                checks.append(seed_check(other, seed))
                write_json(done, checks[-1])
            # Whether the named set holds is read off primary and checks (analysis.verdict.seeds_hold), not stored.
            result = {"dictionary": ac.dictionary, "primary": seed_check(primary, first), "checks": checks,
                      "max_k": max(ac.k_grid), "threshold": ac.threshold, "seconds": time.perf_counter() - started,
                      **({"matched_set": {"kind": "top", "k": len(named), "nodes": [n.name for n in named],
                                          "faithfulness": ranked}} if named and not primary.get("named") else {})}
        write_json(out / "seeds.json", result)
        return result

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "seeds.json").read_text())

    def summary(self, result):
        from irmprobe.analysis.verdict import seeds_text

        return f"skipped ({result['skipped']})" if "skipped" in result else seeds_text(result).lstrip("; ")
