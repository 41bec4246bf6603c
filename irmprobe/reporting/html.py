"""The local report: metrics JSON and one self-contained HTML page that works offline.

The page: the verdict at the top, coloured by the primary comparison's outcome, and a table of contents; the
held-out continuations as coloured text (log-ratio, IRM or RM value per token, switchable; hover for all three;
prompts ordered by IRM-RM disagreement); the words the tuning made more and less likely; interactive plotly
plots (plotly.js inlined once, no CDN); sortable, filterable tables; a card per feature the report names; the
remaining matplotlib figures as inline PNG; and the full text summary. Every section whose data the run lacks
says what is absent and why.

Why not circuitsvis for the coloured text: its rendered HTML loads its React bundle from unpkg (a request that
leaves the file), its local rendering inlines a 1.3 MB bundle into every element, and a token carries one value
where the report switches between three; small inline spans with a 60-line script do what is needed. Why not
sae-dashboard for the feature cards: its releases pin transformer-lens < 3, transformers < 4.57 and datasets < 4,
which irmprobe's own pins exclude, so it cannot be installed beside it; the cards show the same content
(top contexts with per-token activations, histogram, logit effects) rendered here. Why a hand-written table
sorter: a table of a few hundred rows needs ~30 lines of script, where DataTables-style packages would bring
pandas round trips and a jQuery bundle into an offline file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from irmprobe.analysis.verdict import named_words_line, sampling_text
from irmprobe.cache import write_json
from irmprobe.reporting.summary import plain, summary_lines
from irmprobe.reporting.tracking import wandb_tables

SIZE_BUDGET_MB = 10.0
"""The report's size budget on the demo (plotly.js is 4.8 MB of it)."""

OUTCOME_CLASS = {"agrees": "good", "opposes": "bad", "unrelated": "warn"}

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;padding:0 1.5em 3em;color:#222;
 line-height:1.4;font-size:14px}
h1{margin:.6em 0 .3em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:.8em 0 .3em}
.verdict{border-left:8px solid #999;background:#f4f4f4;padding:.6em 1em;margin:.5em 0 1em}
.verdict.good{border-color:#2ca02c;background:#eef8ee}.verdict.bad{border-color:#d62728;background:#fbeeee}
.verdict.warn{border-color:#e6a100;background:#fdf6e3}.verdict ul{margin:.3em 0;padding-left:1.2em}
.verdict .call{font-size:1.15em;font-weight:600}
nav.toc{columns:3 16em;background:#fafafa;border:1px solid #eee;padding:.5em 1em}nav.toc a{display:block}
.absent{color:#8a5a00;background:#fff8e6;border:1px solid #f0d9a0;padding:.4em .8em;margin:.4em 0}
.note{color:#555;font-size:12.5px;margin:.3em 0}
.scroll{overflow-x:auto;max-width:100%;margin:.4em 0}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
td{white-space:pre-wrap}
th{background:#eee;cursor:pointer;white-space:nowrap;position:sticky;top:0}th.sorted-asc::after{content:' \\25B2'}
th.sorted-desc::after{content:' \\25BC'}.tablewrap{max-height:480px;overflow:auto;border:1px solid #eee}
input.filter,#card-filter{margin:.3em 0;padding:3px 6px;width:22em;max-width:100%}
.plot{width:100%;min-width:0}img{max-width:100%;height:auto}pre{font-size:11px;white-space:pre-wrap}
.controls{display:flex;flex-wrap:wrap;gap:.6em 1.4em;align-items:center;margin:.4em 0}
.controls select{max-width:100%}
.seq{margin:.5em 0;padding:.3em .5em;border:1px solid #eee}.seq .label{font-size:12px;color:#555}
.tok{white-space:pre-wrap;border-radius:2px;cursor:default}.prompt{color:#777}
#tok-info{font-family:monospace;font-size:12px;min-height:1.4em;background:#f7f7f7;padding:2px 6px}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;border-radius:2px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,30em),1fr));gap:1em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;min-width:0;overflow-wrap:anywhere}
.card h3{font-family:monospace}.badge{display:inline-block;background:#e8eef7;border-radius:9px;padding:0 7px;
 margin:1px 2px;font-size:11.5px}.ctx{font-size:12.5px;margin:2px 0;border-bottom:1px dotted #eee}
.ctx .act{border-radius:2px}.stats{font-size:12px}.stats td{border:none;padding:0 8px 0 0}
.effects{display:grid;grid-template-columns:1fr 1fr;gap:.5em;font-size:12px}
.effects code{background:#f3f3f3;padding:0 3px;margin:1px;display:inline-block}
svg.hist rect{fill:#ff7f0e}
"""

SCRIPT = """
function sortTable(th){const table=th.closest('table');const i=[...th.parentNode.children].indexOf(th);
 const asc=!th.classList.contains('sorted-asc');table.querySelectorAll('th').forEach(h=>h.classList.remove(
 'sorted-asc','sorted-desc'));th.classList.add(asc?'sorted-asc':'sorted-desc');const body=table.tBodies[0];
 const rows=[...body.rows];const key=r=>{const t=r.cells[i].textContent.trim();const n=parseFloat(t);
 return t===''||t==='-'?null:(isNaN(n)||!/^[-+.0-9eE]+$/.test(t)?t.toLowerCase():n)};
 rows.sort((a,b)=>{const x=key(a),y=key(b);if(x===null)return 1;if(y===null)return -1;
 if(typeof x!==typeof y)return typeof x==='number'?-1:1;return (x<y?-1:x>y?1:0)*(asc?1:-1)});
 rows.forEach(r=>body.appendChild(r))}
function filterTable(input){const q=input.value.toLowerCase();const table=document.getElementById(input.dataset.table);
 let shown=0;[...table.tBodies[0].rows].forEach(r=>{const ok=r.textContent.toLowerCase().includes(q);
 r.style.display=ok?'':'none';shown+=ok});const c=document.getElementById(input.dataset.table+'-count');
 if(c)c.textContent=shown+' of '+table.tBodies[0].rows.length+' rows'}
document.addEventListener('click',e=>{if(e.target.tagName==='TH'&&e.target.closest('table.sortable'))
 sortTable(e.target)});
document.addEventListener('input',e=>{if(e.target.classList.contains('filter'))filterTable(e.target)});
function shade(v,scale,pos,neg){if(v===null||v===undefined)return 'transparent';const a=Math.min(1,Math.abs(v)/
 (scale||1));const c=v>0?pos:neg;return 'rgba('+c+','+(0.08+0.8*a).toFixed(3)+')'}
const POS='33,113,181',NEG='203,24,29';
function fmt(v){return v===null||v===undefined?'not valued':(v>=0?'+':'')+v.toFixed(3)}
function renderTexts(){const el=document.getElementById('texts-data');if(!el)return;const T=JSON.parse(
 el.textContent);const sel=document.getElementById('prompt-select');const by=document.querySelector(
 'input[name=colour-by]:checked').value;const p=T.prompts[+sel.value];const box=document.getElementById('text-view');
 box.innerHTML='';const head=document.createElement('div');head.className='prompt';head.textContent=
 'prompt: '+p.prompt;box.appendChild(head);p.sequences.forEach((s,si)=>{const d=document.createElement('div');
 d.className='seq';const lab=document.createElement('div');lab.className='label';lab.textContent=s.source+
 ' model | RM reward '+s.reward.toFixed(3)+' | IRM text score '+s.irm_score.toFixed(3);d.appendChild(lab);
 s.tokens.forEach((t,i)=>{const sp=document.createElement('span');sp.className='tok';sp.textContent=t;
 const v={log_ratio:s.log_ratio[i],irm:s.irm[i],rm:s.rm[i]};sp.style.background=shade(v[by],T.scale[by],POS,NEG);
 sp.dataset.by=by;const info=JSON.stringify(t)+'  log-ratio '+fmt(v.log_ratio)+'  IRM '+fmt(v.irm)+'  RM '+
 fmt(v.rm);sp.title=info;sp.addEventListener('mouseover',()=>{document.getElementById('tok-info').textContent=
 info});d.appendChild(sp)});box.appendChild(d)})}
function filterCards(){const q=document.getElementById('card-filter').value.toLowerCase();const src=
 document.getElementById('card-source').value;let n=0;document.querySelectorAll('.card').forEach(c=>{const ok=
 c.textContent.toLowerCase().includes(q)&&(!src||c.dataset.sources.split('|').includes(src));c.style.display=
 ok?'':'none';n+=ok});document.getElementById('card-count').textContent=n+' cards shown'}
document.addEventListener('DOMContentLoaded',()=>{const sel=document.getElementById('prompt-select');if(sel){
 sel.addEventListener('change',renderTexts);document.querySelectorAll('input[name=colour-by]').forEach(r=>
 r.addEventListener('change',renderTexts));renderTexts()}const cf=document.getElementById('card-filter');
 if(cf){cf.addEventListener('input',filterCards);document.getElementById('card-source').addEventListener(
 'change',filterCards)}});
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _cell(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return _esc(", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v))
    return _esc(v)


class Page:
    """The report's parts in order, with the table of contents built from the sections."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.n_tables = 0

    def section(self, anchor: str, title: str, intro: str | None = None) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{_esc(title)}</h2>' + (f'<p class="note">{_esc(intro)}</p>'
                                                                     if intro else ""))

    def absent(self, text: str) -> None:
        self.parts.append(f'<p class="absent">{_esc(text)}</p>')

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_esc(text)}</p>')

    def table(self, cols, rows, *, title: str | None = None, limit: int | None = None) -> None:
        """A sortable (click a header), filterable table."""
        self.n_tables += 1
        tid = f"table-{self.n_tables}"
        rows = rows[:limit] if limit else rows
        head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
        self.parts.append((f"<h3>{_esc(title)}</h3>" if title else "")
                          + f'<input class="filter" data-table="{tid}" placeholder="filter rows" '
                          f'aria-label="filter {tid}"> <span class="note" id="{tid}-count">{len(rows)} rows</span>'
                          f'<div class="tablewrap"><table class="sortable" id="{tid}"><thead><tr>{head}</tr></thead>'
                          f"<tbody>{body}</tbody></table></div>")

    def plot(self, name: str, fig) -> None:
        self.parts.append('<div class="plot">' + fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"plot-{name}",
            config={"responsive": True, "displaylogo": False}) + "</div>")

    def image(self, name: str, fig) -> None:
        import base64
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # tight: no label is cut at the edge
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(f'<h3>{_esc(name.replace("_", " "))}</h3><img alt="{name}" '
                          f'src="data:image/png;base64,{data}">')

    def raw(self, text: str) -> None:
        self.parts.append(text)


def _json_script(element_id: str, data) -> str:
    # <, > and & as JSON escapes: no token or prompt text can close the element or open a comment inside it.
    text = (json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _scale(values) -> float:
    """A robust colour scale: the 95th percentile of |value| (1 when there is none)."""
    import numpy as np

    vals = np.abs(np.array([v for v in values if v is not None], dtype=float))
    return float(np.percentile(vals, 95)) if len(vals) and np.percentile(vals, 95) > 0 else 1.0


def verdict_block(metrics: dict) -> str:
    primary = metrics.get("primary") or {}
    outcome = primary.get("outcome") or "undetermined"
    lines = metrics.get("verdict") or []
    call = f"outcome: {outcome}" + (f" ({primary.get('view')})" if primary.get("view") else "")
    return (f'<div class="verdict {OUTCOME_CLASS.get(outcome, "")}" id="verdict" data-outcome="{_esc(outcome)}">'
            f'<div class="call">{_esc(call)}</div><ul>' + "".join(f"<li>{_esc(v)}</li>" for v in lines)
            + "</ul></div>")


def text_section(page: Page, dash: dict | None) -> None:
    page.section("texts", "What the models wrote, token by token",
                 "Held-out continuations of both models. Colour a token by the log-ratio the tuning wrote there "
                 "(log p_tuned - log p_base), the primary IRM's out-of-fold value at that position, or the RM's "
                 "value of the token (blank: the RM does not value it). Blue: positive, red: negative, scaled to "
                 "the 95th percentile of |value|. Hover a token for all three numbers.")
    texts = (dash or {}).get("texts")
    if not texts or not texts.get("prompts"):
        page.absent("no text views: this metrics file was written before they existed (re-run `irmprobe run`; "
                    "cached stages are reused)" if dash is None else "no held-out continuation was scored")
        return
    prompts = texts["prompts"]
    scale = {k: _scale(v for p in prompts for s in p["sequences"] for v in s[k]) for k in ("log_ratio", "irm", "rm")}
    options = "".join(f'<option value="{i}">disagreement {p["disagreement"]:.2f}: {_esc(p["prompt"][:70])}</option>'
                      for i, p in enumerate(prompts))
    radios = "".join(f'<label><input type="radio" name="colour-by" value="{v}"{" checked" if v == "log_ratio" else ""}>'
                     f" {label}</label>" for v, label in (("log_ratio", "log-ratio"), ("irm", "IRM value"),
                                                          ("rm", "RM value")))
    page.raw(f'<div class="controls"><label>prompt (most IRM-RM disagreement first) <select id="prompt-select">'
             f"{options}</select></label><span>colour by: {radios}</span></div>"
             f'<div class="legend note"><span style="background:rgba(33,113,181,.7);color:#fff">positive</span>'
             f'<span style="background:rgba(203,24,29,.7);color:#fff">negative</span> '
             f'disagreement: {_esc(texts["rule"])}'
             f'; showing {len(prompts)} of {texts["n_prompts"]} prompts</div>'
             f'<div id="tok-info">hover a token</div><div id="text-view"></div>'
             + _json_script("texts-data", {"prompts": prompts, "scale": scale}))


def words_section(page: Page, dash: dict | None) -> None:
    page.section("words", "Words the tuned model learned to write more, and less",
                 "Every word token's full-vocabulary log-ratio: its mean change in log-probability over every "
                 "held-out context (not fitted), with the RM's value and how often each model wrote it in the "
                 "held-out continuations.")
    words = (dash or {}).get("words")
    if not words:
        page.absent("no word table: this metrics file was written before it existed, or the capture has no "
                    "full-vocabulary sums")
        return
    page.table(words["columns"], words["more"], title=f"made more likely (top {len(words['more'])} of "
                                                      f"{words['n_words']} word tokens)")
    page.table(words["columns"], words["less"], title=f"made less likely (bottom {len(words['less'])})")


def _histogram_svg(counts: list[int]) -> str:
    top = max(counts) or 1
    width = 12
    bars = "".join(f'<rect x="{i * width}" y="{40 - 40 * c / top:.1f}" width="{width - 2}" height="{40 * c / top:.1f}">'
                   f"<title>{c}</title></rect>" for i, c in enumerate(counts))
    return f'<svg class="hist" width="{width * len(counts)}" height="40" role="img" aria-label="histogram">{bars}</svg>'


def _context_html(ctx: dict, peak: float) -> str:
    spans = []
    for tok, act in zip(ctx["tokens"], ctx["activations"]):
        alpha = 0.0 if peak <= 0 else min(1.0, act / peak)
        style = f' style="background:rgba(255,127,14,{alpha:.2f})"' if act > 0 else ""
        spans.append(f'<span class="act"{style} title="activation {act:.3f}">{_esc(tok)}</span>')
    return '<div class="ctx">' + "".join(spans) + "</div>"


def features_section(page: Page, dash: dict | None) -> None:
    page.section("features", "Features the report names",
                 "One card per SAE feature named anywhere in the report: where it is named, its weight in the IRM "
                 "(and its rank among all columns), in the decision-side IRM, its attribution, its correlation "
                 "with the RM's token values, its top activating held-out contexts (orange: activation), the "
                 "histogram of its non-zero activations, and the tokens its decoder direction promotes and "
                 "suppresses through the final norm and the unembedding (centred logit effect).")
    if dash is None:
        page.absent("no feature cards: this metrics file was written before they existed")
        return
    cards = dash.get("features") or []
    if not cards:
        page.absent(dash.get("features_absent") or "no feature is named in this run")
        return
    sources = sorted({s for c in cards for s in c["named_as"]})
    page.raw('<div class="controls"><input class="filter-cards" id="card-filter" placeholder="filter cards (token, '
             'explanation, id)"><label>named as <select id="card-source"><option value="">any</option>'
             + "".join(f'<option value="{_esc(s)}">{_esc(s)}</option>' for s in sources)
             + f'</select></label><span class="note" id="card-count">{len(cards)} cards shown</span></div>')
    out = []
    for c in cards:
        judge = c.get("judge") or {}
        peak = c["max_activation"]
        stats = [("IRM weight", f"{c['irm_weight']:+.3f} (rank {c['irm_rank']} of {c['n_columns']})"),
                 ("decision-side weight", "-" if c["decision_weight"] is None else f"{c['decision_weight']:+.3f}"),
                 ("attribution", "-" if c["attribution"] is None else f"{c['attribution']:+.4f}"),
                 ("correlation with RM", f"{c['rm_corr']:+.3f}"), ("fires on", f"{c['frequency']:.2%} of rows"),
                 ("max activation", f"{peak:.2f}")]
        if judge:
            stats.append(("judge", f"{'relevant' if judge.get('relevant') else 'not relevant'}"
                                   + (f", detection {judge['detection']:.2f}" if judge.get("detection") is not None
                                      else "")))
        out.append(
            f'<div class="card" data-sources="{_esc("|".join(c["named_as"]))}"><h3>{_esc(c["id"])}</h3>'
            + "".join(f'<span class="badge">{_esc(s)}</span>' for s in c["named_as"])
            + '<table class="stats">' + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in stats)
            + "</table>"
            + (f'<p class="note">judge: {_esc(judge.get("explanation"))}</p>' if judge.get("explanation") else "")
            + "<div><b>top contexts</b>" + "".join(_context_html(x, peak) for x in c["contexts"]) + "</div>"
            + f"<div><b>activations</b> {_histogram_svg(c['histogram']['counts'])} "
              f"<span class='note'>{c['histogram']['edges'][0]:.2f} .. {c['histogram']['edges'][-1]:.2f}</span></div>"
            + '<div class="effects"><div><b>promotes</b><br>'
            + "".join(f"<code title='{v:+.3f}'>{_esc(t)}</code>" for t, v in c["promoted"])
            + "</div><div><b>suppresses</b><br>"
            + "".join(f"<code title='{v:+.3f}'>{_esc(t)}</code>" for t, v in c["suppressed"]) + "</div></div></div>")
    page.raw('<div class="cards">' + "".join(out) + "</div>")


def render(metrics) -> str:
    """The report page as one string (see the module docstring)."""
    from plotly.offline import get_plotlyjs

    from irmprobe.reporting import figures, interactive

    metrics = plain(metrics)
    dash = metrics.get("dashboard")
    tables = wandb_tables(metrics, metrics["tokens"]["rows"])
    plots = interactive.all_plots(metrics)
    page = Page()

    text_section(page, dash)
    words_section(page, dash)

    page.section("views", "IRM views against the RM", "Kendall tau of each view's out-of-fold token values with the "
                 "RM's values; each CI says what it resamples (ci_method); red crosses: the control organisms.")
    if not metrics.get("control"):
        page.absent("no control organism in this run: no view has a control beside it, and the verdict makes no "
                    "call (set compare.n_controls >= 2)")
    if "view_taus" in plots:
        page.plot("view_taus", plots["view_taus"])
    page.table(*tables["views"])

    page.section("tokens", "Token values: IRM against RM", "Every token the RM values that the held-out "
                 "continuations contain often enough: its RM value, count, and each view's out-of-fold value.")
    if "irm_vs_rm" in plots:
        page.plot("irm_vs_rm", plots["irm_vs_rm"])
    else:
        page.absent("no RM-valued token was scored")
    page.table(*tables["tokens"])
    d = (metrics.get("disagreements") or {}).get("sae_irm")
    if d:
        cols = ["token", "irm", "rm", "rank_gap"]
        page.table(cols, d.get("irm_over_rm", []), title="where the SAE IRM and the RM disagree most: IRM above RM")
        page.table(cols, d.get("rm_over_irm", []), title="where the SAE IRM and the RM disagree most: RM above IRM")

    features_section(page, dash)

    page.section("discovery", "Discovery: what the tuned model rewards beyond the RM")
    if "discoveries" in tables:
        page.table(*tables["discoveries"], title="discovered tokens")
        named = (metrics.get("discovery") or {}).get("named")
        if "named words" in tables:
            page.table(*tables["named words"], title="named words (discover.words): named only within a list that "
                       "passes as one set, each against the controls' values of that word, BH over the list")
        elif named:  # a list that could not be tested (too few controls, no word one token): say why
            page.absent(named_words_line(named))
        page.table(*tables["pairwise accuracy"], title="the IRM as a reward model: pairwise accuracy")
    else:
        page.absent("discovery did not run in this run")

    page.section("attribution", "Attribution: which features carry the implicit reward")
    attribution = metrics.get("attribution") or {}
    if "attribution_curves" in plots:
        page.plot("attribution_curves", plots["attribution_curves"])
        page.table(*tables["attribution nodes"], title="nodes ranked by attribution" + (
            " (features of the dictionaries of the change, not the IRM's SAEs)"
            if attribution.get("dictionary") == "change" else ""))
        if "attribution hook points" in tables:
            page.table(*tables["attribution hook points"],
                       title="what each set of hook points carries: 1 - m(the base's activations patched in at every "
                             "point of the set) / m(tuned), held-out prompts, 95% bootstrap CI over prompts; no "
                             "feature set at a hook point can carry more than its point does, except by overshooting"
                             + (f"; the top n blocks are ranked by {attribution['spread_order']['ranked_by']}"
                                if attribution.get("spread_order") else ""))
        if "mlp_spread" in plots:
            page.plot("mlp_spread", plots["mlp_spread"])
        if "attribution change dictionaries" in tables:
            page.table(*tables["attribution change dictionaries"],
                       title="the nodes' dictionaries: SAEs of the change (tuned minus base), held-out prompts")
    else:
        page.absent(f"no attribution: {attribution.get('skipped', 'the attribute stage did not run')}")

    page.section("ablation", "Ablation and patching while the tuned model samples")
    if "ablation_shares" in plots:
        page.plot("ablation_shares", plots["ablation_shares"])
    if "ablation" in tables:
        design = sampling_text((metrics.get("validation") or {}).get("ablation") or [])
        page.table(*tables["ablation"], title=None if design is None else f"every condition samples {design}")
    else:
        page.absent("no ablation: validation was skipped in this run" + (
            "" if metrics.get("validation") is not None else " (validate.enabled off, a null organism, or an "
                                                             "IRM on other inputs than the tuned SAE features)"))

    page.section("layers", "Where the tuning acts: layers")
    if "layer_effects" in plots:
        page.plot("layer_effects", plots["layer_effects"])
    if "depth_profile" in plots:
        page.plot("depth_profile", plots["depth_profile"])
    else:
        page.absent("no depth profile: " + ((metrics.get("depth") or {}).get("skipped") or "the depth stage did not "
                                            "run"))

    page.section("saes", "SAEs and other figures")
    if metrics.get("saes"):
        page.table(*tables["saes"])
    else:
        page.absent("no SAE in this run (irm.inputs=raw trains none): the feature sections are empty")
    statics = figures.all_figures(metrics, figures.STATIC)
    for name, fig in statics.items():
        page.image(name, fig)
    if "features" in tables:
        page.table(*tables["features"], title="features the judge read")

    page.section("summary", "Full summary")
    page.raw("<pre>" + _esc("\n".join(summary_lines(metrics))) + "</pre>")

    toc = '<nav class="toc" id="contents">' + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in page.toc) + "</nav>"
    body = "<h1>irmprobe report</h1>" + verdict_block(metrics) + toc + "".join(page.parts)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>irmprobe report</title>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script><script>{SCRIPT}</script></head>"
            f"<body>{body}</body></html>")


def write_metrics(path: Path, metrics) -> Path:
    """metrics.json: the typed metrics' JSON form (``kind`` and ``schema_version`` first)."""
    return write_json(path, plain(metrics))


def write_html(metrics, path: Path) -> Path:
    """The report as one self-contained HTML file (written to a temporary name, then renamed)."""
    doc = render(metrics)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
