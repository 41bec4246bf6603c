"""The memory plan of each published pair in the registry, from the models' published shapes.

The hub is not reachable here, so each model's config is written out from its published shape
(hidden size, blocks, heads, vocabulary, tied embeddings); parameters are then counted exactly on the
meta device by ``irmprobe.models.memory``. Prints, per registry entry, the tuning and analysis phases and
whether the peak fits the device the entry is planned for, and for the 8B pair the same plan with a full
float32 control (the one that does not fit).

    python benchmarks/pair_plans.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def published_configs() -> dict:
    from transformers import DebertaV2Config, Gemma2Config, LlamaConfig, Qwen2Config

    return {
        "allenai/Llama-3.1-Tulu-3-8B-SFT": LlamaConfig(
            vocab_size=128264, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
        "allenai/Llama-3.1-Tulu-3-8B-RM": LlamaConfig(
            vocab_size=128264, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, num_labels=1),
        "google/gemma-2-2b": Gemma2Config(
            vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256),
        "Qwen/Qwen2.5-0.5B": Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
        "OpenAssistant/reward-model-deberta-v3-large-v2": DebertaV2Config(
            vocab_size=128100, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, num_labels=1),
    }


CAPACITY = {"tulu3-8b-sft-dpo": 80e9, "gemma-2-2b-pt-it": 24e9, "qwen2.5-0.5b-base-instruct": 24e9}
"""Bytes of the device each entry is planned for (its ``memory`` line in the registry)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the plans here")
    args = ap.parse_args()

    from irmprobe.config import RunConfig
    from irmprobe.models.memory import GIB, model_shape, plan
    from irmprobe.models.registry import registry, registry_entry

    configs = published_configs()
    out = []
    for name, capacity in CAPACITY.items():
        data = registry_entry(name)
        base = configs.get(data["pair"]["base"])
        rm_spec = data["reward"].get("model")
        shapes = {"base": model_shape(base), "rm": model_shape(configs[rm_spec], classifier=True)}
        shapes["tuned"] = shapes["base"]  # each tuned release has its base's shape
        variants = {"as registered": data}
        if name == "tulu3-8b-sft-dpo":
            full = json.loads(json.dumps(data))
            full["organism"] |= {"lora_rank": 0, "precision": "float32", "gradient_checkpointing": False}
            variants["full float32 control"] = full
        for label, variant in variants.items():
            p = plan(RunConfig.from_dict(variant), capacity=int(capacity), **shapes)
            print(f"== {name} ({registry()[name]['memory']}), {label}: {shapes['base'].params / 1e9:.2f}B params, "
                  f"RM {shapes['rm'].params / 1e9:.2f}B")
            for line in p.lines():
                print("  " + line)
            out.append({"entry": name, "variant": label, "capacity_gib": capacity / GIB, "fits": p.fits,
                        "peak_gib": p.peak.total / GIB, "phases": {ph.name: {k: v / GIB for k, v in ph.items.items()}
                                                                   for ph in p.phases}})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
