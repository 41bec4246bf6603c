"""The capture stage: hook activations and log-probabilities of both models over the samples."""

from __future__ import annotations

import hashlib
from pathlib import Path

from irmprobe.activations.capture import Capture, extra_texts
from irmprobe.activations.store import capture_to_store, load_store
from irmprobe.pipeline.stage import Stage


class CaptureStage(Stage):
    name, version, resumable = "capture", 5, True
    reads = ("capture.hook", "capture.batch_size", "capture.text_path", "capture.text_dataset", "capture.text_column",
             "capture.max_text_tokens", "capture.max_texts", "pair.dtype")
    needs = ("organism", "samples", "layers")
    measured_only_ignores = ("capture.hook",)  # a measured-only control captures log-probabilities, no activation

    def fingerprint(self, cfg, ctx):
        path = cfg.capture.text_path
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None

    def run(self, cfg, ctx, inputs, out):
        pair = ctx.pair_of(inputs["organism"])
        stream = list(inputs["samples"].token_ids) + extra_texts(cfg.capture, pair.tokenizer)
        capture_to_store(pair, stream, inputs["layers"].chosen, out, hook=cfg.capture.hook,
                         batch_size=cfg.capture.batch_size)
        return load_store(out)

    def load(self, cfg, ctx, inputs, out):
        return load_store(out)

    def summary(self, result: Capture):
        if not result.layers:
            return f"{len(result.token_ids)} token rows: log-probabilities only, no block captured"
        return f"{len(result.token_ids)} token rows at {', '.join(result.hook_name(b) for b in result.layers)}"
