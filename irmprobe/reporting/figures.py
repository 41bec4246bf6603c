"""The report's plots, drawn with matplotlib from a run's metrics, shared by the HTML report and W&B.

Each function takes the metrics dict and returns a Figure, or None when the run has no such data.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


def irm_vs_rm(metrics: dict):
    """Each lexicon token: RM value vs the SAE IRM's value (and the raw log-ratio)."""
    rows = metrics.get("tokens", {}).get("rows") or []
    if not rows:
        return None
    rm = np.array([r[1] for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, label in ((axes[0], 4, "SAE IRM (sae_irm)"), (axes[1], 3, "log-ratio (no model)")):
        vals = np.array([r[col] for r in rows], dtype=float)
        ax.scatter(rm, vals, s=np.clip(np.sqrt([r[2] for r in rows]) * 4, 4, 60), alpha=0.6)
        ax.axhline(np.median(vals), color="grey", lw=0.8, ls="--")
        ax.set_xlabel("RM value of the token")
        ax.set_ylabel(label)
        tau = stats.kendalltau(vals, rm).statistic if len(rm) > 1 else float("nan")
        ax.set_title(f"{label}: tau {tau:+.3f} over {len(rm)} tokens")
    fig.tight_layout()
    return fig


def error_vs_frequency(metrics: dict):
    """Percentile-rank error of the SAE IRM per token against how often the token occurs."""
    rows = metrics.get("tokens", {}).get("rows") or []
    if len(rows) < 4:
        return None
    rm = np.array([r[1] for r in rows])
    irm = np.array([r[4] for r in rows], dtype=float)
    counts = np.array([r[2] for r in rows])
    err = np.abs((stats.rankdata(irm) - 0.5) / len(irm) - (stats.rankdata(rm) - 0.5) / len(rm))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(counts, err, s=10, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("occurrences in the captured text")
    ax.set_ylabel("|rank(IRM) - rank(RM)| (percentile)")
    ax.set_title("SAE IRM error vs token frequency")
    fig.tight_layout()
    return fig


def layer_divergence(metrics: dict):
    layers = metrics.get("layers")
    if not layers:
        return None
    per_block = np.array(layers["per_block"])
    chosen = set(layers["chosen"])
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(per_block)), per_block, color=["C3" if i in chosen else "C0" for i in range(len(per_block))])
    ax.set_xlabel("block")
    ax.set_ylabel("|tuned - base| (Frobenius)")
    ax.set_title("weight divergence per block (red: chosen)")
    fig.tight_layout()
    return fig


def probe_pca(metrics: dict):
    """The first two principal components of the probe inputs, coloured by the token's RM value."""
    pca = metrics.get("pca")
    if not pca or not pca.get("x"):
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    sc = ax.scatter(pca["x"], pca["y"], c=pca["rm"], cmap="coolwarm", s=6, alpha=0.7,
                    vmin=-max(1e-9, np.abs(pca["rm"]).max()), vmax=max(1e-9, np.abs(pca["rm"]).max()))
    fig.colorbar(sc, ax=ax, label="RM value of the token")
    ax.set_xlabel(f"PC1 ({pca['explained'][0]:.1%})")
    ax.set_ylabel(f"PC2 ({pca['explained'][1]:.1%})")
    ax.set_title("probe inputs (SVD of a row sample)")
    fig.tight_layout()
    return fig


def ablation(metrics: dict):
    val = metrics.get("validation") or {}
    rows = val.get("ablation")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    means = [r["reward"]["mean"] for r in rows]
    err = [max(0.0, r["reward"]["mean"] - r["reward"]["ci"][0]) for r in rows]
    ax.barh(range(len(rows)), means, xerr=err, color=["grey"] + ["C0"] * (len(rows) - 1))
    ax.set_yticks(range(len(rows)), [r["set"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("RM reward of tuned-model continuations (95% CI)")
    ax.set_title("reward before (none) and after ablation")
    fig.tight_layout()
    return fig


def attribution_curves(metrics: dict):
    """Faithfulness and completeness of the top-k nodes (held-out prompts), with random k-sets beside them."""
    a = metrics.get("attribution") or {}
    rows = (a.get("curves") or {}).get("rows")
    if not rows:
        return None
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, color in (("faithfulness", "C0"), ("completeness", "C1")):
        values = [r[key]["value"] if r[key]["value"] is not None else np.nan for r in rows]
        lo = [r[key]["ci"][0] if r[key]["ci"][0] is not None else np.nan for r in rows]
        hi = [r[key]["ci"][1] if r[key]["ci"][1] is not None else np.nan for r in rows]
        ax.plot(ks, values, "o-", color=color, label=f"{key} (top k)")
        ax.fill_between(ks, lo, hi, color=color, alpha=0.2)
    frows = a["curves"].get("feature_rows") or []
    if frows:
        ax.plot([r["k"] for r in frows], [r["faithfulness"]["value"] if r["faithfulness"]["value"] is not None
                                          else np.nan for r in frows], "s--", color="C2",
                label="faithfulness (top k features, errors at base)")
    for r in rows:
        ax.plot([r["k"]] * len(r["random"]["values"]), r["random"]["values"], "x", color="grey")
    ax.plot([], [], "x", color="grey", label="random k-feature sets")
    ax.axhline(a["threshold"], color="k", ls=":", lw=0.8)
    ax.axhline(a["curves"]["errors_only"]["value"] or 0.0, color="C3", ls="--", lw=0.8, label="SAE errors only")
    ax.set_xscale("log")
    ax.set_xlabel("k (nodes, ranked by attribution on the other half of the prompts)")
    ax.set_ylabel("share of m(tuned) - m(empty)")
    ax.set_title(f"what carries the implicit reward (hook points carry {a['curves']['bound']['value'] or 0:.0%})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sae_metrics(metrics: dict):
    rows = metrics.get("saes") or []
    if not rows:
        return None
    labels = [f"{r['model']}.{r['layer']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key, title in zip(axes, ("explained_variance", "l0", "ce_loss_recovered"),
                              ("explained variance", "L0", "CE loss recovered")):
        ax.bar(labels, [r.get(key) or 0.0 for r in rows], color=["C0" if r["model"] == "base" else "C1" for r in rows])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def view_taus(metrics: dict):
    """Tau of every IRM view with its 95% CI, next to the control organism's tau."""
    rows = [r for r in metrics.get("agreement", []) if r.get("tau") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    colors = {"behavioural": "C0", "rm_informed": "C1", "baseline": "grey"}
    for i, r in enumerate(rows):
        # The shuffled baseline's interval is the range over its fits (drawn dashed), not a CI.
        ci = r.get("tau_ci") or r.get("tau_range") or [r["tau"], r["tau"]]
        bar = ax.errorbar(r["tau"], i, xerr=[[r["tau"] - ci[0]], [ci[1] - r["tau"]]], fmt="o",
                          color=colors.get(r.get("family"), "k"))
        if r.get("tau_range") and not r.get("tau_ci"):
            bar[-1][0].set_linestyle("--")
        if r.get("control_tau") is not None:
            ax.plot(r["control_tau"], i, "x", color="C3")
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(len(rows)), [f"{r['name']} [{r.get('family', '')}]" + (" (range over fits)" if r.get("tau_range")
                                      and not r.get("tau_ci") else "") for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("Kendall tau vs RM, out-of-fold values (95% CI; dashed: range over fits); red x: control organism")
    fig.tight_layout()
    return fig


ALL = {"view_taus": view_taus, "irm_vs_rm": irm_vs_rm, "error_vs_frequency": error_vs_frequency,
       "layer_divergence": layer_divergence, "probe_pca": probe_pca, "ablation": ablation,
       "attribution_curves": attribution_curves,
       "sae_metrics": sae_metrics}


STATIC = ("error_vs_frequency", "probe_pca", "sae_metrics")
"""The figures the HTML report and W&B keep as images; the others are drawn as interactive plots
(:mod:`irmprobe.reporting.interactive`)."""


def all_figures(metrics) -> dict:
    """Every plot this run has data for: name -> Figure (``metrics``: RunMetrics or its JSON form)."""
    from irmprobe.reporting.summary import plain

    metrics = plain(metrics)
    out = {}
    for name, make in ALL.items():
        fig = make(metrics)
        if fig is not None:
            out[name] = fig
    return out
