#!/usr/bin/env python
"""Capture throughput against a bare Hugging Face forward, and memory while capturing.

Prints two ratios, each measured against a baseline run in this same process on the same tokens:

1. capture tokens/s (TransformerLens bridge, hooks at the chosen layers, full depth for the
   per-token log-probabilities) divided by a bare HF forward of the same model (target >= 0.95);
2. RSS after capturing N tokens into the sharded store divided by RSS after N/4 tokens
   (bounded: near 1, not growing with tokens).

    python benchmarks/capture_throughput.py                  # the default SmolLM2 base
    python benchmarks/capture_throughput.py --model DIR --tokens 200000 --layers 1 9 27
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.capture import capture_pair, capture_to_store  # noqa: E402
from irmprobe.pairs import DEFAULT_BASE, load_pair  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _sequences(vocab: int, n_tokens: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(max(1, n_tokens // length))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_BASE, help="model spec (default: the bundled SmolLM2)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 9, 27])
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--speed-tokens", type=int, default=8192, help="tokens for the throughput ratio")
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens captured for the memory ratio")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    pair = load_pair(args.model, None, device=args.device)
    seqs = _sequences(pair.base.config.vocab_size, args.speed_tokens, args.length, seed=0)
    tokens = torch.tensor(seqs, device=args.device)
    layers = tuple(args.layers)

    def hf() -> None:
        with torch.no_grad():
            for start in range(0, len(tokens), args.batch_size):
                pair.base(tokens[start : start + args.batch_size])

    def capture() -> None:
        capture_pair(pair, seqs, layers, batch_size=args.batch_size)

    timings = {}
    for name, fn in (("hf", hf), ("capture", capture), ("hf", hf), ("capture", capture)):  # warm, then measure
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
    n_tok = len(seqs) * args.length
    hf_tps, cap_tps = n_tok / timings["hf"], n_tok / timings["capture"]
    print(f"bare HF forward: {hf_tps:,.0f} tokens/s; capture (hooks at {list(layers)} + log-probs): {cap_tps:,.0f} tokens/s")
    print(f"capture / HF throughput ratio: {cap_tps / hf_tps:.3f} (target >= 0.95)")

    work = Path(tempfile.mkdtemp(prefix="irmprobe-bench-"))
    try:
        big = _sequences(pair.base.config.vocab_size, args.tokens, args.length, seed=1)
        quarter = len(big) // 4
        capture_to_store(pair, big[:quarter], layers, work / "quarter", batch_size=args.batch_size)
        rss_quarter = _rss_mb()
        capture_to_store(pair, big, layers, work / "full", batch_size=args.batch_size)
        rss_full = _rss_mb()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"RSS after {quarter * args.length:,} tokens: {rss_quarter:,.0f} MB; after {len(big) * args.length:,}: "
          f"{rss_full:,.0f} MB")
    print(f"RSS growth ratio (full / quarter): {rss_full / rss_quarter:.3f} (bounded: near 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
