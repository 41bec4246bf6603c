"""Every registry entry's config runs end to end on the tiny stand-in of its architecture family.

The stand-in replaces what cannot be downloaded here: the pair (a tiny random-init model of the entry's
family, with a tokenizer of its kind and a chat template where the real one has one; the tuned model a
perturbed copy), a classifier RM (one trained in the test) and released SAEs (SAELens-format SAEs saved
for the stand-in). Everything else is the entry's own config: precision, LoRA, checkpointing, hook,
chat template, layer choice among released SAEs, under the test's tiny budgets.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from irmprobe.api import run
from irmprobe.config import RunConfig
from irmprobe.models.registry import registry, registry_entry
from tests.integration.test_pipeline import TINY
from tests.integration.test_released_saes import _save_released
from tests.unit.test_families import _family

TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _standin(family: str, directory, tokenizer_dir, *, chat: bool, seed: int = 0):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cls, config, _ = _family(family, len(tok))
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    if chat:
        tok.chat_template = TEMPLATE
    tok.save_pretrained(directory)
    return directory


def _perturbed(src, dst, chat: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shutil.copytree(src, dst)
    model.save_pretrained(dst, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(src)
    if chat:
        tok.chat_template = TEMPLATE
    tok.save_pretrained(dst)
    return dst


# Entries of one family that differ only in the hub id they name share one run; the VADER organism recipes of
# the Llama and GPT-NeoX families are test_pipeline's own end-to-end runs (and the default model's, in
# test_default_model), so they are not run twice.
COVERED = {("llama", "vader"), ("gpt_neox", "vader")}
ENTRIES = sorted({json.dumps({k: v for k, v in e.items() if k not in ("name", "description", "memory")}
                             | {"pair": {k: v for k, v in e["pair"].items() if k not in ("base", "tuned")}}
                             | {"tunes": "tuned" not in e["pair"]}, sort_keys=True): n
                  for n, e in reversed(list(registry().items()))
                  if (e["family"], e.get("reward", {}).get("kind")) not in COVERED}.values())


def test_every_registry_entry_is_run_here_or_by_an_equivalent_test():
    for name, entry in registry().items():
        assert name in ENTRIES or (entry["family"], entry["reward"]["kind"]) in COVERED or any(
            registry()[other]["family"] == entry["family"] and registry()[other]["pair"].keys() == entry["pair"].keys()
            for other in ENTRIES), name


# Families whose registry entries all use a lexicon RM: their stand-in also runs with the classifier RM.
LEXICON_ONLY = sorted({e["family"] for e in registry().values()} - {e["family"] for e in registry().values()
                                                                   if e.get("reward", {}).get("kind") == "classifier"})


@pytest.mark.parametrize("name", ENTRIES + [f"classifier RM on {f}" for f in LEXICON_ONLY])
def test_registry_entry_runs_on_its_standin(name, tiny_tokenizer_dir, tiny_sp_tokenizer_dir, classifier_rm_dir,
                                            tmp_path):
    if name.startswith("classifier RM on "):  # a lexicon-only family, given a tuned copy and the classifier RM
        family = name.rsplit(" ", 1)[1]
        entry, data = {"family": family}, {"pair": {"tuned": "given"}, "organism": {},
                                           "reward": {"kind": "classifier", "label": "0"}}
    else:
        entry = registry()[name]
        family, data = entry["family"], registry_entry(name)
    kind = _family(family, 1)[2]
    tokenizer_dir = {"bpe": tiny_tokenizer_dir, "sp": tiny_sp_tokenizer_dir}[kind]
    chat = data["pair"].get("chat_template", "auto") != False  # noqa: E712 (auto or true: the real models have one)
    # Gemma-2-2B's pretrained base has no template, its IT release has: the tuned tokenizer is asked first.
    base_chat = chat and family != "gemma2"
    base = _standin(family, tmp_path / "base", tokenizer_dir, chat=base_chat)
    pair = {**data["pair"], "base": str(base), "device": "cpu", "dtype": "float32"}
    if "tuned" in data["pair"]:
        pair["tuned"] = str(_perturbed(base, tmp_path / "tuned", chat))
    config = json.loads(json.dumps(TINY))
    for section, values in data.items():
        config[section] = {**config.get(section, {}), **values}
    config["pair"] = pair
    config["organism"] |= {**TINY["organism"], "steps": 1}
    config["samples"] |= TINY["samples"]
    config["capture"] = {**config.get("capture", {}), "batch_size": 16, "top_k_layers": 2}
    config["attribute"] = {"n_prompts": 4, "ig_steps": 2, "n_exact": 2, "k_grid": [1, 5], "n_random": 1}
    config["report"] = {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}
    # Controls are built (and the primary call made) for the 8B recipe (LoRA, bfloat16, checkpointing, a neural RM);
    # elsewhere test_pipeline builds them, and the runs stay short.
    config["compare"] = {**config["compare"], "control": name == "tulu3-8b-sft-dpo"}
    if data.get("reward", {}).get("kind") == "classifier":
        config["reward"] = {**data["reward"], "model": str(classifier_rm_dir), "label": "0", "token_contexts": 8}
    if data.get("sae", {}).get("pretrained"):
        hook = config["capture"].get("hook", "hook_mlp_out")
        config["sae"]["pretrained"] = {b: _save_released(tmp_path / f"sae{b}", hook=f"blocks.{b}.{hook}",
                                                         model=base.name, seed=b) for b in (0, 1)}
    result = run(RunConfig.from_dict(config), echo=lambda _: None)
    m = result.metrics.to_json()
    assert m["rm"]["tokens_with_value"] > 0, name  # a nonempty RM token map on this tokenizer
    assert m["capture"]["prompt_format"] == ("chat_template" if chat else "plain"), name
    assert m["verdict"], name
    if config.get("compare", {}).get("control", True):
        assert m["primary"] and m["primary"].get("outcome"), name
    if data.get("sae", {}).get("pretrained"):
        assert all(r.get("pretrained") for r in m["saes"]) and set(m["layers"]["chosen"]) <= {0, 1}
    if config["compare"]["control"]:
        assert m["control"] and all(c["lora_rank"] == data["organism"]["lora_rank"] for c in m["control"]), name
