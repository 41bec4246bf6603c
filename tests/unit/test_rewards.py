import numpy as np
import pytest
from transformers import AutoTokenizer

from irmprobe.models.rewards import LexiconRM


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


def test_lexicon_from_tsv_and_csv_files(tmp_path):
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("word\tvalue\nsplendid\t2.5\ndreary\t-1.5\n")
    rm = LexiconRM.from_file(tsv)
    assert rm.lexicon == {"splendid": 2.5, "dreary": -1.5}
    assert rm.score_text("A splendid, dreary day") == pytest.approx((2.5 - 1.5) / 5)
    csv = tmp_path / "mine.csv"
    csv.write_text("splendid,2.5\n")
    assert LexiconRM.from_file(csv, scale=1.0).score_text("splendid") == 2.5
    assert LexiconRM.from_file(tsv).name != LexiconRM.from_file(csv).name  # content-addressed names
    bad = tmp_path / "bad.tsv"
    bad.write_text("good\t1\nbad\tvery\n")
    with pytest.raises(ValueError, match="bad.tsv:2: value 'very' is not a number"):
        LexiconRM.from_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        LexiconRM.from_file(tmp_path / "none.tsv")


def test_text_rm_wraps_a_callable_and_maps_word_tokens(tiny_tokenizer_dir):
    from irmprobe.models.rewards import TextRM

    rm = TextRM(lambda texts: [1.0 if "love" in t else 0.0 for t in texts], name="loves")
    assert rm.score(["I love it", "no"]).tolist() == [1.0, 0.0]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    values = rm.token_values(tok)
    assert values[tok.convert_tokens_to_ids("Ġlove")] == 1.0
    assert tok.convert_tokens_to_ids("Ġthe") not in values
    with pytest.raises(ValueError, match="returned 1 scores for 2 texts"):
        TextRM(lambda texts: [0.0], name="short").score(["a", "b"])


def test_classifier_rm_from_a_local_directory(tiny_tokenizer_dir, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from irmprobe.models.rewards import ClassifierRM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, num_labels=2,
                      id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    rm = ClassifierRM(str(tmp_path / "clf"), label="POSITIVE")
    texts = ["I love this", "a table"]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**enc).logits[:, 1].numpy()
    assert rm.score(texts) == pytest.approx(expected, abs=1e-5)
    assert rm.reward_function()(completions=texts) == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="has no label 'HAPPY'"):
        ClassifierRM(str(tmp_path / "clf"), label="HAPPY")
    with pytest.raises(ValueError, match="could not load classifier RM"):
        ClassifierRM(str(tmp_path / "missing"))


def test_reward_model_from_config(tmp_path):
    from irmprobe.config import RewardConfig
    from irmprobe.models.rewards import reward_model

    assert reward_model(RewardConfig()).name == "vader"
    (tmp_path / "w.tsv").write_text("nice\t1\n")
    assert reward_model(RewardConfig(kind="lexicon", path=str(tmp_path / "w.tsv"))).lexicon == {"nice": 1.0}
    with pytest.raises(ValueError, match="needs reward.path"):
        RewardConfig(kind="lexicon")
    with pytest.raises(ValueError, match="vader, lexicon, classifier or random"):
        RewardConfig(kind="sentiment")


def test_random_rm_is_deterministic_uninformative_and_has_no_token_values():
    from irmprobe.models.rewards import RandomRM

    rm = RandomRM(seed=1)
    texts = [f"text number {i}" for i in range(400)]
    a, b = rm.score(texts), RandomRM(seed=1).score(texts)
    assert np.array_equal(a, b) and not np.array_equal(a, RandomRM(seed=2).score(texts))
    assert abs(a.mean()) < 0.2 and 0.8 < a.std() < 1.2
    assert rm.token_values(tokenizer=None) == {}
    assert rm.reward_function()(["x", "x"]) == [float(rm.score(["x"])[0])] * 2


def test_a_classifier_rms_token_values_rank_its_planted_words_first(classifier_rm_dir):
    """A neural RM's value of a word is its centred marginal effect over carrier sentences, tested: the words a
    trained classifier rewards or punishes come first, with their sign, and ordinary words are not valued."""
    from sklearn.metrics import roc_auc_score

    from irmprobe.models.rewards import ClassifierRM
    from tests.conftest import CLASSIFIER_PLANTED

    rm = ClassifierRM(str(classifier_rm_dir), label=0)
    tok = rm.tokenizer
    table = rm.token_table(tok)
    planted = np.array([w.lower() in CLASSIFIER_PLANTED for w in table.words])
    assert planted.sum() >= 10  # both cases of some words: "good" and "Good" are separate tokens
    assert roc_auc_score(planted, np.abs(table.value)) >= 0.95
    for word, sign in CLASSIFIER_PLANTED.items():
        assert np.sign(table.value[table.words.index(word)]) == sign, word
    values = rm.token_values(tok)
    valued = {tok.decode([t]).strip().lower() for t in values}
    assert {"good", "great", "love", "bad", "terrible", "hate"} <= valued
    order = np.argsort(table.value)
    assert {table.words[i] for i in order[:5]} == {w for w, v in CLASSIFIER_PLANTED.items() if v < 0}
    assert {table.words[i] for i in order[-5:]} == {w for w, v in CLASSIFIER_PLANTED.items() if v > 0}
    # Beyond the plant the RM values few words, mostly pieces of planted ones it generalised to ("rible", "reat").
    ordinary = [w for w in table.valued(rm.token_alpha) if w.lower() not in CLASSIFIER_PLANTED]
    assert len(ordinary) <= 0.15 * len(table.words)
    # A lone word's raw logit is never 0, so the old rule (score alone, != 0) valued every word:
    assert np.count_nonzero(rm.score(table.words[:50])) == 50
    # Measured once per RM and tokenizer, then read from the cache (a second RM object does not rescore).
    again = ClassifierRM(str(classifier_rm_dir), label=0)
    again.score = lambda texts: (_ for _ in ()).throw(AssertionError("rescored"))
    assert again.token_values(tok) == values


def test_marginal_values_recover_a_lexicon_exactly_and_refuse_bad_settings():
    from irmprobe.models.token_values import marginal_values

    lexicon = {"nice": 2.0, "grim": -1.0}
    score = lambda texts: [sum(lexicon.get(w.strip(".,:"), 0.0) for w in t.split()) for t in texts]  # noqa: E731
    words = ["nice", "grim", "table", "chair", "blue", "walk"]
    table = marginal_values(score, words, n_contexts=5, progress=False)
    assert table.value.tolist() == [2.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    assert table.valued(0.01) == {"nice": 2.0, "grim": -1.0}
    with pytest.raises(ValueError, match="n_contexts must be between 3"):
        marginal_values(score, words, n_contexts=2)
    with pytest.raises(ValueError, match="relative to the other words"):
        marginal_values(score, ["nice"], n_contexts=3)
    with pytest.raises(ValueError, match="not finite"):
        marginal_values(lambda t: [float("nan")] * len(t), words, n_contexts=3, progress=False)
