"""Reports: the summary table on stdout, the metrics JSON, and the W&B run.

This is the only module that imports wandb. W&B runs offline unless the user configured it
online (``report.wandb_mode: online`` or ``WANDB_MODE=online``); no API key is ever written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from irmprobe.cache import write_json


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def summary_lines(metrics: dict) -> list[str]:
    """Human-readable summary of a run's metrics."""
    lines: list[str] = []
    org = metrics["organism"]
    rw = metrics["reward"]
    lines.append("== organism ==")
    lines.append(f"tuned model      {org['source']}")
    lines.append(
        f"reward (RM)      base {rw['base_mean']:+.3f} ± {rw['base_se']:.3f}   tuned {rw['tuned_mean']:+.3f} ± "
        f"{rw['tuned_se']:.3f}   (mean ± s.e. over {rw['n_prompts']} held-out prompts × {rw['samples_per_prompt']} samples)"
    )
    lines.append(
        f"tuned - base     {rw['diff_mean']:+.3f} ± {rw['diff_se']:.3f}  =  {_fmt(rw['diff_z'], '.1f')} s.e. (paired by prompt)"
    )
    vc = metrics["vader_compound"]
    lines.append(
        f"VADER compound   base {vc['base_mean']:+.3f} ± {vc['base_se']:.3f}   tuned {vc['tuned_mean']:+.3f} ± "
        f"{vc['tuned_se']:.3f}   (VADER's own sentence score, an independent check)"
    )
    kl = metrics["kl"]
    lines.append(f"KL(tuned || base) {kl['mean']:.3f} ± {kl['se']:.3f} nats per continuation")
    for ex in metrics["examples"][:2]:
        lines.append(f"prompt: {ex['prompt']}")
        lines.append(f"  base  ({ex['base_reward']:+.2f}): {ex['base']!r}")
        lines.append(f"  tuned ({ex['tuned_reward']:+.2f}): {ex['tuned']!r}")
    div = metrics["layers"]
    lines.append(f"== layers (divergence tuned - base, per block and submodule; * = chosen, ranked by {div['ranked_by']}) ==")
    lines.extend(div["table"])
    lines.append(
        "chosen blocks    " + ", ".join(f"{l} (|Δθ| {div['per_block'][l]:.3f})" for l in div["chosen"])
    )
    lines.append("== SAEs (held-out activations) ==")
    lines.append(f"{'model':<6} {'layer':>5} {'d_sae':>6} {'expl.var':>9} {'L0':>8} {'dead':>6} {'dense':>6} "
                 f"{'CE rec.':>8} {'KL':>7} {'MMCS 1x:2x':>10}")
    for row in metrics["saes"]:
        lines.append(
            f"{row['model']:<6} {row['layer']:>5} {row['d_sae']:>6} {row['explained_variance']:>9.3f} "
            f"{row['l0']:>8.1f} {row['dead_fraction']:>6.3f} {row['dense_fraction']:>6.3f} "
            f"{_fmt(row.get('ce_loss_recovered'), '.3f'):>8} {_fmt(row.get('kl_spliced'), '.3f'):>7} "
            f"{_fmt(row.get('mmcs_small_vs_large'), '.3f'):>10}"
        )
    for row in metrics.get("sae_layers", []):
        lines.append(f"layer {row['layer']}: {row['tuned_only_features']} tuned-model features with no base match "
                     f"(MMCS tuned vs base {row['mmcs_tuned_vs_base']:.3f})")
    lines.append("== IRM vs RM (Kendall tau paired by token; sign accuracy on RM-positive / RM-negative tokens) ==")
    lines.append(f"{'view':<26} {'tokens':>6} {'tau':>7} {'p':>9} {'sign+':>6} {'sign-':>6} {'R2 test':>8}")
    for row in metrics["agreement"]:
        if row["is_zero"]:
            lines.append(f"{row['name']:<26} {row['n_tokens']:>6}   identically zero: no implicit reward learned")
            continue
        if row.get("tau") is None:
            lines.append(f"{row['name']:<26} {row['n_tokens']:>6}   no figure: {row.get('note')}")
            continue
        p = f"{row['p_value']:>9.2e}" if row.get("p_value") is not None else f"{'sd ' + format(row['tau_sd'], '.3f'):>9}"
        lines.append(
            f"{row['name']:<26} {row['n_tokens']:>6} {row['tau']:>+7.3f} {p} "
            f"{_fmt(row['sign_acc_pos'], '.2f'):>6} {_fmt(row['sign_acc_neg'], '.2f'):>6} "
            f"{_fmt(row.get('test_r2'), '.3f'):>8}"
        )
    lines.append("== verdict ==")
    lines.extend(metrics["verdict"])
    lines.append("== stage times (s) ==")
    lines.append("  ".join(f"{k} {v:.0f}" for k, v in metrics["stage_seconds"].items()))
    return lines


def wandb_mode(configured: str | None) -> str:
    """Offline unless configured otherwise in the run config or by WANDB_MODE."""
    if configured:
        return configured
    env = os.environ.get("WANDB_MODE")
    return env if env in ("online", "offline", "disabled") else "offline"


def _flatten(prefix: str, obj: Any, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj


def log_to_wandb(metrics: dict, config: dict, token_rows: list[list], *, project: str,
                 mode: str | None, run_dir: Path) -> str | None:
    """Send config, scalar metrics and the token table to a W&B run; return its directory."""
    if wandb_mode(mode) == "disabled":
        return None
    import wandb

    run = wandb.init(project=project, mode=wandb_mode(mode), dir=str(run_dir), config=config,
                     reinit="finish_previous")
    try:
        scalars: dict[str, float] = {}
        for key in ("reward", "kl"):
            _flatten(key, metrics[key], scalars)
        for row in metrics["saes"]:
            for k in ("explained_variance", "l0", "dead_fraction", "dense_fraction", "mse", "ce_loss_recovered",
                      "kl_spliced", "mmcs_small_vs_large", "mmcs_small_vs_large_one_to_one"):
                if row.get(k) is None:
                    continue
                scalars[f"sae/{row['model']}.{row['layer']}/{k}"] = row[k]
        for row in metrics.get("sae_layers", []):
            scalars[f"sae/layer{row['layer']}/tuned_only_features"] = row["tuned_only_features"]
        for row in metrics["agreement"]:
            for k in ("tau", "tau_sd", "tau_max", "p_value", "sign_acc_pos", "sign_acc_neg", "n_tokens", "test_r2"):
                if row.get(k) is not None:
                    scalars[f"irm/{row['name']}/{k}"] = row[k]
        for stage, seconds in metrics["stage_seconds"].items():
            scalars[f"time/{stage}"] = seconds
        # TRL's training curves of the organism, one point per logging step.
        for row in metrics["organism"].get("history", []):
            curve = {f"organism/{k}": v for k, v in row.items() if k not in ("step", "epoch")}
            if "step" in row and curve:
                run.log({"organism/step": row["step"], **curve})
        run.log(scalars)
        run.log({"tokens": wandb.Table(columns=metrics["tokens"]["columns"], data=token_rows)})
        run.summary["verdict"] = "\n".join(metrics["verdict"])
        return str(run.dir)
    finally:
        run.finish()


def write_metrics(path: Path, metrics: dict) -> Path:
    return write_json(path, metrics)
