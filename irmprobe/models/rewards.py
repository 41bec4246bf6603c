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
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from irmprobe.models.tokens import word_ids, word_tokens  # noqa: F401 (word_tokens: re-exported)

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


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

    token_contexts = 16
    """How many carrier sentences measure a token's value (see :mod:`irmprobe.models.token_values`)."""
    token_alpha = 0.01
    """False-discovery rate at which a token counts as valued."""
    token_margin = 1.0
    """The test's margin, in robust SDs of the values over the vocabulary."""

    def token_values(self, tokenizer) -> dict[int, float]:
        """Value of every word token the RM values: its centred marginal effect on the RM score.

        Each word token's letters are scored in ``token_contexts`` neutral carrier sentences, centred on the
        vocabulary's median word per carrier and tested against a margin (:mod:`irmprobe.models.token_values`,
        docs/method.md). Tokens the test does not find valued are left out: the RM does not value them.
        """
        table = self.token_table(tokenizer)
        by_word = table.valued(self.token_alpha)
        return {t: by_word[w] for t, w in word_tokens(tokenizer).items() if w in by_word}

    def token_table(self, tokenizer):
        """The full :class:`~irmprobe.models.token_values.TokenValueTable` of this RM on ``tokenizer``'s words;
        measured once, then read from ``$IRMPROBE_CACHE/rm-token-values``."""
        from irmprobe.cache import cache_root
        from irmprobe.models.token_values import TokenValueTable, marginal_values, table_key

        key = table_key(self.describe(), tokenizer, self.token_contexts, self.token_margin)
        memo = self.__dict__.setdefault("_token_tables", {})
        if key in memo:
            return memo[key]
        path = cache_root() / "rm-token-values" / f"{key}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            table = TokenValueTable(data["words"], *(np.asarray(data[k]) for k in ("value", "se", "p", "q")),
                                    data["delta"], data["n_contexts"])
        else:
            words = sorted(set(word_tokens(tokenizer).values()))
            table = marginal_values(self.score, words, n_contexts=self.token_contexts, margin=self.token_margin)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"words": table.words, "delta": table.delta, "n_contexts": table.n_contexts,
                                       **{k: getattr(table, k).tolist() for k in ("value", "se", "p", "q")}}))
            tmp.replace(path)
        memo[key] = table
        return table


class LexiconRM(RewardModel):
    """A reward model defined by a word -> value lexicon.

    Args:
        lexicon: word -> value; words are matched lowercased.
        scale: a text's summed value is divided by this.
        clip: the scaled reward is clipped to ``[-clip, clip]``.
        name: a short name for reports and cache keys.
        word_pieces: ``whole`` (only tokens that are a whole lexicon word carry a value, as in the paper) or
            ``first`` (also the first token of lexicon words of several tokens; see :meth:`token_values`).
    """

    def __init__(self, lexicon: Mapping[str, float], *, scale: float = 5.0, clip: float = 10.0,
                 name: str = "lexicon", word_pieces: str = "whole") -> None:
        if not lexicon:
            raise ValueError("a lexicon RM needs at least one word")
        if scale <= 0 or clip <= 0:
            raise ValueError(f"scale and clip must be positive, got scale={scale}, clip={clip}")
        self.lexicon = {str(w).lower(): float(v) for w, v in lexicon.items()}
        bad = next((w for w, v in self.lexicon.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"lexicon word {bad!r} is not a finite number: {self.lexicon[bad]}")
        if word_pieces not in ("whole", "first"):
            raise ValueError(f"word_pieces must be 'whole' (whole-word tokens only) or 'first' (also the first token "
                             f"of words of several tokens), got {word_pieces!r}")
        self.scale = float(scale)
        self.clip = float(clip)
        self.name = name
        self.word_pieces = word_pieces

    @classmethod
    def vader(cls, *, scale: float = 5.0, clip: float = 10.0, word_pieces: str = "whole") -> LexiconRM:
        """The VADER sentiment lexicon (7.5k entries, mean valence in [-4, 4])."""
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        return cls(SentimentIntensityAnalyzer().lexicon, scale=scale, clip=clip, name="vader",
                   word_pieces=word_pieces)

    @classmethod
    def from_file(cls, path: str | Path, *, scale: float = 5.0, clip: float = 10.0,
                  word_pieces: str = "whole") -> LexiconRM:
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
        return cls(lexicon, scale=scale, clip=clip, name=f"lexicon-{path.stem}-{digest}", word_pieces=word_pieces)

    def describe(self) -> dict:
        out = {"name": self.name, "scale": self.scale, "clip": self.clip, "size": len(self.lexicon)}
        if self.word_pieces != "whole":  # the default stays out of the key, so caches built before it stay valid
            out["word_pieces"] = self.word_pieces
        return out

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
        """Raw lexicon value of every vocabulary token that is, alone, one lexicon word; with
        ``word_pieces="first"`` also the first token of lexicon words of several tokens.

        A token matches when its letters, lowercased, are a lexicon word, so ``"good"``, ``" good"`` and
        ``" Good"`` (and SentencePiece's ``"▁good"``) all map to ``good``'s value.

        Words of several tokens (``"abandons"`` is ``" ab" "and" "ons"`` for SmolLM2): by default they have no
        token value, as in the paper. With ``word_pieces="first"`` the value goes to the word's first token
        written mid-sentence, where the model commits to writing it; a first token that begins several lexicon
        words takes their mean value if they all have the same sign, and none if the signs differ (it commits
        to nothing the RM agrees on); a whole-word match always wins over a first-token one. First tokens of
        fewer than 3 letters (``" at"`` begins "atrocious", ``" i"`` "idiotic") are left out: they are mostly words
        of their own. A longer first token that is also a word of its own still takes the value: the rule cannot
        tell them apart without a corpus, so it is not the default.
        """
        out = {}
        for token_id, word in word_tokens(tokenizer).items():
            value = self.lexicon.get(word.lower())
            if value is not None:
                out[token_id] = value
        if self.word_pieces == "first":
            for token_id, value in self.first_piece_values(tokenizer).items():
                out.setdefault(token_id, value)
        return out

    def first_piece_values(self, tokenizer) -> dict[int, float]:
        """The ``word_pieces="first"`` rule alone: first token -> mean value of the several-token lexicon words it
        begins (lowercase and capitalised), for first tokens whose words agree in sign."""
        shared: dict[int, list[float]] = {}
        for word, value in self.lexicon.items():
            if value == 0 or not word.isalpha():
                continue
            for form in {word, word.capitalize()}:
                ids = word_ids(tokenizer, form)
                if len(ids) > 1 and len(tokenizer.decode([ids[0]]).strip()) >= 3:
                    shared.setdefault(int(ids[0]), []).append(value)
        return {t: float(np.mean(v)) for t, v in shared.items()
                if len({math.copysign(1.0, x) for x in v}) == 1}


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
        return {"name": self.name, "kind": "callable", "token_contexts": self.token_contexts,
                "token_alpha": self.token_alpha}


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
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``); scores are returned in float64.
    """

    def __init__(self, spec: str, *, label: str | int = 1, device: str = "cpu", batch_size: int = 32,
                 trust_remote_code: bool = False, dtype: str = "float32") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from irmprobe.models.loading import check_model_dir, fingerprint, torch_dtype

        local = Path(spec).expanduser().is_dir()
        if local:
            check_model_dir(Path(spec).expanduser(), spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                spec, trust_remote_code=trust_remote_code, output_loading_info=True, dtype=torch_dtype(dtype))
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
        # A retrained model in the same directory gets fresh caches (its files' sizes and times change).
        self.weights_digest = fingerprint(str(Path(spec).expanduser())) if local else None
        self.dtype = dtype

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
        return {"name": self.name, "kind": "classifier", "spec": self.spec, "label": self.label_index,
                "weights": self.weights_digest, "token_contexts": self.token_contexts, "token_alpha": self.token_alpha,
                **({"dtype": self.dtype} if self.dtype != "float32" else {})}


def reward_model(config, *, device: str = "cpu", dtype: str = "float32") -> RewardModel:
    """Build the RM a :class:`irmprobe.config.RewardConfig` names (a classifier's weights in ``dtype``)."""
    if config.kind == "vader":
        return LexiconRM.vader(scale=config.scale, clip=config.clip, word_pieces=config.word_pieces)
    if config.kind == "lexicon":
        return LexiconRM.from_file(config.path, scale=config.scale, clip=config.clip, word_pieces=config.word_pieces)
    if config.kind == "random":
        return RandomRM(config.seed)
    rm = ClassifierRM(config.model, label=config.label, device=device, dtype=dtype)
    rm.token_contexts, rm.token_alpha = config.token_contexts, config.token_alpha
    return rm
