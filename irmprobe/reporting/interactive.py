"""The report's interactive plots (plotly), shared by the HTML report (inlined, no CDN) and W&B (``wandb.Plotly``).

Each function takes the metrics dict and returns a ``plotly.graph_objects.Figure``, or None when the run has no
such data. Every axis takes its margins from its labels (``automargin``), so no tick label is cut at any width.
"""

from __future__ import annotations

import numpy as np

GREY, BLUE, ORANGE, RED, GREEN = "#888888", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"
FAMILY_COLOURS = {"behavioural": BLUE, "rm_informed": ORANGE, "baseline": GREY, "full_vocabulary": GREEN}


def _layout(fig, title: str, height: int, x_title: str, y_title: str = ""):
    fig.update_layout(title={"text": title, "x": 0, "xanchor": "left"}, height=height, template="plotly_white",
                      margin={"l": 10, "r": 10, "t": 50, "b": 10}, legend={"orientation": "h", "y": -0.2},
                      hoverlabel={"namelength": -1})
    fig.update_xaxes(title_text=x_title, automargin=True)
    fig.update_yaxes(title_text=y_title, automargin=True)
    return fig


def _fmt(v) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _bars(values, cis) -> dict:
    """Plotly's asymmetric error bars from (value, [low, high]) pairs; a missing bound draws no bar that side."""
    plus = [0.0 if v is None or not c or c[1] is None else c[1] - v for v, c in zip(values, cis)]
    minus = [0.0 if v is None or not c or c[0] is None else v - c[0] for v, c in zip(values, cis)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


def view_taus(metrics: dict):
    """Every IRM view's Kendall tau against the RM with its 95% CI (or its range over fits), beside each control
    organism's tau."""
    import plotly.graph_objects as go

    rows = [r for r in (metrics.get("agreement") or []) + (metrics.get("full_vocabulary") or [])
            if r.get("tau") is not None]
    if not rows:
        return None
    fig = go.Figure()
    labels = [f"{r['name']} [{r.get('family', '')}]" for r in rows]
    for family in dict.fromkeys(r.get("family") for r in rows):
        idx = [i for i, r in enumerate(rows) if r.get("family") == family]
        bars = _bars([rows[i]["tau"] for i in idx], [rows[i].get("tau_ci") or rows[i].get("tau_range") for i in idx])
        text = [f"{rows[i]['name']}: tau {_fmt(rows[i]['tau'])} on {rows[i]['n_tokens']} tokens<br>"
                f"{'range over fits' if rows[i].get('tau_range') and not rows[i].get('tau_ci') else '95% CI'} "
                f"{(rows[i].get('tau_ci') or rows[i].get('tau_range') or ['-', '-'])}<br>"
                f"{rows[i].get('ci_method') or ''}" for i in idx]
        fig.add_trace(go.Scatter(x=[rows[i]["tau"] for i in idx], y=[labels[i] for i in idx], mode="markers",
                                 name=family or "view",
                                 marker={"color": FAMILY_COLOURS.get(family, "black"), "size": 9},
                                 error_x=bars, hovertext=text, hoverinfo="text"))
    cx, cy, ct = [], [], []
    for r, label in zip(rows, labels):
        taus = r.get("control_taus") or ([r["control_tau"]] if r.get("control_tau") is not None else [])
        for j, t in enumerate(taus):
            if t is not None:
                cx.append(t)
                cy.append(label)
                ct.append(f"control {j}: tau {_fmt(t)} ({r['name']})")
    if cx:
        fig.add_trace(go.Scatter(x=cx, y=cy, mode="markers", name="control organisms",
                                 marker={"color": RED, "symbol": "x", "size": 9}, hovertext=ct, hoverinfo="text"))
    fig.add_vline(x=0, line_width=1, line_color="black")
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=labels)
    return _layout(fig, "Kendall tau of each view's token values with the RM's (out of fold)", 120 + 28 * len(rows),
                   "Kendall tau vs RM (95% CI; baseline: range over fits); red x: each control organism")


def irm_vs_rm(metrics: dict):
    """Each RM-valued token: its RM value against the SAE IRM's out-of-fold value (and the raw log-ratio)."""
    import plotly.graph_objects as go

    tokens = metrics.get("tokens") or {}
    rows, cols = tokens.get("rows") or [], tokens.get("columns") or []
    if not rows:
        return None
    fig = go.Figure()
    for col, name, visible in ((4, "SAE IRM (sae_irm)", True), (3, "log-ratio (no model)", "legendonly")):
        if col >= len(cols):
            continue
        text = [f"{r[0]!r}: RM {r[1]:+.2f}, {cols[col]} {_fmt(r[col])}, seen {r[2]}x" for r in rows]
        fig.add_trace(go.Scatter(x=[r[1] for r in rows], y=[r[col] for r in rows], mode="markers", name=name,
                                 visible=visible, hovertext=text, hoverinfo="text",
                                 marker={"size": np.clip(np.sqrt([r[2] for r in rows]) * 3, 5, 24).tolist(),
                                         "opacity": 0.6}))
    return _layout(fig, "RM value vs the IRM's value of each token (hover for the token; size: occurrences)", 460,
                   "RM value of the token", "IRM value (out of fold)")


def _short(name: str) -> str:
    return name.split(" (")[0]


def ablation_shares(metrics: dict):
    """Share of the RM reward gain (tuned - base) each ablated set removes while the tuned model samples, with
    95% CIs over prompts; random sets of the same size beside the targeted ones, the patching bound last."""
    import plotly.graph_objects as go

    every = (metrics.get("validation") or {}).get("ablation") or []
    rows = [r for r in every if r.get("gain_share") and r["set"] not in ("none", "base model (reference)")]
    if not rows:
        return ablation_rewards(every) if every else None
    labels = [_short(r["set"]) for r in rows]
    colours = [GREY if r["set"].startswith("random_") else ORANGE if r["mode"] == "patch" else
               "#bbbbbb" if "control" in r["set"] else BLUE for r in rows]
    share = [r["gain_share"]["share"] for r in rows]
    ci = [r["gain_share"].get("ci") or [None, None] for r in rows]
    text = [f"{r['set']}<br>removes {_fmt(s)} of the gain [{_fmt(c[0])}, {_fmt(c[1])}] ({r['mode']}, "
            f"{r['n_features']} features)" + (f"<br>random sets of its size: {_fmt(r['random']['range'][0])} to "
                                             f"{_fmt(r['random']['range'][1])}" if r.get("random") else "")
            for r, s, c in zip(rows, share, ci)]
    fig = go.Figure(go.Bar(x=share, y=labels, orientation="h", marker_color=colours, hovertext=text,
                           hoverinfo="text", name="share removed", error_x=_bars(share, ci)))
    fig.add_vline(x=0, line_width=1, line_color="black")
    fig.add_vline(x=1, line_width=1, line_dash="dot", line_color="black")
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=labels)
    return _layout(fig, "Share of the RM reward gain removed during sampling (blue: targeted, grey: random sets, "
                        "orange: patching bound)", 120 + 30 * len(rows),
                   "share of (tuned - base) RM reward removed, 95% CI over prompts")


def ablation_rewards(rows: list[dict]):
    """The RM reward of the tuned model's continuations under each condition (95% CI): what the ablation shows
    when the tuning gained no reward whose share could be taken."""
    import plotly.graph_objects as go

    labels = [_short(r["set"]) for r in rows]
    mean = [r["reward"]["mean"] for r in rows]
    ci = [r["reward"].get("ci") or [None, None] for r in rows]
    fig = go.Figure(go.Bar(x=mean, y=labels, orientation="h", name="RM reward",
                           marker_color=[GREY if i < 2 else BLUE for i in range(len(rows))],
                           hovertext=[f"{r['set']}: reward {_fmt(m)} [{_fmt(c[0])}, {_fmt(c[1])}]"
                                      for r, m, c in zip(rows, mean, ci)], hoverinfo="text",
                           error_x=_bars(mean, ci)))
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=labels)
    return _layout(fig, "RM reward while the tuned model samples under each condition (no reward gain to share)",
                   120 + 30 * len(rows), "RM reward of tuned-model continuations (95% CI)")


def layer_effects(metrics: dict):
    """Per block: the share of the tuning's effect removed by patching the base's sublayer output in (the layers
    stage's ranking) and the weight divergence (the paper's)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = metrics.get("layers") or {}
    per_block = layers.get("per_block")
    if not per_block:
        return None
    chosen = set(layers.get("chosen") or [])
    patching = layers.get("patching") or {}
    shares = ((patching.get("shares") or {}).get(patching.get("kind")) or {}).get(patching.get("metric"))
    fig = make_subplots(rows=2 if shares else 1, cols=1, shared_xaxes=True, vertical_spacing=0.16,
                        subplot_titles=([f"patching: share of mean {patching.get('metric')} removed "
                                         f"({patching.get('kind')})"] if shares else []) + ["weight divergence"])
    colours = [RED if i in chosen else BLUE for i in range(len(per_block))]
    if shares:
        fig.add_trace(go.Bar(x=list(range(len(shares))), y=shares, marker_color=colours, name="patching share",
                             hovertemplate="block %{x}: %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=list(range(len(per_block))), y=per_block, marker_color=colours, name="|tuned - base|",
                         hovertemplate="block %{x}: %{y:.4f}<extra></extra>"), row=2 if shares else 1, col=1)
    fig.update_layout(showlegend=False)
    fig = _layout(fig, "Where the tuning acts, per block (red: chosen)", 500 if shares else 300, "block")
    if shares:
        fig.update_xaxes(title_text="", row=1, col=1)  # one axis title, under the lower panel
    return fig


def attribution_curves(metrics: dict):
    """Faithfulness and completeness of the top-k attributed nodes on held-out prompts (95% CI bands), the
    features-only faithfulness, random k-feature sets, the SAE errors alone and the threshold."""
    import plotly.graph_objects as go

    a = metrics.get("attribution") or {}
    rows = (a.get("curves") or {}).get("rows")
    if not rows:
        return None
    ks = [r["k"] for r in rows]
    fig = go.Figure()
    for key, colour in (("faithfulness", BLUE), ("completeness", ORANGE)):
        lo = [r[key]["ci"][0] for r in rows]
        hi = [r[key]["ci"][1] for r in rows]
        fig.add_trace(go.Scatter(x=ks + ks[::-1], y=hi + lo[::-1], fill="toself", line={"width": 0},
                                 fillcolor=colour, opacity=0.2, hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=ks, y=[r[key]["value"] for r in rows], mode="lines+markers", name=f"{key} (top k)",
                                 line={"color": colour}, customdata=list(zip(lo, hi)),
                                 hovertemplate="k=%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                                               f"<extra>{key}</extra>"))
    frows = a["curves"].get("feature_rows") or []
    if frows:
        fig.add_trace(go.Scatter(x=[r["k"] for r in frows], y=[r["faithfulness"]["value"] for r in frows],
                                 mode="lines+markers", name="faithfulness, features only (errors at base)",
                                 line={"color": GREEN, "dash": "dash"},
                                 hovertemplate="k=%{x}: %{y:.3f}<extra></extra>"))
    rx = [r["k"] for r in rows for _ in r["random"]["values"]]
    ry = [v for r in rows for v in r["random"]["values"]]
    if rx:
        fig.add_trace(go.Scatter(x=rx, y=ry, mode="markers", name="random k-feature sets",
                                 marker={"color": GREY, "symbol": "x"},
                                 hovertemplate="k=%{x}: %{y:.3f}<extra></extra>"))
    fig.add_hline(y=a["threshold"], line_dash="dot", line_color="black",
                  annotation_text=f"threshold {a['threshold']:g}", annotation_position="top left")
    errors = (a["curves"].get("errors_only") or {}).get("value")
    if errors is not None:
        fig.add_hline(y=errors, line_dash="dash", line_color=RED, annotation_text="dictionary errors only",
                      annotation_position="bottom right")
    fig.update_xaxes(type="log")
    bound = (a["curves"].get("bound") or {}).get("value")
    return _layout(fig, "What carries the implicit reward" + (f" (the hook points carry {bound:.0%} of it)"
                                                             if bound is not None else ""), 440,
                   "k (nodes ranked by attribution on the other half of the prompts)",
                   "share of m(tuned) - m(empty)")


def mlp_spread(metrics: dict):
    """The share of the implicit reward the MLP outputs of the top n blocks carry together (95% CI bars over
    prompts), against n, with the threshold and the chosen blocks' residual stream as references: over how many
    blocks' MLPs the change is spread."""
    import plotly.graph_objects as go

    from irmprobe.analysis.verdict import spread_rows

    a = metrics.get("attribution") or {}
    rows = [(n, h) for n, h in spread_rows(a) if h["value"] is not None]
    if len(rows) < 2:
        return None
    ns, values, cis = [n for n, _ in rows], [h["value"] for _, h in rows], [h.get("ci") for _, h in rows]
    blocks = [("blocks " + " ".join(str(b) for _, b in h["points"])) if len(h["points"]) <= 10
              else f"{len(h['points'])} blocks" for _, h in rows]
    ci_text = [f"[{c[0]:.3f}, {c[1]:.3f}]" if c and None not in c else "" for c in cis]
    fig = go.Figure(go.Scatter(x=ns, y=values, mode="lines+markers", name="MLP outputs of the top n blocks",
                               line={"color": BLUE}, error_y=_bars(values, cis), customdata=list(zip(blocks, ci_text)),
                               hovertemplate="top %{x}: %{y:.3f} %{customdata[1]} (%{customdata[0]})"
                                             "<extra></extra>"))
    fig.add_hline(y=a["threshold"], line_dash="dot", line_color="black",
                  annotation_text=f"threshold {a['threshold']:g}", annotation_position="bottom right")
    own = [["resid_post", int(b)] for b in a.get("layers") or []]
    resid = next((h for h in a.get("hook_points") or [] if h["points"] == own and h["value"] is not None), None)
    if resid is not None:
        fig.add_hline(y=resid["value"], line_dash="dash", line_color=GREEN, annotation_position="top left",
                      annotation_text=f"residual stream after the chosen blocks ({resid['value']:.2f})")
    fig.update_xaxes(type="log")
    return _layout(fig, "Over how many blocks' MLPs the change is spread (held-out prompts)<br><sup>blocks ranked "
                   f"by {a['spread_order']['ranked_by']}</sup>", 440,
                   "n (the MLP outputs of the top n blocks, patched together)", "share of the implicit reward")


def depth_profile(metrics: dict):
    """Per block: the out-of-fold R^2 of r_t from the residual stream's change after that block, read through the
    written token's unembedding (direct path) and by the logit lens, with 95% bootstrap CIs over prompts; the
    captured blocks marked, the target R^2 dotted."""
    import plotly.graph_objects as go

    d = metrics.get("depth") or {}
    if not d or "skipped" in d:
        return None
    fig = go.Figure()
    names = {"direct": "direct path of the change", "lens": "logit lens (each model's norm and unembedding)"}
    for reading, colour in (("direct", BLUE), ("lens", ORANGE)):
        if reading not in d:
            continue
        values = d[reading]["r2"]
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=names[reading],
                                 line={"color": colour}, error_y=_bars(values, d[reading]["ci"]),
                                 hovertemplate="block %{x}: R^2 %{y:.3f}<extra></extra>"))
    fig.add_hline(y=d["target"], line_dash="dot", line_color="black", annotation_text=f"R^2 {d['target']:g}",
                  annotation_position="top left")
    for block in (metrics.get("capture") or {}).get("layers") or []:
        fig.add_vline(x=block, line_color=RED, line_dash="dash", opacity=0.5)
    return _layout(fig, f"How much of r_t the residual stream's change holds, per block ({d['n_prompts']} held-out "
                   "prompts; red: captured blocks)", 420, "block (residual stream after it)", "out-of-fold R^2")


ALL = {"view_taus": view_taus, "irm_vs_rm": irm_vs_rm, "ablation_shares": ablation_shares,
       "layer_effects": layer_effects, "depth_profile": depth_profile, "attribution_curves": attribution_curves,
       "mlp_spread": mlp_spread}


def all_plots(metrics: dict) -> dict:
    """Every interactive plot this run has data for: name -> plotly Figure (``metrics``: its JSON form)."""
    out = {}
    for name, make in ALL.items():
        fig = make(metrics)
        if fig is not None:
            out[name] = fig
    return out
