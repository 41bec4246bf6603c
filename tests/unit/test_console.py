"""The terminal of a run: irmprobe's stage lines and bars; library bars, warnings and log records in the log file."""

import logging
import sys
import warnings

from tqdm import tqdm

from irmprobe import progress
from irmprobe.console import library_output_to


def _a_run(echo):
    """What a stage does on the terminal and what the libraries it calls do."""
    echo("[capture] ...")
    for _ in progress.bar(range(3), desc="capture", leave=False):
        pass
    for _ in tqdm(range(3), desc="Loading weights"):  # a library's bar: tqdm on sys.stderr
        pass
    warnings.warn("`gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # an earlier model load may have quieted transformers
    try:
        hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    finally:
        hf_logging.set_verbosity(verbosity)
    logging.getLogger("sae_lens").warning("a library warning")
    logging.getLogger("irmprobe.organisms").info("organism step 1: {'reward': 0.1}")
    logging.getLogger("irmprobe.capture").warning("an irmprobe warning")
    echo("[capture] done")


def test_library_output_goes_to_the_log_file_and_the_terminal_keeps_irmprobes_lines(tmp_path, capfd):
    log = tmp_path / "runs" / "irmprobe.log"
    stderr_before, handlers_before = sys.stderr, list(logging.getLogger().handlers)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with library_output_to(log):
            _a_run(print)
    out, err = capfd.readouterr()
    terminal = out + err
    assert "[capture] ..." in out and "[capture] done" in out
    assert "capture" in err  # irmprobe's own bar
    assert "an irmprobe warning" in err  # irmprobe's warnings stay visible
    for library_text in ("Loading weights", "gradient_checkpointing", "a transformers warning", "a library warning",
                         "organism step 1"):
        assert library_text not in terminal, library_text
    text = log.read_text()
    for library_text in ("Loading weights", "gradient_checkpointing", "a transformers warning", "a library warning",
                         "organism step 1"):
        assert library_text in text, library_text
    # Everything is restored: a later library bar reaches the terminal again.
    assert sys.stderr is stderr_before and logging.getLogger().handlers == handlers_before
    assert progress.terminal() is sys.stderr


def test_without_a_log_file_nothing_is_redirected(capfd):
    with library_output_to(None):
        for _ in tqdm(range(2), desc="Loading weights"):
            pass
    assert "Loading weights" in capfd.readouterr().err
