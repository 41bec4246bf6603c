"""irmprobe's own progress bars. They write to the terminal even while :mod:`irmprobe.console` sends
third-party output (library progress bars, warnings, log records) to the run's log file."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

_terminal: TextIO | None = None
"""Where irmprobe's bars go while stderr is redirected; None: the current ``sys.stderr``."""


def terminal() -> TextIO:
    """The stream irmprobe's own bars and warnings are written to."""
    return _terminal if _terminal is not None else sys.stderr


def set_terminal(stream: TextIO | None) -> TextIO | None:
    """Point irmprobe's bars at ``stream`` (None: back to ``sys.stderr``); returns the previous setting."""
    global _terminal
    previous, _terminal = _terminal, stream
    return previous


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on the terminal (``TQDM_DISABLE=1``, set by ``--quiet``, hides it as any other)."""
    return tqdm(iterable, file=terminal(), **kwargs)
