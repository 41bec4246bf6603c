import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.evals.autointerp import (
    LLMJudge,
    OfflineJudge,
    cross_comparison,
    detection_score,
    feature_evidence,
)
from irmprobe.llm import ChatClient, LLMError
from tests.test_llm import _answer, server  # noqa: F401 (the loopback server fixture)

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
    assert j_s.relevant and j_s.score > 0.6  # every top context is an RM word; 3 of 8 promoted tokens are
    assert not j_f.relevant and j_f.score < 0.2
    assert "' mat'" in j_f.explanation
    assert detection_score(judge, j_f, ev_f) == pytest.approx(1.0)  # its explanation names its token


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
    judge = LLMJudge(ChatClient(url, "m", cache_dir=tmp_path))
    ev = _ev()
    j = judge.judge(ev, concept="sentiment")
    assert j.relevant and j.explanation == "The word happy."
    first = handler.seen[0]["body"]["messages"][1]["content"]
    assert "happy(10)" in first  # activations scaled 0-10 next to their tokens
    assert "related to sentiment" in handler.seen[1]["body"]["messages"][1]["content"]
    score = detection_score(judge, j, ev)
    assert 0.0 <= score <= 1.0 and len(handler.seen) == 3


def test_llm_judge_malformed_and_down(server, tmp_path):  # noqa: F811
    url, handler = server
    handler.replies = [_answer("Something."), _answer("maybe?")]
    with pytest.raises(LLMError, match="holds no 0 or 1"):
        LLMJudge(ChatClient(url, "m", cache_dir=tmp_path)).judge(_ev())
    down = LLMJudge(ChatClient("http://127.0.0.1:9/v1", "m", cache_dir=tmp_path / "d", retries=1, timeout=2))
    with pytest.raises(LLMError, match="did not answer"):
        down.judge(_ev())


def test_local_chat_is_deterministic_and_feeds_the_llm_judge(tiny_llama_dir):
    from irmprobe.evals.autointerp import LocalChat
    from irmprobe.pairs import load_model

    model, tok = load_model(str(tiny_llama_dir))
    chat = LocalChat(model, tok, max_new_tokens=6)
    messages = [{"role": "user", "content": "What does the neuron respond to?"}]
    first = chat.chat(messages)
    assert isinstance(first, str) and first == chat.chat(messages)  # greedy: the same answer twice
    judge = LLMJudge(chat, name="local")
    try:  # a random tiny model rarely answers with a digit: then the judge says so clearly
        judge.judge(_ev())
    except LLMError as exc:
        assert "holds no 0 or 1" in str(exc)
