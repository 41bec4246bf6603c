"""A small client for any OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``).

Used by the optional LLM steps (triple rewriting, feature explanation). The API key is read from
an environment variable at call time and is never stored, logged or written to the cache; the
cache is keyed by the endpoint, model and messages only. Replies are cached on disk so a rerun
costs nothing, and transient failures are retried before one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from irmprobe.cache import cache_root, write_json


class LLMError(RuntimeError):
    """The endpoint could not be reached, or its reply could not be used."""


class ChatClient:
    """Chat completions from an OpenAI-compatible endpoint, cached on disk.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` or ``https://api.openai.com/v1``.
        model: the model name the endpoint serves.
        api_key_env: name of the environment variable holding the key (None: send no key).
        retries: attempts before giving up.
        timeout: seconds per request.
        cache_dir: where replies are kept; None uses ``$IRMPROBE_CACHE/llm``.
        temperature: sampling temperature (0 for reproducible answers).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY", retries: int = 3,
                 timeout: float = 60.0, cache_dir: str | Path | None = None, temperature: float = 0.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if retries < 1:
            raise ValueError("retries must be at least 1")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key_env, self.retries, self.timeout, self.temperature = api_key_env, retries, timeout, temperature
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "llm"

    def _key(self, messages: list[dict]) -> str:
        blob = json.dumps([self.base_url, self.model, self.temperature, messages], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def chat(self, messages: list[dict]) -> str:
        """The assistant's reply text to ``messages``, from the cache when it has been asked before."""
        path = self.cache_dir / f"{self._key(messages)}.json"
        if path.is_file():
            return json.loads(path.read_text())["content"]
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        last = None
        for attempt in range(self.retries):
            request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500 and exc.code != 429:
                    break  # a client error will not change on retry
                time.sleep(min(4.0, 0.5 * 2**attempt))
            except json.JSONDecodeError as exc:
                raise LLMError(f"{self.base_url} answered with something that is not JSON: {exc}") from exc
        else:
            payload = None
        if payload is None:
            reason = getattr(last, "reason", last)
            raise LLMError(f"the chat endpoint {self.base_url} did not answer after {self.retries} attempt(s) "
                           f"({reason}); check that it is running and that base_url is right")
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"{self.base_url} replied without choices[0].message.content: {str(payload)[:200]}") from exc
        if not isinstance(content, str):
            raise LLMError(f"{self.base_url} replied with non-text content: {content!r}"[:300])
        write_json(path, {"content": content})
        return content

    def json(self, system: str, user: str) -> dict:
        """Ask for a JSON object; parse the first ``{...}`` in the reply.

        Raises:
            LLMError: the reply holds no JSON object.
        """
        text = self.chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
        start, end = text.find("{"), text.rfind("}")
        try:
            value = json.loads(text[start : end + 1]) if start >= 0 and end > start else None
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise LLMError(f"expected a JSON object from {self.model}, got: {text[:200]!r}")
        return value
