#!/usr/bin/env python
"""Render an HTML report in headless Chromium, save a screenshot, and check the plots are not empty.

Needs Chromium (`make screenshot` installs Debian's chromium when it is missing). Every inline
plot image in the report is decoded and must hold non-background pixels; then the page itself is
rendered full-height and the screenshot must not be blank.

    python scripts/screenshot_report.py irmprobe-runs/run-.../report.html --out report.png
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def ink(png: bytes) -> float:
    """Share of pixels that differ from the most common colour (the background)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 24) or []
    background = max(colours)[0] if colours else 0
    return 1.0 - background / (img.width * img.height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a report.html written by irmprobe")
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="where the screenshot goes")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium binary")
    args = parser.parse_args(argv)
    page = args.report.read_text()
    plots = re.findall(r'alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    if not plots:
        print("no inline plots in the report", file=sys.stderr)
        return 1
    for name, data in plots:
        share = ink(base64.b64decode(data))
        print(f"plot {name:<20} {share:.1%} of pixels drawn")
        if share < 0.01:
            print(f"plot {name} is empty", file=sys.stderr)
            return 1
    if not args.chromium:
        print("Chromium not found: install it (make screenshot does) or pass --chromium", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as profile:
        cmd = [args.chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
               f"--screenshot={args.out.resolve()}", args.report.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    share = ink(args.out.read_bytes())
    print(f"screenshot {args.out} ({share:.1%} of pixels drawn)")
    return 0 if share > 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
