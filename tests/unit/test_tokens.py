"""Word tokens and word starts for byte-level BPE and SentencePiece tokenizers."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from irmprobe.irm.triples import build_triples
from irmprobe.models.rewards import LexiconRM
from irmprobe.models.tokens import word_ids, word_pieces, word_tokens


@pytest.mark.parametrize("fixture, mark", [("tiny_tokenizer_dir", "Ġ"), ("tiny_sp_tokenizer_dir", "▁")])
def test_word_starts_are_found_whatever_the_mark(fixture, mark, request):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    pieces = word_pieces(tok)
    good = tok.convert_tokens_to_ids(mark + "love")
    assert good in pieces.starts and pieces.words[good] == "love"
    # Every word start is exactly a token the tokenizer spells with its word-start mark.
    marked = {i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))
              if t.startswith(mark) and t[1:].isalpha()}
    assert pieces.starts == marked
    continuation = [i for i in pieces.words if i not in pieces.starts]
    assert continuation and all(not tok.convert_ids_to_tokens(i).startswith(mark) for i in continuation)
    assert word_ids(tok, "love") == [good]
    # The lexicon maps both the word start and the bare word; triples find space-led words.
    values = LexiconRM.vader().token_values(tok)
    assert values[good] == pytest.approx(3.2)
    streams = [tok("I think the movie was love and the day was great", add_special_tokens=False)["input_ids"]] * 3
    rm = {t: v for t, v in values.items() if t in pieces.starts}
    rm[tok.convert_tokens_to_ids(mark + "bad")] = -2.5
    triples = build_triples(streams, rm, tok, n_max=10)
    assert len(triples) >= 2 and all(int(t) in pieces.starts for t in triples.negative)


def test_a_tokenizer_without_word_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *"0123456789", " ", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ValueError, match="no token that decodes to an alphabetic word"):
        word_tokens(fast)


def test_several_token_words_take_the_first_token_by_a_stated_rule(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = {w: word_ids(tok, w) for w in ("wonderment", "wondering", "wonderful", "dreadful")}
    start = ids["wonderment"][0]
    assert tok.decode([start]) == " wond" and ids["wondering"][0] == start  # both begin with " wond"
    assert len(ids["wonderful"]) == 1 and tok.decode(ids["dreadful"][:1]) == " d"
    words = {"wonderment": 2.0, "wonderful": 3.0, "dreadful": -2.0}
    whole = LexiconRM(words).token_values(tok)
    first = LexiconRM(words, word_pieces="first").token_values(tok)
    assert start not in whole and first[start] == pytest.approx(2.0)
    assert ids["dreadful"][0] not in first  # " d" is a first piece of 1 letter: mostly a word of its own
    assert first[ids["wonderful"][0]] == pytest.approx(3.0)
    assert all(first[t] == v for t, v in whole.items())  # a whole-word match always wins
    # Two words of opposite sign share the first piece: it commits to nothing the RM agrees on.
    assert start not in LexiconRM({"wonderment": 2.0, "wondering": -1.0}, word_pieces="first").token_values(tok)
    assert LexiconRM({"wonderment": 2.0, "wondering": 1.0}, word_pieces="first").token_values(tok)[start] == 1.5
    with pytest.raises(ValueError, match="word_pieces must be 'whole'"):
        LexiconRM(words, word_pieces="last")


@pytest.mark.parametrize("fixture, mark", [("tiny_tokenizer_dir", "Ġ"), ("tiny_sp_tokenizer_dir", "▁")])
def test_a_named_word_list_maps_words_to_their_word_start_token_whatever_the_mark(fixture, mark, request, tmp_path):
    from irmprobe.pipeline.stages.discover import named_words

    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    love, bad = tok.convert_tokens_to_ids(mark + "love"), tok.convert_tokens_to_ids(mark + "bad")
    # Four organisms' full-vocabulary log-ratios: noise, and "love" raised far out of the controls' spread.
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (4, len(tok)))
    x[0, love] += 5.0
    path = tmp_path / "words.txt"
    path.write_text("\ufefflove\nbad\nqzxjvbkwq\n")  # a byte-order mark, as some editors write one
    n = named_words(str(path), x[0], x[1:], {}, None, None, 0.05, tok)
    assert [(e["word"], e["token_id"], e["direction"]) for e in n["entries"]] == [("love", love, "rewarded"),
                                                                                  ("bad", bad, None)]
    assert n["not_one_token"] == ["qzxjvbkwq"] and n["same_token"] == [] and n["words"] == 3
    assert n["entries"][0]["token"] == tok.decode([love])
