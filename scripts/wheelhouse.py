"""Build a folder of wheels that installs irmprobe on an offline GPU host that already has CUDA PyTorch.

    python scripts/wheelhouse.py wheelhouse --python-version 3.12 --torch 2.11.0 [--dry-run]

1. builds irmprobe's own wheel (``pip wheel --no-deps .``);
2. resolves irmprobe's dependencies (``pip install --dry-run --report``: metadata only) with torch stood in
   for by an empty local wheel of the host's torch version, so that nothing of torch's (CUDA libraries,
   triton...) is resolved or fetched;
3. keeps every resolved package reachable from irmprobe without passing through torch;
4. fetches those with ``pip download --no-deps`` as wheels for the host's Python and platform, and builds
   a wheel here for the few published only as source (pure Python);
5. writes ``requirements.txt`` (the pinned set) beside them.

The resolution runs on this machine's Python: run it with the host's Python minor version where you can
(``make wheelhouse PYTHON=python3.12``), since a dependency may differ by Python version.

``make install-offline`` on the host then installs from the folder without an index and without touching
its torch (see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_ONLY = ("torch",)
"""Packages the host already has and that are never put in the wheelhouse (nor what only they need)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def without_host_packages(report: dict, root: str = "irmprobe", host: tuple[str, ...] = HOST_ONLY) -> dict[str, str]:
    """``{name: version}`` of the resolved packages reachable from ``root`` without entering a ``host`` package.

    ``report`` is pip's installation report (``pip install --dry-run --report``): its ``install`` entries
    carry each package's metadata with ``requires_dist``. An edge counts when the required name is in the
    resolved set (pip already applied the environment markers) and it is not an optional extra's.
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare Python: pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement

    resolved = {canonical(item["metadata"]["name"]): item for item in report["install"]}
    skip = {canonical(h) for h in host}
    start = canonical(root)
    if start not in resolved:
        raise ValueError(f"{root} is not in the resolution report")
    keep, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in keep or name in skip:
            continue
        keep.add(name)
        for spec in resolved[name]["metadata"].get("requires_dist") or ():
            req = Requirement(spec)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            dep = canonical(req.name)
            if dep in resolved and dep not in keep:
                todo.append(dep)
    keep.discard(start)
    return {resolved[n]["metadata"]["name"]: resolved[n]["metadata"]["version"] for n in sorted(keep)}


def _target(args) -> list[str]:
    """pip options that select wheels for the host rather than for this machine."""
    out = []
    if args.python_version:
        out += ["--python-version", args.python_version, "--implementation", "cp"]
    if args.platform:
        out += ["--platform", args.platform]
    return out + (["--only-binary=:all:"] if out else [])


def stub_torch_wheel(folder: Path, version: str) -> Path:
    """An empty wheel named torch ``<version>+host`` with no dependencies: torch for the resolver, nothing more."""
    import base64
    import hashlib
    import zipfile

    full = f"{version}+host"
    info = f"torch-{full}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {full}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: irmprobe-wheelhouse\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = Path(folder) / f"torch-{full}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def _pip(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *argv], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the wheelhouse folder (created)")
    parser.add_argument("--python-version", help="the host's Python, e.g. 3.12 (default: this one)")
    parser.add_argument("--platform", default=None,
                        help="the host's wheel platform, e.g. manylinux_2_28_x86_64 (default: this machine's)")
    parser.add_argument("--torch", default="2.13.0",
                        help="the host's torch version, e.g. 2.11.0: dependencies resolve against it")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched; fetch nothing")
    args = parser.parse_args(argv)
    if args.platform is None and args.python_version:
        args.platform = "manylinux_2_28_x86_64"
    args.out.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--no-deps", "--quiet", "-w", str(args.out), str(ROOT))
    (own,) = sorted(args.out.glob("irmprobe-*.whl"))[-1:]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        stub_torch_wheel(Path(tmp), args.torch)
        _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--find-links", tmp,
             str(own), f"torch=={args.torch}+host")
        wanted = without_host_packages(json.loads(report.read_text()))
        urls = {canonical(i["metadata"]["name"]): i["download_info"]["url"]
                for i in json.loads(report.read_text())["install"]}
    pinned = [f"{name}=={version}" for name, version in wanted.items()]
    (args.out / "requirements.txt").write_text("\n".join([own.name.split("-")[0] + "==" + own.name.split("-")[1],
                                                          *pinned]) + "\n")
    print(f"{len(pinned)} packages besides irmprobe (torch and what only torch needs are left to the host)")
    if args.dry_run:
        print("\n".join(pinned))
        return 0
    sources = [p for p in pinned if not urls[canonical(p.split("==")[0])].endswith(".whl")]
    wheels = [p for p in pinned if p not in sources]
    if wheels:
        _pip("download", "--no-deps", "--quiet", "-d", str(args.out), *_target(args), *wheels)
    if sources:  # published only as source: build a (pure Python) wheel here
        _pip("wheel", "--no-deps", "--quiet", "-w", str(args.out), *sources)
    print(f"wheelhouse: {args.out} ({len(list(args.out.glob('*.whl')))} wheels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
