#!/usr/bin/env python
"""Check irmprobe's GPU path end to end on tiny random models (no download, a few seconds).

Builds a tiny Llama-style model and tokenizer in a temp dir, runs every stage of the pipeline
with ``pair.device=cuda`` (organism with TRL, sampling, capture, SAEs, IRM, comparison), and checks
that the capture on the GPU matches the same capture on the CPU.

    python scripts/check_cuda.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device to check (default: cuda)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device is visible to torch", file=sys.stderr)
        return 1

    from transformers import LlamaConfig, LlamaForCausalLM

    from irmprobe.activations.capture import capture_pair
    from irmprobe.api import run
    from irmprobe.config import RunConfig
    from irmprobe.models.loading import load_pair
    from tests.conftest import _build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="irmprobe-cuda-"))
    os.environ["IRMPROBE_CACHE"] = str(work / "cache")
    tok = _build_tokenizer(work / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")

    seqs = [[5, 9, 17, 33, 2, 8, 40], [7, 3, 11], [12, 13, 14, 15, 16]]
    caps = {d: capture_pair(load_pair(str(work / "model"), None, device=d), seqs, (1, 3)) for d in ("cpu", args.device)}
    gap = max(float(np.abs(caps["cpu"].acts[k] - caps[args.device].acts[k]).max()) for k in caps["cpu"].acts)
    logp_gap = float(np.abs(caps["cpu"].logp_base - caps[args.device].logp_base).max())
    print(f"capture {args.device} vs cpu: max |activation diff| {gap:.2e}, max |log-prob diff| {logp_gap:.2e}")

    config = RunConfig.from_dict({
        "pair": {"base": str(work / "model"), "device": args.device},
        "prompts": {"n_heldout": 16},
        "organism": {"steps": 4, "prompts_per_step": 2, "generations_per_prompt": 4, "max_new_tokens": 8,
                     "learning_rate": 1e-3},
        "samples": {"samples_per_prompt": 4, "max_new_tokens": 16},
        "capture": {"top_k_layers": 2},
        "sae": {"expansion": 2, "training_samples": 20_000, "batch_size": 256},
        "irm": {"min_token_count": 1, "n_shuffles": 2},
        "report": {"out_dir": str(work / "runs"), "wandb_mode": "disabled"},
    })
    start = time.perf_counter()
    result = run(config, echo=lambda line: None)
    m = result.metrics.to_json()
    sae_device = {r["path"]: json.loads((Path(r["path"]) / "cfg.json").read_text()).get("device") for r in m["saes"]}
    print(f"pipeline on {args.device}: {time.perf_counter() - start:.1f} s; stage seconds {m['stage_seconds']}")
    print(f"organism KL {m['kl']['mean']:.3f}; SAE devices {set(sae_device.values())}; "
          f"agreement rows {[(r['name'], r['tau']) for r in m['agreement']]}")
    ok = gap < 1e-3 and logp_gap < 1e-3 and m["kl"]["mean"] != 0.0
    print("CUDA path OK" if ok else "CUDA path MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
