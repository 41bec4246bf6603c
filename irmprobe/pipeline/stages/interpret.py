"""The interpret stage: the judge explains and labels features, compared with the IRM's choice."""

from __future__ import annotations

import json

from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage


def skip_reason(cfg, ctx, inputs) -> str | None:
    if not cfg.validate.enabled:
        return "validate.enabled is off"
    if inputs["organism"].tuned is None:
        return "the null organism has no implicit reward to validate"
    if cfg.irm.inputs != "tuned":
        return "it needs irm.inputs=tuned (the ablation splices the tuned model's SAEs where they were trained)"
    return None


def feature_design(ctx, inputs, inputs_kind: str):
    from irmprobe.analysis.views import probe_inputs

    return probe_inputs(inputs_kind, inputs["capture"].acts, inputs["saes"].saes, inputs["layers"].chosen)


class InterpretStage(Stage):
    name, version = "interpret", 3
    # The validate fields it uses, not the section: the ablation's sampling settings make nothing here.
    reads = ("validate.enabled", "validate.top_k", "validate.n_judged", "validate.judge", "validate.concept", "llm",
             "irm.inputs", "capture.hook", "capture.text_path", "capture.text_dataset", "capture.text_column",
             "capture.max_text_tokens", "capture.max_texts", "seed")
    needs = ("organism", "samples", "layers", "capture", "saes", "fit")

    def fingerprint(self, cfg, ctx):
        # Off mlp_out this stage used to skip (the ablation spliced every SAE at the MLP output): a new key there, so
        # a cached skip is not reused. At mlp_out the key is unchanged.
        if cfg.capture.hook == "hook_mlp_out":
            return ctx.rm.describe()
        return ctx.rm.describe(), "runs at every hook point"

    def skips(self, cfg, ctx, inputs):
        return skip_reason(cfg, ctx, inputs)

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.pipeline.stages.fit import chat_client
        from irmprobe.validation.interpret import interpret, make_judge

        reason = self.skips(cfg, ctx, inputs)
        if reason:
            ctx.echo(f"validate: skipped; {reason}")
            result = {"skipped": reason}
        else:
            pair = ctx.pair_of(inputs["organism"])
            rm_map = ctx.rm.token_values(pair.tokenizer)
            X, names = feature_design(ctx, inputs, cfg.irm.inputs)
            vc = cfg.validate
            judge = make_judge(vc, ctx.runtime, pair, rm_map, chat_client(cfg.llm) if vc.judge == "llm" else None)
            from irmprobe.activations.capture import extra_texts

            # Every captured sequence, extra texts included: feature contexts are read from them.
            streams = list(inputs["samples"].token_ids) + extra_texts(cfg.capture, pair.tokenizer)
            result = interpret(vc, cfg.seed, pair, inputs["capture"], X, names, inputs["fit"].coef,
                               inputs["saes"].saes, rm_map, streams, judge=judge)
        write_json(out / "interpretation.json", result)
        return result

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "interpretation.json").read_text())

    def summary(self, result):
        if "skipped" in result:
            return "skipped"
        cross = result["cross"]
        return f"{cross['n_flagged']} of {cross['n_judged']} features flagged; kappa {cross['kappa']}"
