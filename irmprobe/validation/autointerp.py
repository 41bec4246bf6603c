"""Feature interpretation: evidence for an SAE feature, judges that explain it and say whether it
is about the RM's concept, and detection scoring of the explanations.

Evidence comes from the activation store (top-activating contexts, histogram, frequency) and from
the weights (the tokens the feature's decoder direction promotes through the unembedding, a
logit-lens reading that ignores the final norm). Judges share one interface, ``judge(evidence)``
-> :class:`Judgement` and ``detect(explanation, contexts)`` -> 0/1 per context:

* :class:`OfflineJudge` needs no LLM: relevance is the share of RM value the feature's
  top-activating and top-promoted tokens carry; the explanation lists those tokens;
* :class:`LLMJudge` follows the paper's protocol through any chat client (an OpenAI-compatible
  endpoint via :class:`irmprobe.llm.ChatClient`, or :class:`LocalChat` around a local model):
  activations scaled 0-10, explain, then classify 1/0.

Detection scoring (as in EleutherAI's delphi) asks the judge to pick the contexts where the
feature fires from a shuffled mix with contexts where it does not, given only the explanation.
As in delphi, the activating contexts it is scored on are held out: the judge explains from the
top-activating contexts (``FeatureEvidence.contexts``) and is scored on other activating contexts,
drawn across the activation quantiles from sequences none of the shown ones come from
(``FeatureEvidence.heldout``), mixed with random silent ones. A judge that memorises what it was
shown therefore scores at chance, not 1.0. :func:`judge_feature` runs both steps and hands the
judge only :meth:`FeatureEvidence.shown`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import cohen_kappa_score


@dataclass(frozen=True)
class Context:
    """A window of text ending at the token where the feature fired."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    """The feature's activation at each token of the window."""

    @property
    def peak(self) -> float:
        return self.activations[-1]

    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class FeatureEvidence:
    """What one SAE feature does, from the store and the weights."""

    name: str
    layer: int
    index: int
    frequency: float
    """Fraction of captured tokens on which it fires."""
    max_activation: float
    histogram: tuple[tuple[int, ...], tuple[float, ...]]
    """Counts and bin edges of its non-zero activations."""
    contexts: tuple[Context, ...]
    """Top-activating contexts, strongest first."""
    promoted: tuple[tuple[int, str], ...]
    """Tokens its decoder direction promotes most through the unembedding (id, text)."""
    heldout: tuple[Context, ...] = field(default_factory=tuple)
    """Activating contexts never shown to a judge (detection scoring only): one per activation
    quantile of the rows left after the top ones, from sequences none of ``contexts`` come from."""
    negatives: tuple[Context, ...] = field(default_factory=tuple)
    """Random contexts where it does not fire (detection scoring only)."""

    def shown(self) -> FeatureEvidence:
        """What a judge may see when explaining: this evidence without the detection contexts."""
        return replace(self, heldout=(), negatives=())


def feature_evidence(name: str, layer: int, index: int, column: sp.spmatrix | np.ndarray, token_ids: np.ndarray,
                     seq_index: np.ndarray, position: np.ndarray, streams, decode, decoder_direction: np.ndarray,
                     unembed: np.ndarray, *, n_contexts: int = 8, window: int = 8, n_promoted: int = 8,
                     n_heldout: int = 8, n_negatives: int = 8, seed: int = 0) -> FeatureEvidence:
    """Evidence for one feature from its activation column over the captured rows.

    The ``n_contexts`` top-activating contexts are the ones a judge is shown. The ``n_heldout``
    held-out activating contexts come from the remaining firing rows of other sequences, one drawn
    at random from each of ``n_heldout`` equal slices of them ranked by activation (delphi's
    quantile sampling), so detection is scored on weak activations as well as strong ones.

    Args:
        column: the feature's activation at every captured row ([rows] or [rows, 1]).
        token_ids, seq_index, position: the capture's row index (token, sequence, position).
        streams: token ids of every captured sequence.
        decode: token id -> text.
        decoder_direction: the feature's decoder row [d_model].
        unembed: the model's unembedding [d_model, vocab].
    """
    values = np.asarray(column.todense()).ravel() if sp.issparse(column) else np.asarray(column, dtype=np.float64).ravel()
    fired = np.flatnonzero(values > 0)
    by_pos = {(int(seq_index[r]), int(position[r])): float(values[r]) for r in fired}

    def context(row: int) -> Context:
        s, p = int(seq_index[row]), int(position[row])
        ids = [int(t) for t in streams[s][max(0, p - window + 1) : p + 1]]
        start = p + 1 - len(ids)
        acts = tuple(by_pos.get((s, start + i), 0.0) for i in range(len(ids)))
        return Context(tuple(ids), tuple(decode(t) for t in ids), acts)

    ranked = fired[np.argsort(-values[fired], kind="stable")]
    top = ranked[:n_contexts]
    rng = np.random.default_rng(seed)
    silent = np.flatnonzero(values == 0)
    negatives = rng.choice(silent, min(n_negatives, len(silent)), replace=False) if len(silent) else []
    rest = ranked[n_contexts:]
    rest = rest[~np.isin(seq_index[rest], seq_index[top])]  # other sequences: no window overlaps a shown one
    slices = np.array_split(rest, min(n_heldout, len(rest))) if len(rest) and n_heldout > 0 else []
    heldout = [int(rng.choice(s)) for s in slices]
    counts, edges = np.histogram(values[fired], bins=10) if len(fired) else (np.zeros(10, int), np.zeros(11))
    logits = decoder_direction @ unembed
    promoted = np.argsort(-logits, kind="stable")[:n_promoted]
    return FeatureEvidence(name, layer, index, float(len(fired) / max(1, len(values))),
                           float(values.max()) if len(values) else 0.0,
                           (tuple(int(c) for c in counts), tuple(float(e) for e in edges)),
                           tuple(context(int(r)) for r in top), tuple((int(t), decode(int(t))) for t in promoted),
                           heldout=tuple(context(r) for r in heldout),
                           negatives=tuple(context(int(r)) for r in negatives))


@dataclass(frozen=True)
class Judgement:
    """A judge's reading of one feature."""

    feature: str
    explanation: str
    relevant: bool
    """The judge says the feature is about the RM's concept."""
    score: float | None = None
    """The judge's relevance score where it has one (offline: RM value share)."""
    judge: str = ""
    detection: float | None = None
    """Balanced accuracy of detection on held-out activating vs silent contexts (:func:`judge_feature`);
    None when not scored or when either set is empty."""


class OfflineJudge:
    """Relevance from the RM itself, no LLM: how much RM value the feature's tokens carry.

    The score is the mean of two shares: of the top-activating contexts, the activation-weighted
    share whose peak token the RM values; of the top-promoted tokens, the share the RM values. A
    feature is relevant when the score reaches ``threshold``.
    """

    name = "offline"

    def __init__(self, rm_values: dict[int, float], threshold: float = 0.3) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        self.rm_values, self.threshold = rm_values, threshold

    def score(self, ev: FeatureEvidence) -> float:
        weights = np.array([c.peak for c in ev.contexts], dtype=np.float64)
        valued = np.array([c.token_ids[-1] in self.rm_values for c in ev.contexts], dtype=np.float64)
        fired = float((weights * valued).sum() / weights.sum()) if weights.sum() > 0 else 0.0
        promoted = float(np.mean([t in self.rm_values for t, _ in ev.promoted])) if ev.promoted else 0.0
        return (fired + promoted) / 2

    def judge(self, ev: FeatureEvidence, concept: str = "the RM's concept") -> Judgement:
        top = list(dict.fromkeys(c.tokens[-1] for c in ev.contexts))[:5]
        explanation = f"fires on {top}; promotes {[t for _, t in ev.promoted[:5]]}"
        score = self.score(ev)
        return Judgement(ev.name, explanation, score >= self.threshold, score, self.name)

    def detect(self, explanation_tokens: list[str], contexts: list[Context]) -> list[int]:
        """1 for each context whose last token is one the explanation names."""
        names = {t.strip().lower() for t in explanation_tokens}
        return [int(c.tokens[-1].strip().lower() in names) for c in contexts]


class LocalChat:
    """A chat client around a local causal LM (e.g. the default base), greedy and deterministic."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 96) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    def chat(self, messages: list[dict]) -> str:
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=False)
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        ids = ids.to(next(self.model.parameters()).device)
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _format_context(c: Context) -> str:
    scale = 10.0 / max(c.activations) if max(c.activations) > 0 else 0.0
    return "".join(f"{t}({round(a * scale)})" if a > 0 else t for t, a in zip(c.tokens, c.activations))


class LLMJudge:
    """The paper's protocol through a chat client: explain from scaled activations, then classify.

    Args:
        client: anything with ``chat(messages) -> str`` (:class:`irmprobe.llm.ChatClient`, :class:`LocalChat`).
        name: how reports name this judge.
    """

    def __init__(self, client, name: str = "llm") -> None:
        self.client, self.name = client, name

    def judge(self, ev: FeatureEvidence, concept: str = "sentiment") -> Judgement:
        from irmprobe.llm import LLMError

        examples = "\n".join(f"{i + 1}. {_format_context(c)}" for i, c in enumerate(ev.contexts))
        explanation = self.client.chat([
            {"role": "system", "content": "You explain what a neuron in a language model responds to."},
            {"role": "user", "content": "Each example shows text with the neuron's activation after a token, "
             f"scaled 0-10 (omitted where 0).\n{examples}\nIn one short sentence: what does the neuron respond to?"},
        ]).strip()
        verdict = self.client.chat([
            {"role": "system", "content": "You answer with a single digit."},
            {"role": "user", "content": f"A neuron is explained as: {explanation}\nIs this neuron related to "
             f"{concept}? Answer 1 for yes or 0 for no."},
        ])
        match = re.search(r"[01]", verdict)
        if match is None:
            raise LLMError(f"the judge's classification of {ev.name} holds no 0 or 1: {verdict[:100]!r}")
        return Judgement(ev.name, explanation, match.group() == "1", None, self.name)

    def detect(self, explanation: str, contexts: list[Context]) -> list[int]:
        from irmprobe.llm import LLMError

        listing = "\n".join(f"{i + 1}. {c.text()}" for i, c in enumerate(contexts))
        reply = self.client.chat([
            {"role": "system", "content": "You answer with a JSON list of 0s and 1s only."},
            {"role": "user", "content": f"A neuron responds to: {explanation}\nFor each text below, is the neuron "
             f"active on its last token? One 0 or 1 per text, in order.\n{listing}"},
        ])
        found = re.findall(r"[01]", reply[reply.find("[") :] if "[" in reply else reply)
        if len(found) < len(contexts):
            raise LLMError(f"the judge's detection reply has {len(found)} answers for {len(contexts)} texts: {reply[:100]!r}")
        return [int(x) for x in found[: len(contexts)]]


def detection_score(judge, judgement: Judgement, ev: FeatureEvidence, seed: int = 0) -> float | None:
    """Balanced accuracy of the judge picking held-out activating from silent contexts, given the explanation.

    Only ``ev.heldout`` and ``ev.negatives`` are scored, never the contexts the explanation was
    written from; None when either is empty.
    """
    if not ev.heldout or not ev.negatives:
        return None
    mixed = [(c, 1) for c in ev.heldout] + [(c, 0) for c in ev.negatives]
    order = np.random.default_rng(seed).permutation(len(mixed))
    contexts, truth = [mixed[i][0] for i in order], np.array([mixed[i][1] for i in order])
    if isinstance(judge, OfflineJudge):
        tokens = re.findall(r"'([^']*)'", judgement.explanation.split(";")[0])
        guess = np.array(judge.detect(tokens, contexts))
    else:
        guess = np.array(judge.detect(judgement.explanation, contexts))
    return float((np.mean(guess[truth == 1] == 1) + np.mean(guess[truth == 0] == 0)) / 2)


def judge_feature(judge, ev: FeatureEvidence, concept: str, seed: int = 0) -> Judgement:
    """Explain and label ``ev`` from its shown contexts only, then score the explanation by detection
    on the held-out contexts (the returned :class:`Judgement` carries ``detection``)."""
    judgement = judge.judge(ev.shown(), concept)
    return replace(judgement, detection=detection_score(judge, judgement, ev, seed))


def cross_comparison(universe: list[str], irm_top: set[str], flagged: set[str], frequency: dict[str, float],
                     dictionary_frequency: float) -> dict:
    """How the IRM's top features and the judge-flagged features agree, over the judged features.

    Precision: share of the IRM's top features the judge flags; recall: share of flagged features
    among the IRM's top; Cohen's kappa (scikit-learn) of the two labelings over ``universe``;
    and the mean activation frequency of flagged features vs the whole dictionary's.
    """
    a = np.array([f in irm_top for f in universe])
    b = np.array([f in flagged for f in universe])
    both = int(np.sum(a & b))
    kappa = float(cohen_kappa_score(a, b)) if len(set(a)) > 1 or len(set(b)) > 1 else None
    if kappa is not None and np.isnan(kappa):
        kappa = None
    return {"n_judged": len(universe), "n_irm_top": int(a.sum()), "n_flagged": int(b.sum()), "overlap": both,
            "precision": both / int(a.sum()) if a.sum() else None,
            "recall": both / int(b.sum()) if b.sum() else None, "kappa": kappa,
            "flagged_frequency": float(np.mean([frequency[f] for f in flagged])) if flagged else None,
            "dictionary_frequency": float(dictionary_frequency)}
