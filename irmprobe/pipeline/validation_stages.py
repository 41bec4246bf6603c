"""Validation (judge and ablate the IRM's features in the tuned model) and the report."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from irmprobe.cache import config_key, write_json
from irmprobe.pipeline.stage import Stage


def _skip_reason(cfg, ctx, inputs) -> str | None:
    if not cfg.validate.enabled:
        return "validate.enabled is off"
    if inputs["organism"].tuned is None:
        return "the null organism has no implicit reward to validate"
    if cfg.irm.inputs != "tuned" or cfg.capture.hook != "hook_mlp_out":
        return ("it needs irm.inputs=tuned and capture.hook=hook_mlp_out (the ablation splices SAEs at the MLP "
                "output)")
    return None


def _design(ctx, inputs, inputs_kind: str):
    from irmprobe.views import probe_inputs

    return probe_inputs(inputs_kind, inputs["capture"].acts, inputs["saes"].saes, inputs["layers"].chosen)


class InterpretStage(Stage):
    name, version = "interpret", 3
    reads = ("validate", "llm", "irm.inputs", "capture.hook", "capture.text_path", "capture.text_dataset",
             "capture.text_column", "capture.max_text_tokens", "capture.max_texts", "seed")
    needs = ("organism", "samples", "layers", "capture", "saes", "fit")

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe()

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.evals.validate import interpret, make_judge
        from irmprobe.fitting import chat_client
        from irmprobe.pipeline.stages import pair_of

        reason = _skip_reason(cfg, ctx, inputs)
        if reason:
            ctx.echo(f"validate: skipped; {reason}")
            result = {"skipped": reason}
        else:
            pair = pair_of(ctx, inputs["organism"])
            rm_map = ctx.rm.token_values(pair.tokenizer)
            X, names = _design(ctx, inputs, cfg.irm.inputs)
            vc = cfg.validate
            judge = make_judge(vc, ctx.runtime, pair, rm_map, chat_client(cfg.llm) if vc.judge == "llm" else None)
            from irmprobe.sampling import extra_texts

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


class AblateStage(Stage):
    """Ablate the reader- and decision-side IRMs' top features, random ones and patch the chosen layers during
    generation; each row gives the share of the reward gain (tuned - base) it removes."""

    name, version = "ablate", 5
    reads = ("validate", "irm.inputs", "capture.hook", "seed")
    needs = ("organism", "layers", "capture", "saes", "fit", "interpret")

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe()

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.evals.validate import ablate
        from irmprobe.pipeline.stages import pair_of

        if "skipped" in inputs["interpret"]:
            rows = None
        else:
            X, names = _design(ctx, inputs, cfg.irm.inputs)
            rows = ablate(cfg.validate, cfg.seed, ctx.runtime, pair_of(ctx, inputs["organism"]), inputs["capture"],
                          X, names, inputs["saes"].saes, ctx.rm, ctx.heldout, inputs["interpret"],
                          decision_coef=getattr(inputs["fit"], "decision_coef", None), hook=cfg.capture.hook,
                          echo=ctx.echo)
        write_json(out / "ablation.json", {"rows": rows})
        return rows

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "ablation.json").read_text())["rows"]

    def summary(self, result):
        if not result:
            return "skipped"
        shares = [f"{r['set'].split(' (')[0]} {r['gain_share']['share']:+.2f}" for r in result[2:]
                  if r.get("gain_share")]
        return "share of the reward gain removed: " + "; ".join(shares)


class ReportStage(Stage):
    """Assemble the run's typed metrics, the verdict, metrics.json, the HTML report and the W&B run."""

    name, cached = "report", False
    reads = ("report",)
    needs = ("organism", "samples", "layers", "capture", "saes", "fit", "compare", "discover", "interpret", "ablate")

    def run(self, cfg, ctx, inputs, out):
        from irmprobe import reporting
        from irmprobe.pipeline.assemble import metrics_of

        runner, config = ctx.resources["runner"], ctx.resources["config"]
        metrics = metrics_of(config, ctx, inputs, runner)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.report.out_dir) / f"run-{stamp}-{config_key(config)[:8]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        # metrics.json first: a W&B failure must not lose the run's numbers.
        path = reporting.write_metrics(run_dir / "metrics.json", metrics)
        wandb_dir = reporting.log_to_wandb(metrics, config.to_dict(), project=cfg.report.wandb_project,
                                           mode=cfg.report.wandb_mode, run_dir=run_dir)
        metrics = metrics.replace(wandb_dir=wandb_dir)
        reporting.write_metrics(path, metrics)
        reporting.write_html(metrics, run_dir / "report.html")
        return metrics, path

    def summary(self, result):
        return str(result[1])
