#!/usr/bin/env python
"""Create a saved W&B workspace view laid out for irmprobe runs (needs W&B online).

Sections: the IRM-vs-RM views (the views table, tau per view, the scatter), the organism
(reward and KL, training curves), the SAEs, and validation (features table, ablation). Uses the
wandb-workspaces package (`pip install wandb-workspaces`), which talks to the W&B server: log in
first (`wandb login`), and run irmprobe with `report.wandb_mode: online` so the keys exist.

    python scripts/wandb_workspace.py --entity my-team --project irmprobe
"""

from __future__ import annotations

import argparse


def build(entity: str, project: str, name: str):
    """The workspace object (not yet saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as exc:
        raise SystemExit("this script needs the wandb-workspaces package: pip install wandb-workspaces") from exc
    return ws.Workspace(
        name=name, entity=entity, project=project,
        sections=[
            ws.Section(name="IRM vs RM", is_open=True, panels=[
                wr.WeavePanelSummaryTable(table_name="views"),
                wr.MediaBrowser(media_keys=["plots/view_taus"]),
                wr.MediaBrowser(media_keys=["plots/irm_vs_rm"]),
                wr.MediaBrowser(media_keys=["plots/error_vs_frequency"]),
                # The primary comparison: the full-vocabulary log-ratio's tau against its controls' (every control
                # computes it, measured-only ones included), then the fitted views.
                wr.ScalarChart(metric="primary/t"),
                wr.BarPlot(metrics=["irm/full_vocab_log_ratio/tau", "irm/full_vocab_log_ratio/control_tau"]),
                wr.BarPlot(metrics=["irm/sae_irm/tau", "irm/log_ratio (no model)/tau", "irm/baseline_shuffled/tau"]),
            ]),
            ws.Section(name="Organism", is_open=True, panels=[
                wr.ScalarChart(metric="reward/diff_mean"),
                wr.ScalarChart(metric="reward/diff_z"),
                wr.ScalarChart(metric="kl/mean"),
                wr.LinePlot(x="organism/step", y=["organism/reward"]),
                wr.LinePlot(x="organism/step", y=["organism/kl"]),
                wr.MediaBrowser(media_keys=["plots/layer_effects"]),
                wr.MediaBrowser(media_keys=["plots/depth_profile"]),
                wr.ScalarChart(metric="depth/direct_first_reaching"),
            ]),
            ws.Section(name="SAEs", panels=[
                wr.WeavePanelSummaryTable(table_name="saes"),
                wr.MediaBrowser(media_keys=["plots/sae_metrics"]),
                wr.MediaBrowser(media_keys=["plots/probe_pca"]),
            ]),
            ws.Section(name="Validation", panels=[
                wr.WeavePanelSummaryTable(table_name="features"),
                wr.WeavePanelSummaryTable(table_name="ablation"),
                wr.MediaBrowser(media_keys=["plots/ablation_shares"]),
                wr.MediaBrowser(media_keys=["plots/attribution_curves"]),
                wr.ScalarChart(metric="ablation/null_false_calls"),
                wr.ScalarChart(metric="attribution/null_named"),
                wr.WeavePanelSummaryTable(table_name="tokens"),
            ]),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="irmprobe", help="W&B project the runs were logged to")
    parser.add_argument("--name", default="irmprobe: IRM vs RM", help="name of the saved view")
    args = parser.parse_args(argv)
    workspace = build(args.entity, args.project, args.name)
    workspace.save()
    print(f"saved workspace view {args.name!r}: {workspace.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
