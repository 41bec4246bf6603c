"""Chat pairs: prompts as user turns of the tokenizer's chat template, continuations the assistant turn alone."""

import shutil

import pytest
from transformers import AutoTokenizer

from irmprobe.api import run
from irmprobe.config import RunConfig
from irmprobe.prompts import chat_template_used, encode_prompt
from tests.integration.test_pipeline import _config

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}")


@pytest.fixture()
def chat_llama(tiny_llama_dir, tmp_path):
    """The tiny Llama with a chat template."""
    base = tmp_path / "chat-base"
    shutil.copytree(tiny_llama_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    return base


def test_prompts_are_user_turns_and_only_the_assistant_turn_is_read(chat_llama, tmp_path, monkeypatch):
    import irmprobe.organisms.tuning as tuning

    base, datasets = chat_llama, []
    real = tuning._build_trainer
    monkeypatch.setattr(tuning, "_build_trainer", lambda *a, **k: datasets.append(a[-1]) or real(*a, **k))
    lines = []
    config = _config(tmp_path, base=str(base)).to_dict()
    config["attribute"] |= {"n_prompts": 4, "ig_steps": 2, "n_exact": 2, "k_grid": [1, 5], "n_random": 1}
    config["compare"]["control"] = False  # the organism's tuning is what is watched; controls tune the same way
    result = run(RunConfig.from_dict(config), echo=lines.append)  # chat_template: auto
    assert datasets and all(d and all(p.startswith("<|endoftext|>user: ") for p in d) for d in datasets)
    tok = AutoTokenizer.from_pretrained(base)
    opening = tok("<|endoftext|>assistant:", add_special_tokens=False)["input_ids"]
    samples = result.context.resources["runner"].result("samples")
    assert all(p.startswith("<|endoftext|>user: ") and p.endswith("<|endoftext|>assistant:") for p in samples.prompts)
    for ids, n in zip(samples.token_ids, samples.prompt_lens):
        assert list(ids[n - len(opening):n]) == opening  # the continuation starts right after the assistant opening
    assert result.metrics.capture["prompt_format"] == "chat_template"
    assert any(line.startswith("prompts          user turns of the chat template") for line in lines)
    assert result.metrics.verdict  # the run ends with its verdict
    plain = run(_config(tmp_path, base=str(base), chat_template=False), echo=lambda _: None, until="samples")
    assert not plain.context.resources["runner"].result("samples").prompts[0].startswith("<|endoftext|>")


def test_a_chat_template_asked_for_and_missing_is_refused_before_any_stage(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="has no chat template"):
        run(_config(tmp_path, base=str(tiny_llama_dir), chat_template=True), echo=lambda _: None)
    assert not (tmp_path / "cache" / "stages").exists()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert chat_template_used("auto", tok) is False and chat_template_used(False, tok) is False


def test_a_template_that_writes_the_bos_token_does_not_double_it(tiny_sp_tokenizer_dir):
    from irmprobe.organisms.tuning import without_bos_text
    from irmprobe.prompts import as_user_turns

    tok = AutoTokenizer.from_pretrained(tiny_sp_tokenizer_dir)  # adds <s> itself, like Llama
    text = as_user_turns(tok, ["How was the day?"], "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]")[0]
    assert text.startswith("<s>[INST]")
    ids = encode_prompt(tok, text)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # TRL tunes on conversations and tokenises them with apply_chat_template: the same ids as the sampling stages.
    assert tok.apply_chat_template([{"role": "user", "content": "How was the day?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False,
                                   chat_template="{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]") == ids
    assert without_bos_text(tok, [text])[0].startswith("[INST]")  # DPO's plain prompts: <s> left to the tokenizer
    assert encode_prompt(tok, "How was the day?")[0] == tok.bos_token_id  # a plain prompt gets its <s>
