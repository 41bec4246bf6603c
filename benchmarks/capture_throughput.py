#!/usr/bin/env python
"""Paired capture throughput against two bare Hugging Face forwards, and peak memory while capturing.

Capture is paired: every token goes through the base and the tuned model (TransformerLens bridges,
hooks at the chosen layers, full depth for the per-token log-probabilities). Prints two ratios,
each against a baseline run in this same process on the same tokens:

1. paired-capture tokens/s divided by the tokens/s of two bare HF forwards, one per model, on
   fresh copies that no bridge has wrapped (target >= 0.95);
2. peak RSS while capturing N tokens into the sharded store divided by the peak while capturing
   N/4 tokens (bounded: near 1, not growing with tokens). Peaks come from a thread sampling
   /proc/self/statm every few milliseconds, one window per phase; the process's lifetime peak
   (``getrusage`` ``ru_maxrss``) is printed as a check.

Without ``--tuned`` the tuned model is a second copy of the base, loaded separately, so both
forwards really run (a pair whose tuned model is the base object would run one).

    python benchmarks/capture_throughput.py                  # the default SmolLM2 base, twice
    python benchmarks/capture_throughput.py --model DIR --tuned DIR2 --tokens 200000 --layers 1 9 27
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.activations.capture import capture_pair  # noqa: E402
from irmprobe.activations.store import capture_to_store  # noqa: E402
from irmprobe.models.loading import DEFAULT_BASE, ModelPair, load_model  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _max_rss_mb() -> float:
    """The process's lifetime peak RSS (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Within the block, a thread samples RSS every ``interval`` seconds; ``peak`` is the largest (MB)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _sequences(vocab: int, n_tokens: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(max(1, n_tokens // length))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_BASE, help="model spec (default: the bundled SmolLM2)")
    parser.add_argument("--tuned", default=None, help="tuned model spec (default: a second copy of --model)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 9, 27])
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--speed-tokens", type=int, default=8192, help="tokens for the throughput ratio")
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens captured for the memory ratio")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    tuned_spec = args.tuned or args.model
    base, tokenizer = load_model(args.model, device=args.device)
    tuned, _ = load_model(tuned_spec, device=args.device)  # a separate object even for the same spec
    pair = ModelPair(base, tuned, tokenizer, args.model, tuned_spec)
    if pair.is_null:
        raise RuntimeError("the pair is null: capture would run one model, not two")
    # The baseline runs fresh copies: building the capture's bridges rewires the pair's modules in place.
    bare = [load_model(spec, device=args.device)[0] for spec in (args.model, tuned_spec)]
    seqs = _sequences(pair.base.config.vocab_size, args.speed_tokens, args.length, seed=0)
    tokens = torch.tensor(seqs, device=args.device)
    layers = tuple(args.layers)

    def hf() -> None:
        with torch.no_grad():
            for start in range(0, len(tokens), args.batch_size):
                for model in bare:  # base and tuned, on the same batch, as the capture does
                    model(tokens[start : start + args.batch_size])

    def capture() -> None:
        capture_pair(pair, seqs, layers, batch_size=args.batch_size)

    timings = {}
    for name, fn in (("hf", hf), ("capture", capture), ("hf", hf), ("capture", capture)):  # warm, then measure
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
    n_tok = len(seqs) * args.length
    hf_tps, cap_tps = n_tok / timings["hf"], n_tok / timings["capture"]
    print(f"models: base {args.model}, tuned {tuned_spec}{' (second copy)' if args.tuned is None else ''}; "
          f"{n_tok:,} tokens, batch {args.batch_size}, device {args.device}")
    print(f"two bare HF forwards (base + tuned): {hf_tps:,.0f} tokens/s; paired capture (hooks at {list(layers)} "
          f"+ log-probs, both models): {cap_tps:,.0f} tokens/s")
    print(f"paired capture / two HF forwards throughput ratio: {cap_tps / hf_tps:.3f} (target >= 0.95)")
    bare.clear()  # frees the baseline copies before the memory measurement (hf() is not called again)

    work = Path(tempfile.mkdtemp(prefix="irmprobe-bench-"))
    try:
        big = _sequences(pair.base.config.vocab_size, args.tokens, args.length, seed=1)
        quarter = len(big) // 4
        before = _rss_mb()
        with PeakRSS() as peak_quarter:
            capture_to_store(pair, big[:quarter], layers, work / "quarter", batch_size=args.batch_size)
        with PeakRSS() as peak_full:
            capture_to_store(pair, big, layers, work / "full", batch_size=args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"RSS before capturing: {before:,.0f} MB; peak while capturing {quarter * args.length:,} tokens: "
          f"{peak_quarter.peak:,.0f} MB; peak while capturing {len(big) * args.length:,}: {peak_full.peak:,.0f} MB "
          f"(process lifetime peak, ru_maxrss: {_max_rss_mb():,.0f} MB)")
    print(f"peak RSS growth ratio (full / quarter): {peak_full.peak / peak_quarter.peak:.3f}; above the RSS before "
          f"capturing: {peak_quarter.peak - before:,.0f} MB vs {peak_full.peak - before:,.0f} MB (bounded: near 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
