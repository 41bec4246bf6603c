#!/usr/bin/env python
"""What bfloat16 would buy on this machine, and what it would cost the per-token log-ratio.

Speed, each against float32 in the same process: a 2048^3 matrix product (GFLOP/s), one forward of
a [32, 64] token batch through the base model, and sampling 64 x 24 tokens with Hugging Face
``generate``. Precision: the per-token log-ratio log p_tuned - log p_base of the first ``--sequences``
held-out samples, in float32, with bfloat16 weights, and under bfloat16 autocast (float32 weights):
Pearson r, RMSE and the float32 spread. Reads the demo's models and samples from the cache, so run
``make demo`` first.

    IRMPROBE_CACHE=... python benchmarks/bf16_tradeoff.py --sequences 96
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.cache import cache_root  # noqa: E402


def _seconds(fn, repeat: int = 3) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def _demo_models() -> tuple[Path, Path, list[list[int]]]:
    root = cache_root()
    base = root / "models" / "smollm2-135m-instruct"
    organisms = sorted(root.glob("organisms/*/organism.json"), key=lambda p: p.stat().st_mtime)
    samples = sorted(root.glob("stages/samples/*/samples.json"), key=lambda p: p.stat().st_mtime)
    if not (base / "config.json").is_file() or not organisms or not samples:
        raise SystemExit(f"no demo models or samples under {root}: run `make demo` first (same IRMPROBE_CACHE)")
    return base, organisms[0].parent, json.loads(samples[0].read_text())["token_ids"]


@torch.no_grad()
def _log_probs(model_dir: Path, sequences, dtype, autocast: bool) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    for seq in sequences:
        ids = torch.tensor([seq])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits[0, :-1]
        out.append(logits.float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=96)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, tuned_dir, samples = _demo_models()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    tok = AutoTokenizer.from_pretrained(base_dir)
    enc = tok(["Write a short note about the weather today and how you feel."] * 64, return_tensors="pt",
              padding=True)
    batch = torch.randint(0, 40000, (32, 64))
    print(f"threads {torch.get_num_threads()}, AMX bf16 {torch.cpu.get_capabilities().get('amx_bf16')}")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        gflops = 2 * 2048**3 / _seconds(lambda: x @ y) / 1e9
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
        with torch.no_grad():
            forward = _seconds(lambda: model(batch), repeat=2)
        torch.manual_seed(0)
        generate = _seconds(lambda: model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=24,
                                                   min_new_tokens=24, pad_token_id=tok.pad_token_id), repeat=1)
        print(f"{str(dtype):15} matmul {gflops:7.0f} GFLOP/s   forward 32x64 {forward:.2f} s   "
              f"generate 64x24 {generate:.2f} s")
    seqs = samples[: args.sequences]
    ref = _log_probs(tuned_dir, seqs, torch.float32, False) - _log_probs(base_dir, seqs, torch.float32, False)
    for name, dtype, autocast in (("bf16 weights", torch.bfloat16, False), ("bf16 autocast", torch.float32, True)):
        lr = _log_probs(tuned_dir, seqs, dtype, autocast) - _log_probs(base_dir, seqs, dtype, autocast)
        print(f"{name:14} log-ratio vs float32 on {len(lr)} tokens: pearson {np.corrcoef(lr, ref)[0, 1]:.4f}, "
              f"RMSE {np.sqrt(np.mean((lr - ref) ** 2)):.3f} nats (float32 spread {ref.std():.3f})")


if __name__ == "__main__":
    main()
