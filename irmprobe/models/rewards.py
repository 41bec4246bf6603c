"""Reward models with a token -> value map: lexicons (VADER, a user's file), text callables and
Hugging Face sequence classifiers.

Every RM scores texts (``score``), gives TRL a reward function (``reward_function``) and maps the
vocabulary of a tokenizer to values (``token_values``), the signature the IRM is compared on.

A lexicon RM scores a text as in the paper: the sum of the lexicon values of its words, divided
by ``scale`` (5) and clipped to ``[-clip, clip]`` (10).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def word_tokens(tokenizer) -> dict[int, str]:
    """Vocabulary tokens that are, alone, one alphabetic word (one leading space allowed)."""
    out: dict[int, str] = {}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        word = text[1:] if text.startswith(" ") else text
        if word and word.isalpha():
            out[token_id] = word
    return out


class RewardModel:
    """What irmprobe needs of an RM. Subclasses implement ``score`` and ``describe``."""

    name = "rm"

    def score(self, texts: Iterable[str]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies this RM in a cache key or report."""
        raise NotImplementedError

    def reward_function(self) -> Callable:
        """A TRL reward function ``(completions, **kwargs) -> list[float]``."""

        def reward(completions: Sequence, **_: object) -> list[float]:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            return [float(v) for v in self.score(texts)]

        reward.__name__ = f"{self.name}_reward"
        return reward

    def token_values(self, tokenizer) -> dict[int, float]:
        """Value of every word token: the RM's score of the word alone.

        Tokens that are not a whole alphabetic word (sub-word pieces with punctuation, special
        tokens) have no value. Tokens whose lone score is 0 are left out: the RM does not value them.
        """
        words = word_tokens(tokenizer)
        ids = list(words)
        scores = self.score([words[i] for i in ids])
        return {i: float(v) for i, v in zip(ids, scores) if v != 0}


class LexiconRM(RewardModel):
    """A reward model defined by a word -> value lexicon.

    Args:
        lexicon: word -> value; words are matched lowercased.
        scale: a text's summed value is divided by this.
        clip: the scaled reward is clipped to ``[-clip, clip]``.
        name: a short name for reports and cache keys.
    """

    def __init__(self, lexicon: Mapping[str, float], *, scale: float = 5.0, clip: float = 10.0,
                 name: str = "lexicon") -> None:
        if not lexicon:
            raise ValueError("a lexicon RM needs at least one word")
        if scale <= 0 or clip <= 0:
            raise ValueError(f"scale and clip must be positive, got scale={scale}, clip={clip}")
        self.lexicon = {str(w).lower(): float(v) for w, v in lexicon.items()}
        bad = next((w for w, v in self.lexicon.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"lexicon word {bad!r} is not a finite number: {self.lexicon[bad]}")
        self.scale = float(scale)
        self.clip = float(clip)
        self.name = name

    @classmethod
    def vader(cls, *, scale: float = 5.0, clip: float = 10.0) -> LexiconRM:
        """The VADER sentiment lexicon (7.5k entries, mean valence in [-4, 4])."""
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        return cls(SentimentIntensityAnalyzer().lexicon, scale=scale, clip=clip, name="vader")

    @classmethod
    def from_file(cls, path: str | Path, *, scale: float = 5.0, clip: float = 10.0) -> LexiconRM:
        """A lexicon from a two-column word/value file: tab-separated (.tsv, .txt) or comma (.csv).

        A first row whose value column is not a number is taken as a header and skipped. The file
        must be UTF-8 (a byte-order mark is allowed). Words are matched lowercased, so ``Good`` and
        ``good`` are one word: a repeat with another value is refused, an identical one warned about.

        Raises:
            ValueError: naming the file and line of a malformed row, a value that is not a finite
                number, an empty word, a conflicting repeat, or a file that is not UTF-8.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"lexicon file {path} does not exist")
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise ValueError(f"lexicon file {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
        lexicon: dict[str, float] = {}
        first_line: dict[str, tuple[int, str]] = {}  # lowercased word -> (line, word as written)
        for n, row in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{n}: expected word{delimiter!r}value, got {row!r}")
            try:
                value = float(row[1])
            except ValueError:
                if n == 1:
                    continue  # header
                raise ValueError(f"{path}:{n}: value {row[1]!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{n}: value {row[1]!r} is not a finite number")
            word = row[0].strip()
            if not word:
                raise ValueError(f"{path}:{n}: the word is empty")
            key = word.lower()
            if key in first_line:
                line, seen = first_line[key]
                if lexicon[key] != value:
                    raise ValueError(f"{path}:{n}: {word!r} repeats {seen!r} of line {line} with another value "
                                     f"({value} vs {lexicon[key]}); words are matched lowercased, keep one")
                warnings.warn(f"{path}:{n}: {word!r} repeats line {line} (same value)", UserWarning, stacklevel=2)
                continue
            first_line[key] = (n, word)
            lexicon[key] = value
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return cls(lexicon, scale=scale, clip=clip, name=f"lexicon-{path.stem}-{digest}")

    def describe(self) -> dict:
        return {"name": self.name, "scale": self.scale, "clip": self.clip, "size": len(self.lexicon)}

    def words(self, text: str) -> list[str]:
        """The lowercased words of ``text`` as the reward sees them."""
        return _WORD.findall(text.lower())

    def score_text(self, text: str) -> float:
        total = sum(self.lexicon.get(w, 0.0) for w in self.words(text))
        return float(np.clip(total / self.scale, -self.clip, self.clip))

    def score(self, texts: Iterable[str]) -> np.ndarray:
        return np.array([self.score_text(t) for t in texts], dtype=np.float64)

    def reward_function(self) -> Callable:
        fn = super().reward_function()
        fn.__name__ = f"{self.name}_reward"
        return fn

    def token_values(self, tokenizer) -> dict[int, float]:
        """Raw lexicon value of every vocabulary token that is, alone, one lexicon word.

        A token matches when its decoded text, stripped of one leading space and lowercased, is a
        lexicon word, so ``"good"``, ``" good"`` and ``" Good"`` all map to ``good``'s value. Words
        that the tokenizer splits into several tokens have no token value.
        """
        out = {}
        for token_id, word in word_tokens(tokenizer).items():
            value = self.lexicon.get(word.lower())
            if value is not None:
                out[token_id] = value
        return out


class TextRM(RewardModel):
    """Any Python callable ``texts -> scores`` as an RM.

    Args:
        fn: maps a list of texts to a list (or array) of floats, one per text.
        name: a stable name; it keys caches, so give different functions different names.
    """

    def __init__(self, fn: Callable[[list[str]], Sequence[float]], *, name: str) -> None:
        if not callable(fn):
            raise ValueError("TextRM needs a callable texts -> scores")
        self.fn = fn
        self.name = name

    def score(self, texts: Iterable[str]) -> np.ndarray:
        texts = list(texts)
        out = np.asarray(self.fn(texts), dtype=np.float64).reshape(-1)
        if len(out) != len(texts):
            raise ValueError(f"RM {self.name!r} returned {len(out)} scores for {len(texts)} texts")
        return out

    def describe(self) -> dict:
        return {"name": self.name, "kind": "callable"}


class RandomRM(RewardModel):
    """A reward that carries no information: a fixed pseudo-random N(0, 1) value per text.

    Tuning against it builds a control organism: whatever its IRM agrees with the real RM on is
    the drift of tuning itself, the noise floor of every comparison. The value of a text depends
    only on ``seed`` and the text, so the reward is deterministic and TRL sees a consistent signal.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.name = f"random-{self.seed}"

    def score(self, texts: Iterable[str]) -> np.ndarray:
        out = []
        for text in texts:
            digest = hashlib.sha256(f"{self.seed}\0{text}".encode()).digest()
            out.append(np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal())
        return np.array(out, dtype=np.float64)

    def token_values(self, tokenizer) -> dict[int, float]:
        return {}  # no word has a value of its own: the reward is per text and meaningless

    def describe(self) -> dict:
        return {"name": self.name, "kind": "random", "seed": self.seed}


class NegatedRM(RewardModel):
    """Another RM times -1: tuning against it builds an organism that should learn *against* that RM."""

    def __init__(self, rm: RewardModel) -> None:
        self.rm = rm
        self.name = f"negated-{rm.name}"

    def score(self, texts: Iterable[str]) -> np.ndarray:
        return -np.asarray(self.rm.score(texts), dtype=np.float64)

    def token_values(self, tokenizer) -> dict[int, float]:
        return {t: -v for t, v in self.rm.token_values(tokenizer).items()}

    def describe(self) -> dict:
        return {"name": self.name, "kind": "negated", "of": self.rm.describe()}


def training_reward(spec: str | None, rm: RewardModel, *, scale: float = 5.0, clip: float = 10.0) -> RewardModel:
    """What an organism is tuned against (``reward.tuned_against``): the RM (None), the RM negated, or a lexicon file."""
    if spec is None:
        return rm
    if spec == "negated":
        return NegatedRM(rm)
    return LexiconRM.from_file(spec, scale=scale, clip=clip)


class ClassifierRM(RewardModel):
    """A Hugging Face sequence-classification model as RM: the logit of one label.

    Args:
        spec: a local directory or hub id of an ``AutoModelForSequenceClassification``.
        label: which label's logit is the reward (name, e.g. ``POSITIVE``, or index).
        device: where to run it.
        batch_size: texts per forward pass.
        trust_remote_code: off unless the user trusts the model repository.
    """

    def __init__(self, spec: str, *, label: str | int = 1, device: str = "cpu", batch_size: int = 32,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from irmprobe.models.loading import check_model_dir

        local = Path(spec).expanduser().is_dir()
        if local:
            check_model_dir(Path(spec).expanduser(), spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                spec, trust_remote_code=trust_remote_code, output_loading_info=True)
        except OSError as exc:
            if local:
                raise ValueError(f"could not load classifier RM {spec!r}: {exc}") from exc
            raise ValueError(f"could not load classifier RM {spec!r}: not a local directory and the hub "
                             "did not answer; download it and pass its directory") from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            # transformers fills weights the checkpoint lacks (a causal LM has no score head) at random.
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(f"{spec!r} is not a sequence classifier: its checkpoint has no {shown}, which would "
                             "be random; pass a model fine-tuned for sequence classification "
                             f"(its config's architectures: {model.config.architectures})")
        self.model = model.to(device).eval()
        labels = {v: int(k) for k, v in (self.model.config.id2label or {}).items()}
        if isinstance(label, str) and not label.isdigit():
            if label not in labels:
                raise ValueError(f"classifier {spec!r} has no label {label!r}; it has {sorted(labels)}")
            self.label_index = labels[label]
        else:
            self.label_index = int(label)
            if not 0 <= self.label_index < self.model.config.num_labels:
                raise ValueError(f"label index {label} out of range for {self.model.config.num_labels} labels")
        self.spec, self.device, self.batch_size = spec, device, batch_size
        self.name = f"classifier-{Path(spec).name}"

    def score(self, texts: Iterable[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=512).to(self.device)
                out.append(self.model(**enc).logits[:, self.label_index].float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def describe(self) -> dict:
        return {"name": self.name, "kind": "classifier", "spec": self.spec, "label": self.label_index}


def reward_model(config, *, device: str = "cpu") -> RewardModel:
    """Build the RM a :class:`irmprobe.config.RewardConfig` names."""
    if config.kind == "vader":
        return LexiconRM.vader(scale=config.scale, clip=config.clip)
    if config.kind == "lexicon":
        return LexiconRM.from_file(config.path, scale=config.scale, clip=config.clip)
    if config.kind == "random":
        return RandomRM(config.seed)
    return ClassifierRM(config.model, label=config.label, device=device)
