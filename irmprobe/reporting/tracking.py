"""Weights & Biases: the run's scalars, tables and artifacts (offline unless configured online)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from irmprobe.cache import write_json
from irmprobe.reporting.summary import plain


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


def log_to_wandb(metrics, config: dict, *, project: str, mode: str | None, run_dir: Path,
                 report: Path | None = None) -> str | None:
    """Send config, scalar metrics, tables, plots and artifacts to a W&B run; return its directory.

    The HTML report (``report``) goes in whole as ``report`` (a ``wandb.Html`` panel), so a dashboard shows what
    the file shows; its interactive plots go in as native plotly panels (``plots/…``), and its text views and
    feature cards as tables (``text tokens``, ``feature cards``, ``words made more likely``, ...)."""
    if wandb_mode(mode) == "disabled":
        return None
    import wandb

    metrics = plain(metrics)
    token_rows = metrics["tokens"]["rows"]

    run = wandb.init(project=project, mode=wandb_mode(mode), dir=str(run_dir), config=config,
                     reinit="finish_previous")
    try:
        scalars = wandb_scalars(metrics)
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
        run.log({name: wandb.Table(columns=cols, data=data)
                 for name, (cols, data) in dashboard_tables(metrics).items()})
        import matplotlib.pyplot as plt

        from irmprobe.reporting import figures, interactive

        plots = interactive.all_plots(metrics)
        for name, fig in plots.items():
            run.log({f"plots/{name}": wandb.Plotly(fig)})
        for name, fig in figures.all_figures(metrics, figures.STATIC).items():
            run.log({f"plots/{name}": wandb.Image(fig)})
            plt.close(fig)
        if report is not None and Path(report).is_file():
            run.log({"report": wandb.Html(Path(report).read_text(encoding="utf-8"), inject=False)})
        for artifact in wandb_artifacts(metrics, run_dir):
            run.log_artifact(artifact)
        run.summary["verdict"] = "\n".join(metrics["verdict"])
        headline = headline_scalars(metrics)
        # Logged as well as put in the summary, so a workspace's scalar charts (history metrics) show them.
        run.log({k: v for k, v in headline.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key, value in headline.items():
            run.summary[key] = value
        return str(run.dir)
    finally:
        run.finish()


def wandb_scalars(metrics: dict) -> dict[str, float]:
    """The run's scalar figures as W&B keys (``reward/...``, ``sae/...``, ``irm/...``, ``discovery/...``,
    ``pairwise/...``, ``time/...``), from the plain metrics dict."""
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
    named = disc.get("named") or {}
    if named.get("entries") is not None:
        scalars["discovery/named_passed"] = named["passed"]
        scalars["discovery/named_tested"] = named["n"]
        if (named.get("set") or {}).get("p") is not None:  # the list as one set (none: its controls do not vary)
            scalars["discovery/named_set_t"], scalars["discovery/named_set_p"] = named["set"]["t"], named["set"]["p"]
    for r in disc.get("pairwise") or []:
        for k in ("accuracy", "agreement", "n"):
            if r.get(k) is not None:
                scalars[f"pairwise/{r['scorer']}/{k}"] = r[k]
    for stage, seconds in metrics["stage_seconds"].items():
        scalars[f"time/{stage}"] = seconds
    return scalars


def headline_scalars(metrics: dict) -> dict:
    """The run's headline figures for W&B's summary: the primary comparison and the explanation (view, tau, t,
    d.f., p, alpha, outcome and its reading), the attribution's bound, error share, smallest faithful k and IG-vs-exact
    Spearman (and, with seed checks, whether the named set holds across dictionary seeds; with dictionaries of the
    change, the decision-side view on them: its R^2 and tau), the depth profile's
    best R^2 at the captured blocks and first block reaching its target, the ablation's samples per prompt, and
    the known-null counts of the naming and causal rules."""
    from irmprobe.analysis.verdict import (
        counterparts_hold,
        null_calls,
        null_named,
        reading,
        seeds_hold,
        spread_needed,
        spread_rows,
    )

    out = {}
    for label in ("primary", "explanation"):
        p = metrics.get(label) or {}
        for key in ("view", "tau", "z", "df", "p_value", "alpha", "outcome"):
            if p.get(key) is not None:
                out[f"{label}/{'t' if key == 'z' else key}"] = p[key]
        if p.get("outcome") is not None:  # the outcome, or "undecided (...)" where p lies between alpha and SUGGEST
            out[f"{label}/reading"] = reading(p)
    attribution = metrics.get("attribution") or {}
    if attribution.get("curves"):
        out["attribution/bound"] = attribution["curves"]["bound"]["value"]
        out["attribution/errors_only"] = attribution["curves"]["errors_only"]["value"]
        if attribution["curves"].get("features_all"):  # every feature together, errors at base
            out["attribution/features_all"] = attribution["curves"]["features_all"]["value"]
        out["attribution/dictionary"] = attribution.get("dictionary", "activations")
        out["attribution/smallest_k_features"] = attribution.get("smallest_k_features")
        out["attribution/ig_exact_spearman"] = attribution["exact"]["spearman"]
        view = attribution.get("decision_view")
        if view is not None:  # the decision-side view on the dictionaries of the change
            out["attribution/decision_r2"], out["attribution/decision_tau"] = view["test_r2"], view["tau"]
            shuffled = [v for v in (view.get("shuffled") or {}).get("test_r2", []) if v is not None]
            if shuffled:  # its shuffled-target refits: the R^2 a fit without the pairing reaches
                out["attribution/decision_r2_shuffled_max"] = max(shuffled)
        for h in attribution.get("hook_points") or []:  # what each set of hook points carries (no dictionary)
            out[f"attribution/hook_points/{h['label'].replace(' ', '_')}"] = h["value"]
        spread = spread_rows(attribution)
        if spread:  # the fewest top-ranked blocks whose MLP outputs carry the threshold's share
            out["attribution/mlp_blocks_needed"] = spread_needed(attribution)
            for n, h in spread:  # by n, also where a set was measured under another label
                out[f"attribution/mlp_top/{n}"] = h["value"]
        named = null_named(attribution)
        if named is not None:  # the naming rule's false calls on random feature sets (a known null)
            out["attribution/null_named"], out["attribution/null_sets_drawn"] = named["reached"], named["n"]
        seeds = attribution.get("seed_checks") or {}
        if seeds.get("checks"):  # does the named set hold across dictionaries of other seeds (the seeds stage)
            out["attribution/seed_checks"] = len(seeds["checks"])
            out["attribution/holds_across_seeds"] = seeds_hold(seeds)
            out["attribution/counterparts_hold"] = counterparts_hold(seeds)
    depth = metrics.get("depth") or {}
    for path in ("direct", "lens"):
        if path in depth:  # from which block the residual stream's change holds enough of r_t
            out[f"depth/{path}_first_reaching"] = depth[path]["first_reaching"]
            out[f"depth/{path}_r2_captured"] = max(
                (depth[path]["r2"][b] for b in (metrics.get("capture") or {}).get("layers") or []
                 if depth[path]["r2"][b] is not None), default=None)
    rows = (metrics.get("validation") or {}).get("ablation") or []
    sampling = next((r.get("sampling") for r in rows if r["set"] == "none"), None)
    if sampling:  # how many samples per prompt the ablation drew (with a target half-width: where it stopped)
        out["ablation/samples_per_prompt"] = sampling["samples_per_prompt"]
    null = null_calls((metrics.get("validation") or {}).get("ablation") or [])
    if null is not None:  # the causal rule's false calls on random sets (a known null)
        out["ablation/null_false_calls"], out["ablation/null_sets_judged"] = null["called"], null["n"]
    return out


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
        if (disc.get("named") or {}).get("entries"):
            cols = ["word", "token_id", "effect", "z", "t", "p", "q", "direction", "category", "rm_value"]
            out["named words"] = (cols, [[e.get(c) for c in cols] for e in disc["named"]["entries"]])  # z, t: v7
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
    attribution = metrics.get("attribution") or {}
    if attribution.get("curves"):
        cols = ["k", "faithfulness", "faithfulness_ci_low", "faithfulness_ci_high", "completeness",
                "completeness_ci_low", "completeness_ci_high", "random_min", "random_max"]
        out["attribution curves"] = (cols, [[r["k"], r["faithfulness"]["value"], *r["faithfulness"]["ci"],
                                             r["completeness"]["value"], *r["completeness"]["ci"],
                                             *(r["random"]["range"] or [None, None])]
                                            for r in attribution["curves"]["rows"]])
        out["attribution nodes"] = (["node", "attribution"], [[t["node"], t["attribution"]]
                                                              for t in attribution["top"]])
        if attribution.get("hook_points"):
            out["attribution hook points"] = (
                ["hook points", "blocks", "share of the implicit reward", "ci_low", "ci_high"],
                [[h["label"], " ".join(str(b) for _, b in h["points"]), h["value"], *h["ci"]]
                 for h in attribution["hook_points"]])
        if attribution.get("dictionaries"):  # the nodes are features of dictionaries of the change
            cols = ["layer", "d_sae", "explained_variance", "l0", "dead_fraction", "change_norm_share"]
            out["attribution change dictionaries"] = (cols, [[d[c] for c in cols]
                                                             for d in attribution["dictionaries"]])
    if val.get("ablation"):
        cols = ["set", "mode", "n_features", "reward", "reward_ci_low", "reward_ci_high", "change", "change_ci_low",
                "change_ci_high", "gain_share", "gain_share_ci_low", "gain_share_ci_high", "causal_rule"]
        out["ablation"] = (cols, [[r["set"], r["mode"], r["n_features"], r["reward"]["mean"], *r["reward"]["ci"],
                                   *((r["change"]["mean"], *r["change"]["ci"]) if r["change"] else (None, None, None)),
                                   *((r["gain_share"]["share"], *r["gain_share"]["ci"]) if r.get("gain_share")
                                     else (None, None, None)), _causal_rule(r)]
                                  for r in val["ablation"]])
    depth = metrics.get("depth") or {}
    if "direct" in depth:  # per block: out-of-fold R^2 of r_t from the residual stream's change
        readings = [r for r in ("direct", "lens") if r in depth]
        cols = ["block"] + [f"{r}_{c}" for r in readings for c in ("r2", "r2_ci_low", "r2_ci_high")]
        out["depth profile"] = (cols, [[b] + [v for r in readings for v in (depth[r]["r2"][b], *depth[r]["ci"][b])]
                                       for b in range(len(depth["direct"]["r2"]))])
    return out


def _causal_rule(row: dict) -> str | None:
    """What the causal rule said of an ablation row: a targeted set against the random sets of its size, or a
    random set against the other random sets (where "causal" is a false call)."""
    above = (row.get("random") or {}).get("above_random")
    if above is not None:
        return "causal" if above else "not above random"
    called = (row.get("null_check") or {}).get("called")
    if called is not None:
        return "false call" if called else "no call (a random set)"
    return None


def dashboard_tables(metrics: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The report's text views and feature cards as tables (W&B shows them as tables; the HTML as coloured text
    and cards)."""
    dash = metrics.get("dashboard") or {}
    out = {}
    texts = (dash.get("texts") or {}).get("prompts") or []
    if texts:
        cols = ["prompt_rank", "prompt", "disagreement", "source", "rm_reward", "irm_score", "position", "token",
                "log_ratio", "irm", "rm"]
        out["text tokens"] = (cols, [[rank, p["prompt"], p["disagreement"], s["source"], s["reward"], s["irm_score"],
                                      i, t, s["log_ratio"][i], s["irm"][i], s["rm"][i]]
                                     for rank, p in enumerate(texts, 1) for s in p["sequences"]
                                     for i, t in enumerate(s["tokens"])])
    words = dash.get("words")
    if words:
        out["words made more likely"] = (words["columns"], words["more"])
        out["words made less likely"] = (words["columns"], words["less"])
    cards = dash.get("features") or []
    if cards:
        cols = ["feature", "named_as", "irm_weight", "irm_rank", "decision_weight", "attribution", "rm_corr",
                "frequency", "max_activation", "top_contexts", "promoted", "suppressed", "judge_explanation",
                "detection"]

        def context(c):
            return "".join(f"[[{t}]]" if a > 0 else t for t, a in zip(c["tokens"], c["activations"]))

        out["feature cards"] = (cols, [[c["id"], ", ".join(c["named_as"]), c["irm_weight"], c["irm_rank"],
                                        c["decision_weight"], c["attribution"], c["rm_corr"], c["frequency"],
                                        c["max_activation"], " | ".join(context(x) for x in c["contexts"]),
                                        " ".join(t for t, _ in c["promoted"]), " ".join(t for t, _ in c["suppressed"]),
                                        (c.get("judge") or {}).get("explanation"),
                                        (c.get("judge") or {}).get("detection")] for c in cards])
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
