"""The ablate stage: features the IRM relies on ablated while the tuned model samples; patching bounds."""

from __future__ import annotations

import json

from irmprobe.analysis.verdict import sampling_text
from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage
from irmprobe.pipeline.stages.interpret import feature_design


class AblateStage(Stage):
    """Ablate the reader- and decision-side IRMs' top features, random ones and patch the chosen layers during
    generation; each row gives the share of the reward gain (tuned - base) it removes."""

    name, version = "ablate", 9  # 9: the sampler's uniforms are drawn sample-major (other samples than 8's)
    reads = ("validate", "irm.inputs", "capture.hook", "seed")
    optional_reads = ("attribute.dictionary",)  # change: its features are ablated with the base in lockstep
    needs = ("organism", "layers", "capture", "saes", "fit", "attribute", "interpret")

    def fingerprint(self, cfg, ctx):
        # Keys that predate these changes stay valid at mlp_out with the activations' dictionaries (nothing moved):
        # off mlp_out each SAE is now spliced at its own hook point (it was spliced at mlp_out), and the random sets
        # of change features now match the named set's count at each hook point, and the decision-side view on the
        # dictionaries of the change has its top features ablated too.
        tags = (("SAEs spliced at their own hook point",) if cfg.capture.hook != "hook_mlp_out" else ()) + \
            (("random change sets matched per hook point", "the change view's top features") if
             cfg.attribute.dictionary == "change" else ())
        return (ctx.rm.describe(), *tags) if tags else ctx.rm.describe()

    def skips(self, cfg, ctx, inputs):
        return "the interpret stage was skipped" if "skipped" in inputs["interpret"] else None

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.validation.ablation import ablate

        if self.skips(cfg, ctx, inputs):
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
        design = sampling_text(result)
        return "share of the reward gain removed: " + "; ".join(shares) + ("" if design is None else f" ({design})")
