"""The pre-flight memory plan: exact parameter counts from configs, and the verdict on an 8B pair."""

import pytest

from irmprobe.config import RunConfig
from irmprobe.models.memory import GIB, model_shape, plan


def _llama_8b(classifier=False):
    from transformers import LlamaConfig

    # Llama-3.1-8B's published shape.
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       tie_word_embeddings=False, num_labels=1)


def _config(**organism):
    return RunConfig.from_dict({
        "pair": {"base": "/models/llama-3.1-8b-sft", "tuned": "/models/llama-3.1-8b-dpo", "device": "cuda",
                 "dtype": "bfloat16"},
        "reward": {"kind": "classifier", "model": "/models/llama-3.1-8b-rm", "label": "0"},
        "organism": {"prompts_per_step": 2, "generations_per_prompt": 4, "max_new_tokens": 128, **organism},
        "samples": {"max_new_tokens": 128}, "capture": {"batch_size": 4},
    })


def test_an_8b_pair_with_an_8b_rm_and_a_lora_bf16_control_fits_one_80gb_gpu():
    shape = model_shape(_llama_8b())
    assert shape.params == pytest.approx(8.03e9, rel=0.005)  # counted on the meta device, nothing loaded
    rm = model_shape(_llama_8b(), classifier=True)
    assert rm.params == pytest.approx(shape.params - 128256 * 4096 + 4096, rel=1e-6)  # a score head, no lm_head
    shapes = dict(base=shape, tuned=shape, rm=rm, capacity=80 * 10**9)
    lora = plan(_config(lora_rank=16, precision="bfloat16", gradient_checkpointing=True), **shapes)
    assert lora.fits, lora.lines()
    tuning = lora.phases[0]
    assert tuning.items["reference model"] == 0  # LoRA: the reference is the adapter-disabled policy
    assert tuning.items["policy weights"] == shape.params * 2
    full = plan(_config(lora_rank=0, precision="float32"), **shapes)
    assert not full.fits
    short = (full.peak.total - full.capacity) / GIB
    assert short > 100  # fp32 weights, gradients, AdamW and a reference: about 16 bytes a parameter and more
    assert f"does NOT fit (short by {short:.1f} GiB)" in "\n".join(full.lines())


def test_a_plan_that_does_not_fit_is_refused_before_any_stage(tiny_llama_dir, tmp_path, monkeypatch):
    import irmprobe.models.memory as memory
    from irmprobe.api import run

    monkeypatch.setattr(memory, "device_capacity", lambda device, device_map=None: 10**6)  # a 1 MB device
    cfg = RunConfig.from_dict({"pair": {"base": str(tiny_llama_dir)},
                               "organism": {"steps": 1, "prompts_per_step": 2, "generations_per_prompt": 2,
                                            "max_new_tokens": 4},
                               "report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}})
    with pytest.raises(ValueError, match=r"will not fit in memory:(.|\n)*tuning(.|\n)*does NOT fit"):
        run(cfg, echo=lambda _: None)
    assert not (tmp_path / "cache" / "stages").exists()
    off = RunConfig.from_dict({**cfg.to_dict(), "pair": {"base": str(tiny_llama_dir), "memory_check": False}})
    assert run(off, echo=lambda _: None, until="organism").stage_status["organism"] == "ran"
