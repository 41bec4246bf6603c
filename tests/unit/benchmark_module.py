"""Load a script of benchmarks/ (or scripts/) as a module, for the tests of that script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str, folder: str = "benchmarks"):
    """``<folder>/<name>.py`` as a module; the folder goes on ``sys.path`` first, as when the script runs, since
    a script may import another (naming_calibration imports causal_calibration)."""
    where = ROOT / folder
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    spec = importlib.util.spec_from_file_location(name, where / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
