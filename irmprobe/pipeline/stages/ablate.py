"""The ablate stage: features the IRM relies on ablated while the tuned model samples; patching bounds."""

from __future__ import annotations

import json

from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage
from irmprobe.pipeline.stages.interpret import feature_design


class AblateStage(Stage):
    """Ablate the reader- and decision-side IRMs' top features, random ones and patch the chosen layers during
    generation; each row gives the share of the reward gain (tuned - base) it removes."""

    name, version = "ablate", 8
    reads = ("validate", "irm.inputs", "capture.hook", "seed")
    optional_reads = ("attribute.dictionary",)  # change: its features are ablated with the base in lockstep
    needs = ("organism", "layers", "capture", "saes", "fit", "attribute", "interpret")

    def fingerprint(self, cfg, ctx):
        # Off mlp_out the rows changed: each SAE is now spliced at its own hook point (it was spliced at mlp_out).
        # At mlp_out nothing moved, so those cached rows stay valid (and the key unchanged).
        if cfg.capture.hook == "hook_mlp_out":
            return ctx.rm.describe()
        return ctx.rm.describe(), "SAEs spliced at their own hook point"

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.validation.ablation import ablate

        if "skipped" in inputs["interpret"]:
            rows = None
        else:
            X, names = feature_design(ctx, inputs, cfg.irm.inputs)
            rows = ablate(cfg.validate, cfg.seed, ctx.runtime, ctx.pair_of(inputs["organism"]), inputs["capture"],
                          X, names, inputs["saes"].saes, ctx.rm, ctx.heldout, inputs["interpret"],
                          decision_coef=getattr(inputs["fit"], "decision_coef", None), hook=cfg.capture.hook,
                          attribution=inputs["attribute"], echo=ctx.echo)
        write_json(out / "ablation.json", {"rows": rows})
        return rows

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "ablation.json").read_text())["rows"]

    def summary(self, result):
        if not result:
            return "skipped"
        shares = [f"{r['set'].split(' (')[0]} {r['gain_share']['share']:+.2f}" for r in result[2:]
                  if r.get("gain_share") and not r["set"].startswith("random_")]
        return "share of the reward gain removed: " + "; ".join(shares)
