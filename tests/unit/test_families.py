"""Hook points per architecture family: capture (the TransformerLens bridge), patching and ablation (plain
forward hooks on the Hugging Face module) and the SAE splice (a bridge hook) act on one and the same tensor.

Each family is a tiny random-init model built from its own config class (two blocks, width 32) with a
tokenizer of its kind: byte-level BPE for GPT-2, GPT-Neo, GPT-NeoX and Qwen2, SentencePiece for Llama and
Gemma-2.
"""

import pytest
import torch
from transformers import AutoTokenizer

from irmprobe.activations.capture import hook_module
from irmprobe.models.loading import load_model, load_pair

HOOKS = ("hook_mlp_out", "hook_attn_out", "hook_resid_post")


def _family(name: str, vocab: int):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoConfig,
        GPTNeoForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0), "bpe"),
        "gpt_neo": (GPTNeoForCausalLM, GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                                                    attention_types=[[["global", "local"], 1]], window_size=4,
                                                    max_position_embeddings=128, bos_token_id=0, eos_token_id=0),
                    "bpe"),
        "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig(**small, rotary_pct=0.25), "bpe"),
        "llama": (LlamaForCausalLM, LlamaConfig(**small, num_key_value_heads=2), "sp"),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**small, num_key_value_heads=2), "bpe"),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config(**small, num_key_value_heads=2, head_dim=8), "sp"),
    }[name]


FAMILIES = ("gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2", "gemma2")


@pytest.fixture(scope="module")
def family_dirs(tiny_tokenizer_dir, tiny_sp_tokenizer_dir, tmp_path_factory):
    """family -> directory of a tiny random-init model of that family, saved with a tokenizer of its kind."""
    out = {}
    for name in FAMILIES:
        tokenizer_dir = {"bpe": tiny_tokenizer_dir, "sp": tiny_sp_tokenizer_dir}[_family(name, 1)[2]]
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        cls, config, _ = _family(name, len(tok))
        torch.manual_seed(0)
        model = cls(config).eval()
        with torch.no_grad():  # non-zero norms and biases, so a wrong tensor cannot pass by being equal to another
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, safe_serialization=True)
        tok.save_pretrained(directory)
        out[name] = directory
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_patch_and_splice_points_are_one_tensor(family, family_dirs):
    directory = family_dirs[family]
    pair = load_pair(str(directory), None)
    bridge = pair.bridge("base")
    plain, tok = load_model(str(directory))  # a model no bridge has rewired: what patching and ablation hook
    ids = torch.tensor([tok("I think the movie was good and the day was great")["input_ids"]])
    assert ids.shape[1] >= 6
    names = [f"blocks.{b}.{h}" for b in (0, 1) for h in HOOKS]
    _, cache = bridge.run_with_cache(ids, names_filter=names)
    for name in names:
        seen = {}
        handle = hook_module(plain, name).register_forward_hook(
            lambda m, i, o: seen.__setitem__("x", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            clean = plain(ids).logits
        handle.remove()
        assert torch.allclose(seen["x"], cache[name], atol=1e-5), (family, name)  # capture = patch point
        # Splice (bridge hook) and patch (module hook) write the same change at the same place: same logits.
        shift = 0.5 * torch.randn(cache[name].shape[-1], generator=torch.Generator().manual_seed(1))
        spliced = bridge.run_with_hooks(ids, fwd_hooks=[(name, lambda act, hook: act + shift)])
        handle = hook_module(plain, name).register_forward_hook(
            lambda m, i, o: (o[0] + shift, *o[1:]) if isinstance(o, tuple) else o + shift)
        with torch.no_grad():
            patched = plain(ids).logits
        handle.remove()
        assert (patched - clean).abs().max() > 1e-3, (family, name)  # the change reaches the logits
        assert torch.allclose(spliced, patched, atol=1e-4), (family, name)  # splice point = patch point


def test_gemma2s_mlp_out_is_the_normalised_output_it_adds_to_the_stream(family_dirs):
    """Gemma-2 normalises the MLP's output before adding it: the hook point is that norm's output, not .mlp's."""
    plain, _ = load_model(str(family_dirs["gemma2"]))
    block = plain.model.layers[1]
    assert hook_module(plain, "blocks.1.hook_mlp_out") is block.post_feedforward_layernorm
    assert hook_module(plain, "blocks.1.hook_attn_out") is block.post_attention_layernorm
    llama, _ = load_model(str(family_dirs["llama"]))  # Llama's post_attention_layernorm is the norm *before* its MLP
    assert hook_module(llama, "blocks.1.hook_attn_out") is llama.model.layers[1].self_attn
    assert hook_module(llama, "blocks.1.hook_mlp_out") is llama.model.layers[1].mlp


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_yields_word_tokens_and_an_rm_map(family, family_dirs):
    from irmprobe.models.rewards import LexiconRM
    from irmprobe.models.tokens import word_pieces

    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    assert len(word_pieces(tok).starts) > 50
    assert len(LexiconRM.vader().token_values(tok)) >= 20
