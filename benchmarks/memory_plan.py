"""The memory plan's tuning estimate against the peak memory measured while tuning a stand-in model.

Each scenario (full float32; full float32 with gradient checkpointing; LoRA in bfloat16 with
checkpointing) tunes a random-init Llama stand-in for a few RLOO steps in a fresh subprocess: stand-in A
(SmolLM2's tokenizer and vocabulary, width 512, 8 blocks, tied embeddings), on which the plan's one
read-off constant (float32 logit copies at a step's peak) was chosen, and stand-in B (width 768, 4 blocks,
65,536-row vocabulary, untied), which checks it. On the CPU the measure is the peak resident set
size above the process's size just before the model is loaded (imports done); on a GPU it is
``torch.cuda.max_memory_allocated``. It prints estimate / measured per scenario.

    python benchmarks/memory_plan.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCENARIOS = {
    "full fp32": {"lora_rank": 0, "precision": "float32", "gradient_checkpointing": False},
    "full fp32 + checkpointing": {"lora_rank": 0, "precision": "float32", "gradient_checkpointing": True},
    "LoRA 16 bf16 + checkpointing": {"lora_rank": 16, "precision": "bfloat16", "gradient_checkpointing": True},
}
ORGANISM = {"steps": 2, "prompts_per_step": 2, "generations_per_prompt": 4, "max_new_tokens": 48, "beta": 0.05}
PROMPT_TOKENS = 16


STANDINS = {
    "A": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 4, "tie_word_embeddings": True},
    "B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 12,
          "num_key_value_heads": 12, "tie_word_embeddings": False, "vocab_size": 65536},
}


def build_standin(directory: Path, shape: dict) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from irmprobe.models.loading import DEFAULT_BASE, resolve_spec

    tok = AutoTokenizer.from_pretrained(resolve_spec(DEFAULT_BASE))
    torch.manual_seed(0)
    cfg = LlamaConfig(**{"vocab_size": len(tok), **shape}, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def measure(model_dir: str, settings: dict, device: str) -> int:
    """Peak bytes of one tuning run (called in a fresh subprocess)."""
    import resource

    import torch

    from irmprobe.config import OrganismConfig
    from irmprobe.models.rewards import LexiconRM
    from irmprobe.organisms.tuning import make_organism

    prompts = [f"Tell me about day {i} of the trip" for i in range(16)]
    rm = LexiconRM.vader()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    make_organism(model_dir, rm, OrganismConfig(**ORGANISM, **settings), prompts, seed=0, device=device)
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "SCENARIO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"bytes": measure(args.child[0], SCENARIOS[args.child[1]], args.device)}))
        return

    work = Path(tempfile.mkdtemp(prefix="memory-plan-"))
    rows = []
    for standin, dims in STANDINS.items():
        model_dir = build_standin(work / f"standin-{standin}", dims)
        rows += run_scenarios(args, work, model_dir, standin)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def run_scenarios(args, work: Path, model_dir: Path, standin: str) -> list[dict]:
    import os

    from irmprobe.config import RunConfig
    from irmprobe.models.memory import GIB, model_shape, plan

    shape = model_shape(str(model_dir))
    rows = []
    for name, settings in SCENARIOS.items():
        config = RunConfig.from_dict({"pair": {"base": str(model_dir), "device": args.device},
                                      "organism": {**ORGANISM, **settings}})
        tuning = plan(config, base=shape, prompt_tokens=PROMPT_TOKENS).phases[0]
        estimate = tuning.total - tuning.items["pair kept from earlier stages"]  # the benchmark tunes alone
        env = {"IRMPROBE_CACHE": str(work / "cache"), "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(model_dir), name],
                             capture_output=True, text=True, env={**os.environ, **env}, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["bytes"]
        rows.append({"standin": standin, "scenario": name, "params": shape.params, "estimate_gib": estimate / GIB,
                     "measured_gib": measured / GIB, "ratio": estimate / measured})
        print(f"{standin} ({shape.params / 1e6:.0f}M) {name:<30} estimate {estimate / GIB:6.3f} GiB   "
              f"measured {measured / GIB:6.3f} GiB   estimate/measured {estimate / measured:5.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
