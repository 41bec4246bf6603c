"""The chat client against a real HTTP server on loopback with canned answers."""

import numpy as np
import pytest

from irmprobe.irm.triples import Triples, llm_swap_words
from irmprobe.llm import ChatClient, LLMError


@pytest.fixture
def server(chat_endpoint):
    port, handler = chat_endpoint
    return f"http://127.0.0.1:{port}/v1", handler


def _answer(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_chat_sends_key_from_env_caches_and_never_stores_it(server, tmp_path, monkeypatch):
    url, handler = server
    monkeypatch.setenv("TEST_LLM_KEY", "sk-secret-123")
    handler.replies = [_answer('Sure: {"negative": "awful", "neutral": "table"}')]
    client = ChatClient(url, "m", api_key_env="TEST_LLM_KEY", cache_dir=tmp_path)
    assert client.json("sys", "user") == {"negative": "awful", "neutral": "table"}
    assert handler.seen[0]["path"] == "/v1/chat/completions" and handler.seen[0]["auth"] == "Bearer sk-secret-123"
    assert client.json("sys", "user")["negative"] == "awful"  # second ask comes from the cache
    assert len(handler.seen) == 1
    assert all("sk-secret" not in p.read_text() for p in tmp_path.iterdir())


def test_server_errors_are_retried_then_succeed(server, tmp_path):
    url, handler = server
    handler.replies = [(503, {"error": "busy"}), _answer("{}")]
    assert ChatClient(url, "m", cache_dir=tmp_path, retries=3).json("s", "u") == {}
    assert len(handler.seen) == 2


def test_down_endpoint_gives_one_clear_error(tmp_path):
    client = ChatClient("http://127.0.0.1:9/v1", "m", cache_dir=tmp_path, retries=2, timeout=2)
    with pytest.raises(LLMError, match="did not answer after 2 attempt"):
        client.chat([{"role": "user", "content": "hi"}])


def test_malformed_replies_raise(server, tmp_path):
    url, handler = server
    handler.replies = ["not json at all", {"choices": []}, _answer("no object here")]
    client = ChatClient(url, "m", cache_dir=tmp_path)
    with pytest.raises(LLMError, match="not JSON"):
        client.chat([{"role": "user", "content": "a"}])
    with pytest.raises(LLMError, match="without choices"):
        client.chat([{"role": "user", "content": "b"}])
    with pytest.raises(LLMError, match="expected a JSON object"):
        client.json("s", "c")


def test_bad_base_url_raises():
    with pytest.raises(ValueError, match="must start with http"):
        ChatClient("localhost:8000", "m")


def _Tok():  # noqa: N802
    from tests.unit.word_tokenizer import WordTokenizer

    return WordTokenizer(["the", "cat", "happy", "sad", "table", "awful", "blue"])


def test_llm_swap_words_keeps_only_valid_suggestions(server, tmp_path):
    url, handler = server
    rm = {2: 2.0, 3: -2.0, 5: -3.0}
    triples = Triples(((0, 1), (1, 0)), np.array([2, 2]), np.array([3, 3]), np.array([4, 4]))
    handler.replies = [_answer('{"negative": "awful", "neutral": "blue"}'),   # both valid
                       _answer('{"negative": "happy", "neutral": "sad"}')]   # wrong signs: kept offline
    out = llm_swap_words(triples, _Tok(), rm, ChatClient(url, "m", cache_dir=tmp_path))
    assert out.negative.tolist() == [5, 3] and out.neutral.tolist() == [6, 4]
