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


def _interval(ci, spec: str) -> str:
    """``[low,high]``; "undefined" when the bootstrap gave no bounds (resamples with no reward gain to share)."""
    if ci is None or any(v is None for v in ci):
        return "undefined"
    return f"[{format(ci[0], spec)},{format(ci[1], spec)}]"


def _trained(row: dict) -> str:
    """Samples an SAE trained on, "stop" when held-out explained variance plateaued first (older rows: "-")."""
    if row.get("trained_samples") is None:
        return "-"
    return f"{row['trained_samples']:,}" + (" stop" if row.get("stopped_early") else "")


def plain(metrics) -> dict:
    """The JSON form of a run's typed metrics (a dict read from metrics.json is checked against the schema)."""
    from irmprobe.results import RunMetrics

    if isinstance(metrics, RunMetrics):
        return metrics.to_json()
    return RunMetrics.from_json(metrics).to_json()


def summary_lines(metrics) -> list[str]:
    """Human-readable summary of a run's :class:`irmprobe.results.RunMetrics`."""
    metrics = plain(metrics)
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
                 f"{'CE rec.':>8} {'KL':>7} {'MMCS 1x:2x':>10} {'trained on':>14}")
    for row in metrics["saes"]:
        lines.append(
            f"{row['model']:<6} {row['layer']:>5} {row['d_sae']:>6} {row['explained_variance']:>9.3f} "
            f"{row['l0']:>8.1f} {row['dead_fraction']:>6.3f} {row['dense_fraction']:>6.3f} "
            f"{_fmt(row.get('ce_loss_recovered'), '.3f'):>8} {_fmt(row.get('kl_spliced'), '.3f'):>7} "
            f"{_fmt(row.get('mmcs_small_vs_large'), '.3f'):>10} {_trained(row):>14}"
        )
    for row in metrics.get("sae_layers", []):
        lines.append(f"layer {row['layer']}: {row['tuned_only_features']} tuned-model features with no base match "
                     f"(MMCS tuned vs base {row['mmcs_tuned_vs_base']:.3f})")
    irm = metrics["irm"]
    lines.append(f"== IRM views vs RM, out of fold (every view cross-fitted on two halves of the sequences: each of "
                 f"{irm['n_heldout_rows']} rows of {irm['n_rows']} scored by a model fitted on the other half; Kendall "
                 "tau paired by token with bootstrap 95% CI; sign accuracy on RM+/RM- tokens; text tau = IRM text score "
                 "vs RM reward of each generation, out of fold) ==")
    has_control = any(r.get("control_tau") is not None or r.get("control_is_zero") for r in metrics["agreement"])
    head = (f"{'view':<22} {'family':<11} {'tokens':>6} {'tau':>7} {'95% CI':>17} {'p':>8} {'rho':>6} "
            f"{'sign+':>5} {'sign-':>5} {'text tau':>8} {'R2 test':>7}")
    lines.append(head + (f" {'control':>7} {'above':>7}" if has_control else ""))
    for row in metrics["agreement"]:
        lines.append(agreement_line(row, has_control))
    lines.append("baseline_shuffled: its interval is the RANGE (min, max) of tau over its fits, not a confidence interval.")
    if metrics.get("full_vocabulary"):
        lines.append("== full-vocabulary log-ratio (its own token set: every vocabulary token the RM values; not fitted) ==")
        for row in metrics["full_vocabulary"]:
            lines.append(agreement_line(row, has_control))
    for c in metrics.get("control") or []:
        lines.append(f"{c['branch']}: the base tuned with {c['method'].upper()} for {c['steps']} steps (lr "
                     f"{c['learning_rate']:g}, beta {c['beta']:g}, batch {c['batch']}, LoRA rank {c['lora_rank']}) "
                     f"against {c['reward']['name']} (a random reward), its own samples, layers {c['layers']}, capture "
                     f"and SAEs: {'MATCHED to the organism but for the reward' if c['matched'] else 'NOT known to match'}; "
                     f"RM reward tuned - base {c['reward_diff']['diff_mean']:+.3f} ± {c['reward_diff']['diff_se']:.3f}, "
                     f"KL {c['kl']['mean']:.3f}.")
    if metrics.get("control"):
        lines.append("'control' is the mean tau of the control organism(s); 'above' the view's margin over it.")
    p = metrics.get("primary")
    if p and p.get("z") is not None:
        lines.append(f"primary comparison: {p['view']} tau {p['tau']:+.3f} ± {p['tau_se']:.3f} vs controls "
                     f"{[round(t, 3) for t in p['control_taus']]} (spread {p['control_se']:.3f}): z {p['z']:+.1f} -> "
                     f"{p['outcome']}")
    if metrics.get("discovery"):
        lines.extend(discovery_section(metrics["discovery"]))
    for name, d in (metrics.get("disagreements") or {}).items():
        lines.append(f"== where {name} and RM disagree most (token, IRM value, RM value) ==")
        for label, key in (("IRM >> RM", "irm_over_rm"), ("RM >> IRM", "rm_over_irm")):
            lines.append(f"{label}: " + ", ".join(f"{t!r} ({a:+.2f}, {b:+.2f})" for t, a, b, _ in d[key]))
    fa = metrics.get("feature_alignment")
    if fa:
        lines.append("== feature alignment (sae_irm weight vs correlation with RM value; top tokens) ==")
        for label, key in (("IRM rewards, RM does not (candidate reward hacking)", "irm_not_rm"),
                           ("RM tracks, IRM does not reward", "rm_not_irm")):
            lines.append(label + ":")
            for e in fa[key][:5]:
                lines.append(f"  {e['feature']:<14} weight {e['weight']:+.4f}  RM corr {e['rm_corr']:+.3f}  "
                             f"freq {e['frequency']:.3f}  {e['top_tokens']}")
    val = metrics.get("validation")
    if val:
        cross = val["cross"]
        lines.append(f"== validation: {val['judge']} judge on {cross['n_judged']} features (IRM top-{cross['n_irm_top']} "
                     "included) ==")
        lines.append(f"flagged {cross['n_flagged']}; overlap with IRM top-k {cross['overlap']}; precision "
                     f"{_fmt(cross['precision'], '.2f')}, recall {_fmt(cross['recall'], '.2f')}, Cohen's kappa "
                     f"{_fmt(cross['kappa'], '+.2f')}; detection (balanced acc.) {_fmt(cross.get('detection_mean'), '.2f')}")
        lines.append(f"activation frequency: flagged {_fmt(cross['flagged_frequency'], '.4f')} vs dictionary mean "
                     f"{cross['dictionary_frequency']:.4f}")
        for r in [r for r in val["judged"] if r["in_irm_top_k"]][:5]:
            lines.append(f"  {r['feature']:<14} w {r['weight']:+.4f} {'FLAGGED' if r['relevant'] else '       '} "
                         f"{r['explanation'][:90]}")
    if val and val.get("ablation"):
        lines.append("== ablation in the tuned model (RM reward of continuations, paired by prompt & sample; share = "
                     "(tuned - row) / (tuned - base): the share of the reward gain the row removes, 95% bootstrap CI) ==")
        lines.append(f"{'set':<44} {'mode':<6} {'n':>3} {'reward':>8} {'95% CI':>17} {'share':>7} {'95% CI':>17}")
        for r in val["ablation"]:
            rw, g = r["reward"], r.get("gain_share")
            g_text = f"{g['share']:>+7.2f} {_interval(g['ci'], '+.2f'):>17}" if g else f"{'-':>7} {'-':>17}"
            lines.append(f"{r['set'][:44]:<44} {r['mode'][:6]:<6} {r['n_features']:>3} {rw['mean']:>+8.3f} "
                         f"{_interval(rw['ci'], '+.3f'):>17} {g_text}")
    lines.append("== verdict ==")
    lines.extend(metrics["verdict"])
    lines.append("== stage times (s; * = reused from the cache) ==")
    status = metrics.get("stage_status", {})
    lines.append("  ".join(f"{k}{'*' if status.get(k) == 'reused' else ''} {v:.0f}"
                           for k, v in metrics["stage_seconds"].items()))
    return lines


_CATEGORY_TEXT = {"rewarded_unvalued": "rewarded, RM zero", "rewarded_against": "rewarded against the RM",
                  "penalised_unvalued": "penalised, RM zero", "penalised_against": "penalised against the RM"}


def discovery_section(d: dict) -> list[str]:
    """What the RM does not explain: discovered tokens, concepts, the RM's share of the IRM, pairwise accuracy."""
    vs = d["control"] or "zero (no control organism)"
    lines = [f"== what the RM does not explain (generated tokens, one per distinct context; log-ratio vs {vs}, Welch t, Benjamini-Hochberg "
             f"q < {d['alpha']:g}) =="]
    v = d["variance"]
    if v.get("residual_share") is not None:
        lines.append(f"the RM explains {max(v['linear'], v['monotone']):.1%} of the primary IRM's held-out variance "
                     f"(linear {v['linear']:.3f}, monotone {v['direction']} {v['monotone']:.3f}; cross-fitted by "
                     f"sequence, {v['n']} rows): {v['residual_share']:.1%} is not the RM")
    else:
        lines.append(f"RM share of the IRM's variance: {v.get('note')}")
    lines.append(f"{d['n_tested']} of {d['n_tokens_seen']} generated tokens tested; discoveries: "
                 + ", ".join(f"{k} {n}" for k, n in d["counts"].items()))
    for cat, label in _CATEGORY_TEXT.items():
        entries = d["entries"].get(cat) or []
        if entries:
            lines.append(f"{label}: " + ", ".join(
                f"{e['token']!r} {e['irm_value']:+.2f} [{e['ci_low']:+.2f},{e['ci_high']:+.2f}] RM "
                f"{_fmt(e['rm_value'], '+.1f')} n {e['count']} ctrl {_fmt(e['control_value'], '+.2f')} q {e['q']:.1e}"
                for e in entries))
    for c in d["concepts"]:
        lines.append(f"concept {c['feature']:<14} weight {c['weight']:+.4f}  RM corr {c['rm_corr']:+.3f}  q "
                     f"{c['min_q']:.1e}  tokens {', '.join(repr(t) for t in c['labels'])}")
    for label, key in (("IRM >> RM (residual)", "irm_over_rm"), ("RM >> IRM (residual)", "rm_over_irm")):
        if d["residual"].get(key):
            lines.append(f"{label}: " + ", ".join(f"{r['token']!r} ({r['residual']:+.2f})" for r in d["residual"][key]))
    lines.append(f"== the IRM as a reward model: pairwise accuracy on {d['pairs_source']} ==")
    return lines + pairwise_lines(d["pairwise"])


def pairwise_lines(rows: list[dict]) -> list[str]:
    """The pairwise-accuracy table: each scorer's accuracy (Wilson 95% CI) and agreement with the RM's choice."""
    lines = [f"{'scorer':<36} {'accuracy':>8} {'95% CI':>15} {'pairs':>6} {'ties':>5} {'agrees w/ RM':>12} "
             f"{'95% CI':>15}"]
    label = {"sae_irm": "sae_irm (IRM text score)", "log_ratio_sum": "log-ratio sum (DPO implicit reward)",
             "rm": "RM (reference)"}
    ci = lambda c: f"[{c[0]:.2f},{c[1]:.2f}]" if c else "-"  # noqa: E731
    for r in rows:
        lines.append(f"{label.get(r['scorer'], r['scorer']):<36} {_fmt(r['accuracy'], '.3f'):>8} {ci(r['ci']):>15} "
                     f"{r['n']:>6} {r['n_ties']:>5} {_fmt(r['agreement'], '.3f'):>12} {ci(r['agreement_ci']):>15}")
    return lines


def agreement_line(row: dict, control: bool = False) -> str:
    """One row of the views table."""
    start = f"{row['name'][:22]:<22} {row.get('family', ''):<11} {row['n_tokens']:>6}"
    if row["is_zero"]:
        return start + "   identically zero: no implicit reward learned"
    if row.get("tau") is None:
        return start + f"   no figure: {row.get('note')}"
    ci = row.get("tau_ci") or row.get("tau_range")
    if ci and None in ci:  # a CI that could not be computed (too few tokens) is stored as nulls
        ci = None
    ci_text = (("range " if row.get("tau_range") and not row.get("tau_ci") else "") + f"[{ci[0]:+.3f},{ci[1]:+.3f}]"
               if ci else "-")
    p = f"{row['p_value']:.1e}" if row.get("p_value") is not None else "-"
    line = (f"{start} {row['tau']:>+7.3f} {ci_text:>17} {p:>8} {_fmt(row.get('spearman'), '+.3f'):>6} "
            f"{_fmt(row.get('sign_acc_pos'), '.2f'):>5} {_fmt(row.get('sign_acc_neg'), '.2f'):>5} "
            f"{_fmt(row.get('text_tau'), '+.3f'):>8} {_fmt(row.get('test_r2'), '.3f'):>7}")
    if control:
        ctrl = "zero" if row.get("control_is_zero") else _fmt(row.get("control_tau"), "+.3f")
        line += f" {ctrl:>7} {_fmt(row.get('above_control'), '+.3f'):>7}"
    return line


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


def log_to_wandb(metrics, config: dict, *, project: str, mode: str | None, run_dir: Path) -> str | None:
    """Send config, scalar metrics, tables, plots and artifacts to a W&B run; return its directory."""
    if wandb_mode(mode) == "disabled":
        return None
    import wandb

    metrics = plain(metrics)
    token_rows = metrics["tokens"]["rows"]

    run = wandb.init(project=project, mode=wandb_mode(mode), dir=str(run_dir), config=config,
                     reinit="finish_previous")
    try:
        scalars: dict[str, float] = {}
        for key in ("reward", "kl"):
            _flatten(key, metrics[key], scalars)
        for row in metrics["saes"]:
            for k in ("explained_variance", "l0", "dead_fraction", "dense_fraction", "mse", "ce_loss_recovered",
                      "kl_spliced", "mmcs_small_vs_large", "mmcs_small_vs_large_one_to_one", "trained_samples",
                      "ev_gain_last_checks"):
                if row.get(k) is None:
                    continue
                scalars[f"sae/{row['model']}.{row['layer']}/{k}"] = row[k]
        for row in metrics.get("sae_layers", []):
            scalars[f"sae/layer{row['layer']}/tuned_only_features"] = row["tuned_only_features"]
        for row in metrics["agreement"]:
            for k in ("tau", "tau_sd", "tau_max", "p_value", "sign_acc_pos", "sign_acc_neg", "n_tokens", "test_r2",
                      "spearman", "text_tau", "control_tau", "above_control"):
                if row.get(k) is not None:
                    scalars[f"irm/{row['name']}/{k}"] = row[k]
            if row.get("tau_range"):
                scalars[f"irm/{row['name']}/tau_range_min"], scalars[f"irm/{row['name']}/tau_range_max"] = row["tau_range"]
        for row in metrics.get("full_vocabulary") or []:
            for k in ("tau", "n_tokens", "control_tau"):
                if row.get(k) is not None:
                    scalars[f"irm/{row['name']}/{k}"] = row[k]
        disc = metrics.get("discovery") or {}
        for k in ("linear", "monotone", "residual_share"):
            if (disc.get("variance") or {}).get(k) is not None:
                scalars[f"discovery/rm_variance_share/{k}"] = disc["variance"][k]
        for k, n in (disc.get("counts") or {}).items():
            scalars[f"discovery/n_{k}"] = n
        for r in disc.get("pairwise") or []:
            for k in ("accuracy", "agreement", "n"):
                if r.get(k) is not None:
                    scalars[f"pairwise/{r['scorer']}/{k}"] = r[k]
        for stage, seconds in metrics["stage_seconds"].items():
            scalars[f"time/{stage}"] = seconds
        # TRL's training curves of the organism, one point per logging step, plotted against organism/step.
        run.define_metric("organism/step")
        run.define_metric("organism/*", step_metric="organism/step")
        for row in metrics["organism"].get("history", []):
            curve = {f"organism/{k}": v for k, v in row.items() if k not in ("step", "epoch")}
            if "step" in row and curve:
                run.log({"organism/step": row["step"], **curve})
        run.log(scalars)
        tables = wandb_tables(metrics, token_rows)
        run.log({name: wandb.Table(columns=cols, data=data) for name, (cols, data) in tables.items()})
        if token_rows:
            scatter = wandb.Table(columns=["rm_value", "sae_irm", "token"], data=[[r[1], r[4], r[0]] for r in token_rows])
            run.log({"plots/irm_vs_rm_scatter": wandb.plot.scatter(scatter, "rm_value", "sae_irm",
                                                                   title="SAE IRM vs RM per token")})
        import matplotlib.pyplot as plt

        from irmprobe.reporting import figures

        for name, fig in figures.all_figures(metrics).items():
            run.log({f"plots/{name}": wandb.Image(fig)})
            plt.close(fig)
        for artifact in wandb_artifacts(metrics, run_dir):
            run.log_artifact(artifact)
        run.summary["verdict"] = "\n".join(metrics["verdict"])
        return str(run.dir)
    finally:
        run.finish()


def wandb_tables(metrics: dict, token_rows: list[list]) -> dict[str, tuple[list[str], list[list]]]:
    """The run's tables (name -> (columns, rows)), as W&B and the HTML report show them."""
    view_cols = ["name", "family", "n_tokens", "tau", "tau_ci_low", "tau_ci_high", "tau_range_min", "tau_range_max",
                 "p_value", "spearman", "sign_acc_pos", "sign_acc_neg", "text_tau", "test_r2", "control_tau",
                 "above_control"]
    views = [[r.get("name"), r.get("family"), r.get("n_tokens"), r.get("tau"),
              (r.get("tau_ci") or [None, None])[0], (r.get("tau_ci") or [None, None])[1],
              (r.get("tau_range") or [None, None])[0], (r.get("tau_range") or [None, None])[1], r.get("p_value"),
              r.get("spearman"), r.get("sign_acc_pos"), r.get("sign_acc_neg"), r.get("text_tau"), r.get("test_r2"),
              r.get("control_tau"), r.get("above_control")]
             for r in metrics["agreement"] + (metrics.get("full_vocabulary") or [])]
    out = {"views": (view_cols, views), "tokens": (metrics["tokens"]["columns"], token_rows)}
    sae_cols = ["model", "layer", "d_sae", "explained_variance", "l0", "dead_fraction", "dense_fraction",
                "ce_loss_recovered", "kl_spliced", "mmcs_small_vs_large", "trained_samples", "stopped_early",
                "ev_gain_last_checks"]
    out["saes"] = (sae_cols, [[r.get(c) for c in sae_cols] for r in metrics.get("saes", [])])
    disc = metrics.get("discovery")
    if disc:
        cols = ["category", "token", "token_id", "irm_value", "ci_low", "ci_high", "rm_value", "count",
                "control_value", "q"]
        out["discoveries"] = (cols, [[cat] + [e[c] for c in cols[1:]] for cat, entries in disc["entries"].items()
                                     for e in entries])
        cols = ["scorer", "accuracy", "ci_low", "ci_high", "n", "n_ties", "agreement", "agreement_ci_low",
                "agreement_ci_high"]
        out["pairwise accuracy"] = (cols, [[r["scorer"], r["accuracy"], *(r["ci"] or [None, None]), r["n"],
                                            r["n_ties"], r["agreement"], *(r["agreement_ci"] or [None, None])]
                                           for r in disc["pairwise"]])
    val = metrics.get("validation") or {}
    if val.get("judged"):
        cols = ["feature", "irm_weight", "in_irm_top_k", "relevant", "judge_score", "detection", "frequency",
                "explanation", "top_contexts", "promoted"]
        out["features"] = (cols, [[r["feature"], r["weight"], r["in_irm_top_k"], r["relevant"], r["score"],
                                   r["detection"], r["frequency"], r["explanation"],
                                   " | ".join(c["text"] for c in r["contexts"][:3]), " ".join(r["promoted"][:8])]
                                  for r in val["judged"]])
    if val.get("ablation"):
        cols = ["set", "mode", "n_features", "reward", "reward_ci_low", "reward_ci_high", "change", "change_ci_low",
                "change_ci_high", "gain_share", "gain_share_ci_low", "gain_share_ci_high"]
        out["ablation"] = (cols, [[r["set"], r["mode"], r["n_features"], r["reward"]["mean"], *r["reward"]["ci"],
                                   *((r["change"]["mean"], *r["change"]["ci"]) if r["change"] else (None, None, None)),
                                   *((r["gain_share"]["share"], *r["gain_share"]["ci"]) if r.get("gain_share")
                                     else (None, None, None))]
                                  for r in val["ablation"]])
    return out


def wandb_artifacts(metrics: dict, run_dir: Path) -> list:
    """Artifacts of the run: the SAEs, the primary IRM's weights, and its token map."""
    import wandb

    out = []
    saes = wandb.Artifact("saes", type="sae", description="SAELens SAEs of each (model, layer), with metrics")
    for row in metrics.get("saes", []):
        if row.get("path") and Path(row["path"]).is_dir():
            saes.add_dir(row["path"], name=f"{row['model']}.{row['layer']}")
    out.append(saes)
    fit_dir = metrics.get("irm", {}).get("path")
    if fit_dir and Path(fit_dir).is_dir():
        irm = wandb.Artifact("irm", type="irm", description="the primary IRM: weights over probe inputs, all views")
        irm.add_dir(fit_dir)
        out.append(irm)
    token_map_path = write_json(Path(run_dir) / "token_map.json",
                                {"columns": metrics["tokens"]["columns"], "rows": metrics["tokens"]["rows"]})
    tm = wandb.Artifact("token_map", type="token_map", description="token -> RM value and each IRM view's value")
    tm.add_file(str(token_map_path))
    out.append(tm)
    return out


def write_metrics(path: Path, metrics) -> Path:
    """metrics.json: the typed metrics' JSON form (``kind`` and ``schema_version`` first)."""
    return write_json(path, plain(metrics))


def write_html(metrics, path: Path) -> Path:
    """One self-contained HTML file: the summary, every plot (inline PNG) and every table."""
    import base64

    metrics = plain(metrics)
    import html
    import io

    import matplotlib.pyplot as plt

    from irmprobe.reporting import figures

    def table(cols, rows, limit=None) -> str:
        def cell(v):
            if isinstance(v, float):
                return f"{v:.4g}"
            return html.escape("" if v is None else str(v))

        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows[:limit])
        return f"<table><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in cols)}</tr>{body}</table>"

    parts = ["<h1>irmprobe report</h1>", "<h2>Verdict</h2><ul>"
             + "".join(f"<li>{html.escape(v)}</li>" for v in metrics.get("verdict", [])) + "</ul>"]
    for name, fig in figures.all_figures(metrics).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        parts.append(f'<h2>{html.escape(name.replace("_", " "))}</h2><img alt="{name}" src="data:image/png;base64,{data}">')
    for name, (cols, rows) in wandb_tables(metrics, metrics["tokens"]["rows"]).items():
        parts.append(f"<h2>{html.escape(name)}</h2>" + table(cols, rows, limit=60 if name == "tokens" else None))
    parts.append("<h2>Full summary</h2><pre>" + html.escape("\n".join(summary_lines(metrics))) + "</pre>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}th{background:#eee}img{max-width:100%}pre{font-size:11px}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>irmprobe report</title><style>{style}</style>"
           f"</head><body>{''.join(parts)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc)
    tmp.replace(path)
    return path
