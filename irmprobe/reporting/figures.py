"""The report's static plots, drawn with matplotlib from a run's metrics, shared by the HTML report and W&B (the
interactive ones are in :mod:`irmprobe.reporting.interactive`).

Each function takes the metrics dict and returns a Figure, or None when the run has no such data.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


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


ALL = {"error_vs_frequency": error_vs_frequency, "probe_pca": probe_pca, "sae_metrics": sae_metrics}


STATIC = tuple(ALL)
"""The figures the HTML report and W&B keep as images; the others are drawn as interactive plots
(:mod:`irmprobe.reporting.interactive`)."""


def all_figures(metrics, names=None) -> dict:
    """Every plot this run has data for, or those of ``names``: name -> Figure (``metrics``: RunMetrics or its
    JSON form)."""
    from irmprobe.reporting.summary import plain

    metrics = plain(metrics)
    out = {}
    for name, make in ALL.items():
        if names is not None and name not in names:
            continue
        fig = make(metrics)
        if fig is not None:
            out[name] = fig
    return out
