"""Reports: the summary lines on stdout, the metrics JSON and HTML page, figures, and the W&B run.

:mod:`.tracking` is the only module that imports wandb. W&B runs offline unless the user configured it
online (``report.wandb_mode: online`` or ``WANDB_MODE=online``); no API key is ever written.
"""
