"""The run's typed metrics from the stage results (what the report stage writes)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from irmprobe.analysis.verdict import verdict
from irmprobe.cache import config_key
from irmprobe.pipeline.stage import Stage
from irmprobe.results import SCHEMA_VERSION, RunMetrics


class ReportStage(Stage):
    """Assemble the run's typed metrics, the verdict, metrics.json, the HTML report and the W&B run."""

    name, cached = "report", False
    reads = ("report",)
    needs = ("organism", "samples", "layers", "capture", "saes", "fit", "compare", "discover", "depth", "attribute",
             "seeds", "interpret", "ablate", "dashboard")

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.reporting.html import write_html, write_metrics
        from irmprobe.reporting.tracking import log_to_wandb

        runner, config = ctx.resources["runner"], ctx.resources["config"]
        metrics = metrics_of(config, ctx, inputs, runner)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.report.out_dir) / f"run-{stamp}-{config_key(config)[:8]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        # metrics.json and the report first: a W&B failure must not lose the run's numbers.
        path = write_metrics(run_dir / "metrics.json", metrics)
        report = write_html(metrics, run_dir / "report.html")
        wandb_dir = log_to_wandb(metrics, config.to_dict(), project=cfg.report.wandb_project,
                                 mode=cfg.report.wandb_mode, run_dir=run_dir, report=report)
        if wandb_dir is not None:
            metrics = metrics.replace(wandb_dir=wandb_dir)
            write_metrics(path, metrics)
            write_html(metrics, report)
        return metrics, path

    def summary(self, result):
        return str(result[1])


def _redacted(config) -> dict:
    """The config as JSON, with any credentials in URLs removed."""
    data = config.to_dict()
    try:
        from irmprobe.llm import redact_url
    except ImportError:  # pragma: no cover
        return data
    if data.get("llm", {}).get("base_url"):
        data["llm"]["base_url"] = redact_url(data["llm"]["base_url"])
    return data


def token_value_rule(rm) -> str:
    """In words: how this RM's token map was made (the report says it beside every per-token number)."""
    from irmprobe.models.rewards import LexiconRM, NegatedRM, RandomRM

    if isinstance(rm, NegatedRM):
        return "negated: " + token_value_rule(rm.rm)
    if isinstance(rm, RandomRM):
        return "none (a random reward values no token)"
    if isinstance(rm, LexiconRM):
        return ("lexicon value of whole-word tokens" if rm.word_pieces == "whole" else
                "lexicon value of whole-word tokens and of the first token of several-token words")
    return (f"centred marginal effect over {rm.token_contexts} carrier sentences; valued when |effect| exceeds "
            f"{rm.token_margin:g} robust SD of the vocabulary's (BH q < {rm.token_alpha:g})")


def metrics_of(config, ctx, inputs, runner) -> RunMetrics:

    org, layers, capture, saes = inputs["organism"], inputs["layers"], inputs["capture"], inputs["saes"]
    fit, cmp, interpretation, ablation = inputs["fit"], inputs["compare"], inputs["interpret"], inputs["ablate"]
    report = cmp.report
    pair = ctx.pair_of(org)
    validation = None if "skipped" in interpretation else interpretation | {"ablation": ablation}
    metrics = RunMetrics(
        schema_version=SCHEMA_VERSION, config=_redacted(config), organism=org.to_json(), layers=layers.to_json(),
        capture={"rows": int(len(capture.token_ids)), "sequences": len(inputs["samples"].token_ids),
                 "hook": capture.hook, "layers": list(capture.layers),
                 "prompt_format": "chat_template" if ctx.chat_template else "plain"},
        saes=saes.record.rows, sae_layers=saes.record.layer_rows,
        reward=report["reward"] | {"n_prompts": report["n_prompts"], "samples_per_prompt": report["samples_per_prompt"]},
        kl=report["kl"], vader_compound=report["vader_compound"], examples=report["examples"],
        irm={"inputs": fit.record.inputs, "n_features": len(fit.record.feature_names), "n_rows": fit.record.n_rows,
             "n_heldout_rows": fit.record.n_heldout_rows, "fits": fit.record.fits, "triples": fit.record.triples,
             "path": str(fit.path)},
        agreement=cmp.agreement, full_vocabulary=cmp.full_vocabulary, primary=cmp.primary, control=cmp.control,
        control_agreement=cmp.control_agreement, disagreements=cmp.disagreements,
        feature_alignment=cmp.feature_alignment, tokens=cmp.tokens,
        rm={"tokens_with_value": len(ctx.rm.token_values(pair.tokenizer)),
            "token_value_rule": token_value_rule(ctx.rm), **ctx.rm.describe()},
        verdict=[], stage_seconds=dict(runner.seconds), stage_status=dict(runner.status), pca=cmp.pca,
        validation=validation, discovery=inputs["discover"].to_json(), explanation=cmp.explanation,
        attribution=inputs["attribute"] | ({"seed_checks": inputs["seeds"]} if "checks" in inputs["seeds"] else {}),
        depth=inputs["depth"], dashboard=inputs["dashboard"])
    return metrics.replace(verdict=verdict(metrics, is_null=org.tuned is None))
