"""Reward models with a known token -> value map: the VADER lexicon and user lexicons.

A lexicon RM scores a text as in the paper: the sum of the lexicon values of its words, divided
by ``scale`` (5) and clipped to ``[-clip, clip]`` (10). The same lexicon, mapped onto a
tokenizer's vocabulary, gives the RM's token -> value map that the IRM is compared with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


class LexiconRM:
    """A reward model defined by a word -> value lexicon.

    Args:
        lexicon: word -> value; words are matched lowercased.
        scale: a text's summed value is divided by this.
        clip: the scaled reward is clipped to ``[-clip, clip]``.
        name: a short name for reports and cache keys.
    """

    def __init__(
        self,
        lexicon: Mapping[str, float],
        *,
        scale: float = 5.0,
        clip: float = 10.0,
        name: str = "lexicon",
    ) -> None:
        if not lexicon:
            raise ValueError("a lexicon RM needs at least one word")
        if scale <= 0 or clip <= 0:
            raise ValueError(f"scale and clip must be positive, got scale={scale}, clip={clip}")
        self.lexicon = {str(w).lower(): float(v) for w, v in lexicon.items()}
        self.scale = float(scale)
        self.clip = float(clip)
        self.name = name

    @classmethod
    def vader(cls, *, scale: float = 5.0, clip: float = 10.0) -> LexiconRM:
        """The VADER sentiment lexicon (7.5k entries, mean valence in [-4, 4])."""
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        return cls(SentimentIntensityAnalyzer().lexicon, scale=scale, clip=clip, name="vader")

    def describe(self) -> dict:
        """What identifies this RM in a cache key or report."""
        return {"name": self.name, "scale": self.scale, "clip": self.clip, "size": len(self.lexicon)}

    def words(self, text: str) -> list[str]:
        """The lowercased words of ``text`` as the reward sees them."""
        return _WORD.findall(text.lower())

    def score_text(self, text: str) -> float:
        total = sum(self.lexicon.get(w, 0.0) for w in self.words(text))
        return float(np.clip(total / self.scale, -self.clip, self.clip))

    def score(self, texts: Iterable[str]) -> np.ndarray:
        """Reward of each text."""
        return np.array([self.score_text(t) for t in texts], dtype=np.float64)

    def reward_function(self):
        """A TRL reward function ``(completions, **kwargs) -> list[float]``."""

        def lexicon_reward(completions: Sequence, **_: object) -> list[float]:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            return self.score(texts).tolist()

        lexicon_reward.__name__ = f"{self.name}_reward"
        return lexicon_reward

    def token_values(self, tokenizer) -> dict[int, float]:
        """Value of every vocabulary token that is, alone, one lexicon word.

        A token matches when its decoded text, stripped of one leading space and lowercased, is a
        lexicon word, so ``"good"``, ``" good"`` and ``" Good"`` all map to ``good``'s value. Words
        that the tokenizer splits into several tokens have no token value.
        """
        out: dict[int, float] = {}
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id in range(len(tokenizer)):
            if token_id in special:
                continue
            text = tokenizer.decode([token_id])
            word = text[1:] if text.startswith(" ") else text
            if not word or not word.isalpha():
                continue
            value = self.lexicon.get(word.lower())
            if value is not None:
                out[token_id] = value
        return out
