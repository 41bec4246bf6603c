import pytest
from transformers import AutoTokenizer

from irmprobe.rewards import LexiconRM


def test_vader_reward_is_sum_over_words_scaled_and_clipped():
    rm = LexiconRM.vader()
    lex = rm.lexicon
    # love 3.2, great 3.1 in VADER; "movie" and "this" carry no value.
    assert lex["love"] == pytest.approx(3.2) and lex["great"] == pytest.approx(3.1)
    assert rm.score_text("I love this great movie") == pytest.approx((3.2 + 3.1) / 5)
    assert rm.score_text("Terrible, AWFUL!") == pytest.approx((lex["terrible"] + lex["awful"]) / 5)
    assert rm.score_text("a table and a chair") == 0.0
    assert rm.score_text(" ".join(["love"] * 40)) == pytest.approx(10.0)  # 40*3.2/5 = 25.6 -> clipped
    assert rm.score_text(" ".join(["hate"] * 40)) == pytest.approx(-10.0)


def test_reward_function_matches_trl_signature():
    rm = LexiconRM({"good": 2.0, "bad": -1.0}, scale=1.0)
    fn = rm.reward_function()
    assert fn(completions=["good good", "bad"], prompts=["x", "y"]) == [4.0, -1.0]
    assert fn(completions=[[{"role": "assistant", "content": "good"}]]) == [2.0]
    assert fn.__name__ == "lexicon_reward"


def test_token_values_cover_words_with_and_without_leading_space(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rm = LexiconRM.vader()
    values = rm.token_values(tok)
    love = tok.convert_tokens_to_ids("Ġlove")
    bad = tok.convert_tokens_to_ids("Ġbad")
    assert values[love] == pytest.approx(3.2)
    assert values[bad] == pytest.approx(rm.lexicon["bad"])
    bare = tok.convert_tokens_to_ids("love")
    if bare != tok.unk_token_id and bare is not None:
        assert values[bare] == pytest.approx(3.2)
    # A neutral word has no value; special tokens never do.
    assert tok.convert_tokens_to_ids("Ġthe") not in values
    assert tok.eos_token_id not in values


def test_bad_lexicon_raises():
    with pytest.raises(ValueError, match="at least one word"):
        LexiconRM({})
    with pytest.raises(ValueError, match="positive"):
        LexiconRM({"a": 1.0}, scale=0)
