"""Contrastive triples for the paper's RM-informed probe, built offline from token streams.

A triple is a context ending in a positive lexicon word, the same context ending in a negative
word instead, and ending in a neutral word; every swapped word is one token, so the swapped word
is the last token of each variant and the three differ only there. Contexts come from the model
generations (or a text file tokenised by the caller). Users with an OpenAI-compatible endpoint can
let an LLM choose swap words that fit the sentence (:func:`llm_swap_words`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Triples:
    """Contexts and the three swapped last tokens of each triple."""

    prefixes: tuple[tuple[int, ...], ...]
    """Token ids before the swapped word."""
    positive: np.ndarray
    """The positive lexicon token each context originally ended in."""
    negative: np.ndarray
    """A negative single-token lexicon word swapped in."""
    neutral: np.ndarray
    """A word the RM does not value, swapped in."""

    def __len__(self) -> int:
        return len(self.prefixes)

    def sequences(self, variant: str) -> list[list[int]]:
        """Token ids of every triple's ``positive``, ``negative`` or ``neutral`` variant."""
        tokens = {"positive": self.positive, "negative": self.negative, "neutral": self.neutral}[variant]
        return [list(p) + [int(t)] for p, t in zip(self.prefixes, tokens)]


def _spaced_words(tokenizer, ids) -> list[int]:
    """Tokens that begin an alphabetic word of 3+ letters (they fit mid-sentence): a leading space in byte-level
    BPE, a ``▁`` in SentencePiece (:func:`irmprobe.models.tokens.word_pieces` reads either)."""
    from irmprobe.models.tokens import word_pieces

    return word_pieces(tokenizer).spaced(ids, min_letters=3)


def build_triples(sequences, rm_values: dict[int, float], tokenizer, *, n_max: int = 200, seed: int = 0,
                  min_prefix: int = 3) -> Triples:
    """Triples from token streams: each occurrence of a positive single-token word is a candidate.

    Negative words are drawn from the RM's negative single-token words; neutral words from the
    words of the same streams that the RM does not value (so they are as ordinary as the text).

    Raises:
        ValueError: the streams hold no positive word, or the RM has no negative or neutral words.
    """
    positive = set(_spaced_words(tokenizer, [t for t, v in rm_values.items() if v > 0]))
    negative = sorted(_spaced_words(tokenizer, [t for t, v in rm_values.items() if v < 0]))
    seen = sorted({int(t) for seq in sequences for t in seq})
    neutral = sorted(set(_spaced_words(tokenizer, [t for t in seen if t not in rm_values])))
    candidates = [(s, p) for s, seq in enumerate(sequences) for p in range(min_prefix, len(seq))
                  if int(seq[p]) in positive]
    if not candidates:
        raise ValueError("no positive single-token RM word occurs in the texts: triples need generations "
                         "or a text file that contains some")
    if not negative or not neutral:
        raise ValueError("the RM values no negative single-token word, or the texts hold no neutral word: "
                         "contrastive triples cannot be built")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(candidates))[:n_max]
    chosen = [candidates[i] for i in sorted(pick)]
    return Triples(
        tuple(tuple(int(t) for t in sequences[s][:p]) for s, p in chosen),
        np.array([int(sequences[s][p]) for s, p in chosen], dtype=np.int64),
        rng.choice(negative, len(chosen)).astype(np.int64),
        rng.choice(neutral, len(chosen)).astype(np.int64),
    )


def llm_swap_words(triples: Triples, tokenizer, rm_values: dict[int, float], client) -> Triples:
    """Ask an LLM for swap words that fit each context; keep its choice where it is valid.

    ``client`` is an :class:`irmprobe.llm.ChatClient`. A suggestion is kept only if it is one
    space-led token and the RM values it negative (for the negative slot) or not at all (neutral);
    otherwise the offline choice stays, so the result is always a valid set of triples.
    """
    from irmprobe.models.tokens import word_ids

    negative, neutral = triples.negative.copy(), triples.neutral.copy()
    for i, prefix in enumerate(triples.prefixes):
        context = tokenizer.decode(list(prefix))
        word = tokenizer.decode([int(triples.positive[i])]).strip()
        reply = client.json(
            "You rewrite sentences for a sentiment experiment. Answer with JSON only.",
            f"The text '{context} {word}' ends in the positive word '{word}'. Give one negative word and one "
            'sentiment-neutral word that could replace it grammatically, as {"negative": "...", "neutral": "..."}.',
        )
        for key, target, ok in (("negative", negative, lambda v: v is not None and v < 0),
                                ("neutral", neutral, lambda v: v is None)):
            ids = word_ids(tokenizer, str(reply.get(key, "")).strip())
            if len(ids) == 1 and _spaced_words(tokenizer, ids) and ok(rm_values.get(ids[0])):
                target[i] = ids[0]
    return Triples(triples.prefixes, triples.positive, negative, neutral)
