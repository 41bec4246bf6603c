"""The terminal of ``irmprobe run``: one line per stage and irmprobe's own progress bars.

Everything else that libraries write while a run goes on (transformers' "Loading weights" and GGUF
conversion bars, SAELens's training bar, FutureWarnings, their log records) goes to the run's log file
``<report.out_dir>/irmprobe.log``, beside irmprobe's own INFO records. ``--verbose`` leaves it all on the
terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from irmprobe import progress

_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@contextlib.contextmanager
def library_output_to(log_path: Path | None) -> Iterator[Path | None]:
    """Send third-party output to ``log_path`` while the block runs; restore everything after it.

    irmprobe's logger keeps a terminal handler for its warnings; its INFO records reach the file only.
    With ``log_path`` None (the output directory cannot be written; the run's pre-flight check says so)
    nothing is redirected.
    """
    if log_path is None:
        yield None
        return
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", buffering=1, encoding="utf-8")  # closed in finally
    except OSError:
        yield None
        return
    terminal = sys.stderr
    file_handler = logging.StreamHandler(stream)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    ours = logging.getLogger("irmprobe")
    own_terminal = logging.StreamHandler(terminal)
    own_terminal.setLevel(logging.WARNING)
    saved_ours = (list(ours.handlers), ours.level, ours.propagate)
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    transformers_logging = _transformers_logging()
    saved_progress = progress.set_terminal(terminal)
    try:
        # irmprobe: INFO to the file, warnings to the terminal too.
        ours.handlers[:] = [file_handler, own_terminal]
        ours.setLevel(logging.INFO)
        ours.propagate = False
        # Everyone else: through the root logger to the file (transformers keeps a stderr handler of its own).
        root.handlers[:] = [file_handler]
        root.setLevel(logging.WARNING)
        if transformers_logging is not None:
            transformers_logging.disable_default_handler()
            transformers_logging.enable_propagation()
        logging.captureWarnings(True)
        sys.stderr = stream  # library progress bars (tqdm writes to stderr) and stray messages
        yield log_path
    finally:
        sys.stderr = terminal
        logging.captureWarnings(False)
        if transformers_logging is not None:
            transformers_logging.disable_propagation()
            transformers_logging.enable_default_handler()
        root.handlers[:], root.level = saved_root[0], saved_root[1]
        ours.handlers[:] = saved_ours[0]
        ours.setLevel(saved_ours[1])
        ours.propagate = saved_ours[2]
        progress.set_terminal(saved_progress)
        stream.close()


def _transformers_logging():
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - a dependency
        return None
    return transformers_logging
