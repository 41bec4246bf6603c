import numpy as np
import pytest

from irmprobe.irm.triples import build_triples
from tests.unit.word_tokenizer import WordTokenizer as _Words


def WordTokenizer():  # noqa: N802 (the tests' former class name)
    return _Words(["the", "cat", "was", "happy", "sad", "table", "good", "awful", "very", "and", "!"])


RM = {3: 2.0, 6: 1.5, 4: -2.0, 7: -3.0}  # happy, good +; sad, awful -


def test_triples_swap_only_the_last_token():
    streams = [[0, 1, 2, 8, 3, 9, 0, 5, 2, 6], [0, 5, 2, 7, 10]]
    t = build_triples(streams, RM, WordTokenizer(), n_max=10, seed=0)
    assert len(t) == 2  # 'happy' at 4 and 'good' at 9 in the first stream
    assert sorted(t.positive.tolist()) == [3, 6]
    assert set(t.negative.tolist()) <= {4, 7}
    assert set(t.neutral.tolist()) <= {0, 1, 2, 5, 8, 9}  # words of the texts that the RM does not value
    for variant in ("positive", "negative", "neutral"):
        seqs = t.sequences(variant)
        assert [s[:-1] for s in seqs] == [list(p) for p in t.prefixes]
    assert t.prefixes[0] == (0, 1, 2, 8)


def test_no_positive_word_raises():
    with pytest.raises(ValueError, match="no positive single-token RM word"):
        build_triples([[0, 1, 2, 5]], RM, WordTokenizer())


def test_triples_are_seeded():
    streams = [[0, 1, 2, 3] * 5, [5, 2, 6, 9] * 5]
    a = build_triples(streams, RM, WordTokenizer(), n_max=5, seed=1)
    b = build_triples(streams, RM, WordTokenizer(), n_max=5, seed=1)
    assert a.prefixes == b.prefixes and np.array_equal(a.negative, b.negative)
