import re

import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.llm import ChatClient, LLMError
from irmprobe.validation.autointerp import (
    Judgement,
    LLMJudge,
    OfflineJudge,
    cross_comparison,
    feature_evidence,
    judge_feature,
)
from tests.unit.test_llm import _answer, server  # noqa: F401 (the loopback server fixture)

WORDS = ["the", " cat", " sat", " happy", " sad", " on", " mat", " joy"]
RM = {3: 2.0, 4: -2.0, 7: 3.0}


def _capture(seed=0, n_seq=60, length=12):
    rng = np.random.default_rng(seed)
    streams = [rng.integers(0, len(WORDS), length).tolist() for _ in range(n_seq)]
    rows = [(s, p) for s in range(n_seq) for p in range(1, length)]
    seq = np.array([s for s, _ in rows])
    pos = np.array([p for _, p in rows])
    tok = np.array([streams[s][p] for s, p in rows])
    return streams, tok, seq, pos


def _evidence(column, tok, seq, pos, streams, direction, unembed, name="f"):
    return feature_evidence(name, 0, 0, column, tok, seq, pos, streams, lambda t: WORDS[t], direction, unembed)


def test_evidence_and_offline_judge_on_planted_features():
    streams, tok, seq, pos = _capture()
    rng = np.random.default_rng(1)
    sentiment = np.where(np.isin(tok, [3, 4, 7]), rng.uniform(1, 3, len(tok)), 0.0)  # fires on RM words
    furniture = np.where(np.isin(tok, [6]), rng.uniform(1, 3, len(tok)), 0.0)  # fires on ' mat'
    unembed = np.eye(8)  # d_model = vocab: direction i promotes token i
    ev_s = _evidence(sp.csr_matrix(sentiment[:, None]), tok, seq, pos, streams, np.array([0, 0, 0, 1, 1, 0, 0, 1.]), unembed)
    ev_f = _evidence(furniture, tok, seq, pos, streams, np.array([0, 0, 0, 0, 0, 0, 1, 0.5]), unembed)
    assert ev_s.frequency == pytest.approx(np.mean(sentiment > 0))
    assert ev_s.contexts[0].peak == pytest.approx(sentiment.max())
    assert all(c.tokens[-1] in (" happy", " sad", " joy") for c in ev_s.contexts)
    assert sum(ev_s.histogram[0]) == int(np.sum(sentiment > 0))
    assert {t for _, t in ev_s.promoted[:3]} == {" happy", " sad", " joy"}
    assert ev_s.negatives and all(c.peak == 0 for c in ev_s.negatives)  # silent on their last token
    # The window's activations are read back from the column: earlier tokens keep their own values.
    c = ev_s.contexts[0]
    assert all(t in (3, 4, 7) for t, a in zip(c.token_ids, c.activations) if a > 0)
    assert sum(a > 0 for a in c.activations) >= 1 + sum(t in (3, 4, 7) for t in c.token_ids[1:-1])
    judge = OfflineJudge(RM)
    j_s, j_f = judge.judge(ev_s), judge.judge(ev_f)
    # Score = mean of (activation-weighted share of top contexts on RM words, share of promoted tokens
    # the RM values). Sentiment: every top context is an RM word; promoted 3, 4, 7 then 5 others -> 3/8.
    assert j_s.relevant and j_s.score == pytest.approx((1.0 + 3 / 8) / 2)
    # Furniture: no top context is an RM word; promoted 6, 7, then 0-5 in order: 7, 3 and 4 are valued -> 3/8.
    assert not j_f.relevant and j_f.score == pytest.approx((0.0 + 3 / 8) / 2)
    assert "' mat'" in j_f.explanation


class _MemorisingJudge:
    """Explains nothing: remembers the text of every context it is given and says "fires" on exactly those."""

    name = "memoriser"

    def __init__(self):
        self.seen = set()

    def judge(self, ev, concept=""):
        self.seen |= {c.text() for c in (*ev.contexts, *ev.heldout, *ev.negatives)}
        return Judgement(ev.name, "memorised", True, None, self.name)

    def detect(self, explanation, contexts):
        return [int(c.text() in self.seen) for c in contexts]


def test_detection_is_scored_on_held_out_contexts_so_a_memoriser_scores_chance():
    streams, tok, seq, pos = _capture()
    furniture = np.where(tok == 6, np.random.default_rng(1).uniform(1, 3, len(tok)), 0.0)  # fires on ' mat'
    ev = _evidence(furniture, tok, seq, pos, streams, np.eye(8)[6], np.eye(8))
    shown = {c.text() for c in ev.contexts}
    assert len(ev.contexts) == len(ev.heldout) == len(ev.negatives) == 8
    assert all(c.peak > 0 and c.tokens[-1] == " mat" for c in ev.heldout)
    assert all(c.peak == 0 for c in ev.negatives)
    assert shown.isdisjoint(c.text() for c in ev.heldout)
    # Held-out contexts come from below the shown ones, spread down to the weakest activations.
    assert max(c.peak for c in ev.heldout) < min(c.peak for c in ev.contexts)
    assert min(c.peak for c in ev.heldout) < np.quantile(furniture[furniture > 0], 0.25)

    memoriser = _MemorisingJudge()
    j = judge_feature(memoriser, ev, "sentiment")
    assert memoriser.seen == shown  # the judge was given the top contexts only, no detection context
    assert memoriser.detect("", list(ev.contexts)) == [1] * 8  # scored on what it was shown, it would get 1.0
    assert j.detection == pytest.approx(0.5)  # chance: it says "fires" on no held-out context

    honest = judge_feature(OfflineJudge(RM), ev, "sentiment")
    assert "' mat'" in honest.explanation and honest.detection == pytest.approx(1.0)


def test_held_out_contexts_come_from_sequences_the_judge_was_not_shown():
    streams, tok, seq, pos = _capture()
    column = np.zeros(len(tok))
    column[seq == 0] = 10.0 + pos[seq == 0]  # sequence 0 fires everywhere, strongest: all 8 shown contexts
    column[(seq >= 1) & (seq <= 5) & (pos == 5)] = 1.0  # and once in each of five other sequences
    ev = _evidence(column, tok, seq, pos, streams, np.eye(8)[6], np.eye(8))
    assert sorted(c.peak for c in ev.contexts) == [10.0 + p for p in range(4, 12)]
    assert [c.peak for c in ev.heldout] == [1.0] * 5  # the five others; none of sequence 0's remaining rows


def test_cross_comparison_hand_computed():
    universe = ["a", "b", "c", "d", "e", "f"]
    out = cross_comparison(universe, irm_top={"a", "b", "c"}, flagged={"b", "c", "d"},
                           frequency={"b": 0.1, "c": 0.3, "d": 0.2}, dictionary_frequency=0.05)
    assert (out["overlap"], out["precision"], out["recall"]) == (2, 2 / 3, 2 / 3)
    # Agreement 4/6; chance 0.5*0.5 + 0.5*0.5 = 0.5 -> kappa = (0.667 - 0.5) / 0.5 = 1/3.
    assert out["kappa"] == pytest.approx(1 / 3)
    assert out["flagged_frequency"] == pytest.approx(0.2)


def _ev():
    streams, tok, seq, pos = _capture()
    col = np.where(tok == 3, 2.0, 0.0)
    return _evidence(col, tok, seq, pos, streams, np.eye(8)[3], np.eye(8), name="L0/3")


def test_llm_judge_follows_the_protocol_over_http(server, tmp_path):  # noqa: F811
    url, handler = server
    handler.replies = [_answer("The word happy."), _answer("1"), _answer("[1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]")]
    judge = LLMJudge(ChatClient(url, "m", cache_dir=tmp_path), name="llm")
    ev = _ev()
    j = judge.judge(ev, concept="sentiment")
    assert j.relevant and j.explanation == "The word happy."
    first = handler.seen[0]["body"]["messages"][1]["content"]
    assert "happy(10)" in first  # activations scaled 0-10 next to their tokens
    assert "related to sentiment" in handler.seen[1]["body"]["messages"][1]["content"]
    assert len(re.findall(r"^\d+\. ", first, flags=re.M)) == len(ev.contexts) == 8  # shown: the top contexts
    scored = judge_feature(judge, ev, "sentiment")
    assert len(handler.seen) == 3  # the explanation and the label came from the cache
    listing = re.findall(r"^\d+\. (.*)$", handler.seen[2]["body"]["messages"][1]["content"], flags=re.M)
    truth = {c.text(): 1 for c in ev.heldout} | {c.text(): 0 for c in ev.negatives}
    assert len(listing) == 16 and set(listing) == set(truth)  # held-out and silent contexts, nothing shown
    assert {c.text() for c in ev.contexts}.isdisjoint(listing)
    guess, labels = np.array([1, 0] * 8), np.array([truth[t] for t in listing])
    expected = (np.mean(guess[labels == 1] == 1) + np.mean(guess[labels == 0] == 0)) / 2
    assert scored.detection == pytest.approx(expected)


def test_llm_judge_malformed_and_down(server, tmp_path):  # noqa: F811
    url, handler = server
    handler.replies = [_answer("Something."), _answer("maybe?")]
    with pytest.raises(LLMError, match="holds no 0 or 1"):
        LLMJudge(ChatClient(url, "m", cache_dir=tmp_path)).judge(_ev())
    down = LLMJudge(ChatClient("http://127.0.0.1:9/v1", "m", cache_dir=tmp_path / "d", retries=1, timeout=2))
    with pytest.raises(LLMError, match="did not answer"):
        down.judge(_ev())


def test_local_chat_is_deterministic_and_feeds_the_llm_judge(tiny_llama_dir):
    from irmprobe.models.loading import load_model
    from irmprobe.validation.autointerp import LocalChat

    model, tok = load_model(str(tiny_llama_dir))
    chat = LocalChat(model, tok, max_new_tokens=6)
    messages = [{"role": "user", "content": "What does the neuron respond to?"}]
    first = chat.chat(messages)
    assert isinstance(first, str) and first == chat.chat(messages)  # greedy: the same answer twice
    judge = LLMJudge(chat, name="local")

    def answering(text):  # the model says ``text`` over and over: a large bias on its logit
        token = tok.convert_tokens_to_ids(text)
        return model.get_output_embeddings().register_forward_hook(
            lambda m, i, out: out + 1e4 * torch.nn.functional.one_hot(torch.tensor(token), out.shape[-1]))

    import torch

    for text, relevant in (("1", True), ("0", False)):
        handle = answering(text)
        try:
            j = judge.judge(_ev())
        finally:
            handle.remove()
        assert j.explanation == text * 6 and j.relevant is relevant and j.judge == "local"
    handle = answering("x")
    try:
        with pytest.raises(LLMError, match="holds no 0 or 1"):  # no digit in the answer: one clear error
            judge.judge(_ev())
    finally:
        handle.remove()
