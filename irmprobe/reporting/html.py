"""The local report: metrics JSON and one HTML page with the figures inlined."""

from __future__ import annotations

from pathlib import Path

from irmprobe.cache import write_json
from irmprobe.reporting.summary import plain, summary_lines
from irmprobe.reporting.tracking import wandb_tables


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
