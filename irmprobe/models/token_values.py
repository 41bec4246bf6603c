"""A neural RM's value of a token: its centred marginal effect on the RM score, with a test for "not valued".

A lexicon RM values a word by definition and leaves every other word at exactly 0. A neural RM (a
sequence classifier's logit) has no such zero: it scores every text, and a word scored alone gets a
logit that is never 0 and mostly says how the classifier reads one-word texts. irmprobe defines a
neural RM's value of word ``w`` as follows (docs/method.md, "A neural RM's token values"):

1. ``K`` neutral carrier sentences with one slot (``CARRIERS``) are scored with ``w`` in the slot,
   for every candidate word of the vocabulary: ``s_k(w)``.
2. Centred per carrier: ``e_k(w) = s_k(w) - median_w' s_k(w')``: the typical word of the vocabulary
   is worth 0 in every carrier, so the value is the word's marginal effect relative to an ordinary
   word, and sign agreement reads a sign that means "better / worse than an ordinary word".
3. ``value(w)`` is the mean of ``e_k(w)`` over the carriers, its standard error the carriers' spread
   over sqrt(K).
4. The RM *values* ``w`` when its effect is larger than an ordinary word's, as a test: the margin
   ``delta`` is ``margin`` robust SDs (1.4826 MAD) of the values over the vocabulary, the one-sided
   t-test of ``|value| > delta`` with ``K - 1`` d.f. gives a p-value per word, and the words whose
   Benjamini-Hochberg q-value is below ``alpha`` are valued. All others are "not valued" (they are
   left out of the token map, as a lexicon leaves out words it does not list).

A lexicon scored this way gets its own values back divided by ``scale`` (the carriers hold no
lexicon word, so the median is 0 and the spread across carriers is 0) and every other word unvalued.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CARRIERS = (
    "The {} is here.",
    "I saw the {} today.",
    "It was {}.",
    "They said {} again.",
    "This one is {}.",
    "We talked about {} yesterday.",
    "There is a {} on the table.",
    "He wrote {} in the note.",
    "She read the word {} aloud.",
    "The next item is {}.",
    "Someone mentioned {} at lunch.",
    "The list ends with {}.",
    "A {} came up in the meeting.",
    "You will find {} in the box.",
    "Our topic for the day: {}.",
    "He looked at the {} for a while.",
    "The sign on the door said {}.",
    "In the story there is a {}.",
    "Please pass the {}.",
    "My notes include {}.",
    "That is {}, I think.",
    "The report covers {}.",
    "On page two: {}.",
    "I heard {} on the radio.",
)
"""Neutral sentences with one slot: they say nothing good or bad, so the slot's word carries what changes."""


@dataclass(frozen=True)
class TokenValueTable:
    """Every candidate word's measured value (the arrays are aligned with ``words``)."""

    words: list[str]
    value: np.ndarray
    se: np.ndarray
    p: np.ndarray
    q: np.ndarray
    delta: float
    """The margin: values within +-delta are an ordinary word's."""
    n_contexts: int

    def valued(self, alpha: float) -> dict[str, float]:
        """Word -> value for the words the RM values at false-discovery rate ``alpha``."""
        return {w: float(v) for w, v, q in zip(self.words, self.value, self.q) if q < alpha}


def marginal_values(score: Callable[[list[str]], Sequence[float]], words: Sequence[str], *, n_contexts: int = 16,
                    margin: float = 1.0, batch_size: int = 512, progress: bool = True) -> TokenValueTable:
    """Each word's centred marginal effect on ``score`` over ``n_contexts`` carriers, with its test.

    Args:
        score: the RM, texts -> scores.
        words: the candidate words (each is put in every carrier's slot).
        n_contexts: how many carriers (3 to ``len(CARRIERS)``).
        margin: the test's margin in robust SDs of the values over ``words``.

    Raises:
        ValueError: too few or too many contexts, fewer than 2 words, or scores that are not finite.
    """
    from scipy import stats

    if not 3 <= n_contexts <= len(CARRIERS):
        raise ValueError(f"n_contexts must be between 3 and {len(CARRIERS)} (the carriers irmprobe has), "
                         f"got {n_contexts}")
    words = list(words)
    if len(words) < 2:
        raise ValueError(f"a token's value is relative to the other words; got {len(words)} candidate word(s)")
    texts = [c.format(w) for c in CARRIERS[:n_contexts] for w in words]
    scores = []
    chunks = range(0, len(texts), batch_size)
    if progress:
        from irmprobe.progress import bar

        chunks = bar(chunks, desc="RM token values", unit="batch", leave=False)
    for start in chunks:
        scores.append(np.asarray(score(texts[start:start + batch_size]), dtype=np.float64).reshape(-1))
    s = np.concatenate(scores).reshape(n_contexts, len(words))
    if not np.isfinite(s).all():
        raise ValueError("the RM returned a score that is not finite for a carrier sentence")
    e = s - np.median(s, axis=1, keepdims=True)
    value = e.mean(axis=0)
    se = e.std(axis=0, ddof=1) / np.sqrt(n_contexts)
    delta = float(margin * stats.median_abs_deviation(value, scale="normal"))
    excess = np.abs(value) - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, excess / se, np.where(excess > 1e-12 * (1 + np.abs(value)), np.inf, -np.inf))
    p = stats.t.sf(t, df=n_contexts - 1)
    q = stats.false_discovery_control(p, method="bh")
    return TokenValueTable(words, value, se, p, q, delta, n_contexts)


def table_key(describe: dict, tokenizer, n_contexts: int, margin: float) -> str:
    """What a token-value table depends on: the RM, the tokenizer's vocabulary and the test's settings."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    blob = json.dumps([describe, hashlib.sha256(vocab.encode()).hexdigest(), n_contexts, margin], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
