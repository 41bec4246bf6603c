#!/usr/bin/env python
"""Open an HTML report in headless Chromium (driven by Playwright), check it as a reader would see it, and save
full-page screenshots.

At each window width (1024 and 1920 px by default) it checks that
- no request leaves the file: every request is logged and any that is not ``file:`` / ``data:`` / ``blob:`` is
  blocked and fails the check;
- no plot is empty: every plotly plot has drawn marks, every inline PNG has non-background pixels;
- no label overflows its box: every plotly tick label, title and legend text lies inside its plot, no card or
  section is wider than the page, and the page itself has no horizontal scroll;
- no script error was raised.
At the first width it also interacts with the text view: switches the colouring to the RM's values (the token
backgrounds must change) and picks another prompt (the text must change).

Needs Chromium (`make screenshot` installs Debian's chromium when it is missing) and the ``playwright`` Python
package (a dev dependency; its own browser download is not used).

    python scripts/screenshot_report.py irmprobe-runs/run-.../report.html --out report.png
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import sys
from pathlib import Path

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
LOCAL = ("file:", "data:", "blob:", "about:")
SIZE_BUDGET_MB = 10.0

PLOTS_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => {
  const box = p.getBoundingClientRect();
  const marks = p.querySelectorAll('.scatterlayer .trace path, .scatterlayer .trace .point, .barlayer .trace path')
    .length;
  const labels = [...p.querySelectorAll('.xtick text, .ytick text, .g-gtitle text, .g-xtitle text, .g-ytitle text, '
    + '.legendtext, .annotation-text')].filter(t => t.textContent.trim() && t.getBBox().width > 0);
  const out = labels.filter(t => { const r = t.getBoundingClientRect();
    return r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1; })
    .map(t => t.textContent.trim().slice(0, 60));
  return {id: p.id, width: box.width, marks, labels: labels.length, overflow: out};
})"""

LAYOUT_JS = """() => {
  const page = document.documentElement;
  const wide = [...document.querySelectorAll('.card, h1, h2, .verdict, nav.toc, .controls, .seq, .plot, .tablewrap')]
    .filter(e => e.offsetParent !== null && e.getBoundingClientRect().right > page.clientWidth + 1)
    .map(e => (e.id || e.className || e.tagName) + ': ' + e.textContent.trim().slice(0, 40));
  const cut = [...document.querySelectorAll('.card, .badge, nav.toc a, .controls label')]
    .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
    .map(e => e.textContent.trim().slice(0, 40));
  const images = [...document.querySelectorAll('img')].map(i => ({alt: i.alt, width: i.naturalWidth,
    shown: i.getBoundingClientRect().width, right: i.getBoundingClientRect().right}));
  return {scroll: page.scrollWidth, client: page.clientWidth, wide, cut, images};
}"""

TOKENS_JS = """() => [...document.querySelectorAll('#text-view .tok')].map(s => s.style.background).join('|')"""


def ink(png: bytes) -> float:
    """Share of pixels that differ from the most common colour (the background)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 24) or []
    background = max(colours)[0] if colours else 0
    return 1.0 - background / (img.width * img.height)


def check(report: Path, out: Path, widths: list[int], chromium: str, height: int = 900) -> dict:
    """Every check at every width; returns {"failures": [...], ...} (no failure: the report passes)."""
    from playwright.sync_api import sync_playwright

    failures: list[str] = []
    page_text = report.read_text(encoding="utf-8")
    size_mb = report.stat().st_size / 1e6
    if size_mb > SIZE_BUDGET_MB:
        failures.append(f"the report is {size_mb:.1f} MB, over the {SIZE_BUDGET_MB:g} MB budget")
    for name, data in re.findall(r'alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page_text):
        if ink(base64.b64decode(data)) < 0.01:
            failures.append(f"image {name} is empty")
    requests: list[str] = []
    errors: list[str] = []
    result: dict = {"size_mb": round(size_mb, 2), "widths": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
        try:
            for n, width in enumerate(widths):
                context = browser.new_context(viewport={"width": width, "height": height})

                def route(r):
                    requests.append(r.request.url[:120])
                    return r.continue_() if r.request.url.startswith(LOCAL) else r.abort()

                context.route("**/*", route)
                page = context.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)[:200]))
                page.on("console", lambda m: errors.append(m.text[:200]) if m.type == "error" else None)
                page.goto(report.resolve().as_uri(), wait_until="load")
                page.wait_for_timeout(800)  # plotly draws after load
                plots = page.evaluate(PLOTS_JS)
                layout = page.evaluate(LAYOUT_JS)
                for plot in plots:
                    if plot["marks"] == 0:
                        failures.append(f"{width}px: plot {plot['id']} is empty")
                    if plot["overflow"]:
                        failures.append(f"{width}px: plot {plot['id']} labels outside its box: {plot['overflow'][:5]}")
                if layout["scroll"] > layout["client"] + 1:
                    failures.append(f"{width}px: the page scrolls sideways ({layout['scroll']} > {layout['client']})")
                failures += [f"{width}px: wider than the page: {w}" for w in layout["wide"]]
                failures += [f"{width}px: text cut in its box: {c}" for c in layout["cut"]]
                failures += [f"{width}px: image {i['alt']} not shown" for i in layout["images"] if not i["shown"]]
                entry = {"plots": {pl["id"]: {"marks": pl["marks"], "labels": pl["labels"]} for pl in plots}}
                if n == 0 and page.locator("#prompt-select").count():
                    options = page.locator("#prompt-select option").count()
                    # The first prompt with tokens shown (a prompt's continuations may all be unscored).
                    for i in range(options):
                        page.select_option("#prompt-select", index=i)
                        if page.evaluate(TOKENS_JS):
                            break
                    before = page.evaluate(TOKENS_JS)
                    page.check("input[name=colour-by][value=rm]")
                    after = page.evaluate(TOKENS_JS)
                    if not before or before == after:
                        failures.append("switching the colouring to the RM's values changed no token")
                    if options > 1:
                        other = (i + 1) % options
                        page.select_option("#prompt-select", index=other)
                        want = page.evaluate(f"() => 'prompt: ' + JSON.parse(document.getElementById('texts-data')"
                                             f".textContent).prompts[{other}].prompt")
                        if page.inner_text("#text-view .prompt") != want:
                            failures.append("picking another prompt did not show it in the text view")
                    entry["interaction"] = {"tokens": before.count("|") + 1 if before else 0,
                                            "changed": before != after, "prompts": options}
                    page.check("input[name=colour-by][value=log_ratio]")
                shot = out.with_name(f"{out.stem}-{width}{out.suffix}")
                page.screenshot(path=str(shot), full_page=True)
                entry["screenshot"] = str(shot)
                entry["ink"] = round(ink(shot.read_bytes()), 3)
                if entry["ink"] < 0.01:
                    failures.append(f"{width}px: the screenshot is blank")
                result["widths"][width] = entry
                context.close()
        finally:
            browser.close()
    left = [u for u in requests if not u.startswith(LOCAL)]
    failures += [f"request left the file: {u}" for u in left]
    failures += [f"script error: {e}" for e in errors]
    result["requests"] = {"total": len(requests), "outside": left}
    result["failures"] = failures
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a report.html written by irmprobe")
    parser.add_argument("--out", type=Path, default=Path("report.png"),
                        help="screenshots go to OUT's stem plus the width (report-1024.png, ...)")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 1920])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium binary")
    args = parser.parse_args(argv)
    if not args.chromium:
        print("Chromium not found: install it (make screenshot does) or pass --chromium", file=sys.stderr)
        return 1
    result = check(args.report, args.out, args.widths, args.chromium)
    print(json.dumps(result, indent=1))
    for f in result["failures"]:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
