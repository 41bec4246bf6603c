"""A small client for any OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``).

Used by the optional LLM steps (triple rewriting, feature explanation). The API key is read from
an environment variable at call time and is never stored, logged or written to the cache; the
cache is keyed by the endpoint, model and messages only. Replies are cached on disk so a rerun
costs nothing, and transient failures are retried before one clear error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from irmprobe.cache import cache_root, write_json


class LLMError(RuntimeError):
    """The endpoint could not be reached, or its reply could not be used.

    Attributes:
        status: the HTTP status of the last reply, when the endpoint answered with an error.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


_SECRET_PARAMS = ("key", "token", "secret", "password", "sig")
"""Query parameters whose names contain one of these (``api_key``, ``access_token``...) are redacted."""


def redact_url(url: str | None) -> str | None:
    """``url`` safe to print or write: userinfo and credential query values replaced by ``***``.

    ``https://user:pw@host/v1?api_key=k&x=1`` becomes ``https://***@host/v1?api_key=***&x=1``.
    """
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{name}=***" if "=" in item and any(s in name.lower() for s in _SECRET_PARAMS) else item
        for item in parts.query.split("&") if item
        for name in [item.split("=", 1)[0]]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """(``url`` without userinfo, an HTTP basic ``Authorization`` value for it or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    stripped = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return stripped, "Basic " + base64.b64encode(pair.encode()).decode()


def _hint(status: int, api_key_env: str | None, key_sent: bool) -> str:
    """What to do about an HTTP error status from the chat endpoint."""
    if status in (401, 403):
        if not key_sent:
            where = f"${api_key_env} is not set" if api_key_env else "llm.api_key_env is null"
            return f"the endpoint refused the credentials and no key was sent ({where}); set the key"
        return (f"the endpoint refused the credentials: check the key in ${api_key_env} "
                "(or the user:password in llm.base_url)")
    if status == 404:
        return ("nothing found there: check llm.base_url (the part before /chat/completions, e.g. "
                "http://localhost:8000/v1) and that the endpoint serves llm.model")
    if status == 400:
        return "the endpoint rejected the request: check llm.model and that it speaks the OpenAI chat API"
    if status == 429:
        return "still rate-limited after every retry: wait, then run again (replies already received are cached)"
    if status >= 500:
        return "the endpoint kept failing (server error): check its logs, then run again (replies are cached)"
    return "the endpoint refused the request"


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
        backoff: seconds before the first retry, doubled on each further one (at most 8x); a
            ``Retry-After`` header is honoured up to 30 s.

    Credentials in ``base_url`` (``https://user:password@host/v1``) are sent as HTTP basic auth,
    taking the place of the key from ``api_key_env``, and never appear in errors, repr or the cache.
    Only 429 and 5xx replies and network failures are retried; any other HTTP error raises at once.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY", retries: int = 3,
                 timeout: float = 60.0, cache_dir: str | Path | None = None, temperature: float = 0.0,
                 backoff: float = 0.5) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {redact_url(base_url)!r}")
        if retries < 1:
            raise ValueError("retries must be at least 1")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        url, self._basic_auth = _split_userinfo(base_url)
        self.base_url, self.model = url.rstrip("/"), model
        self.shown_url = redact_url(self.base_url if self._basic_auth is None else base_url.rstrip("/"))
        """The endpoint as it may be printed or written (credentials replaced by ``***``)."""
        self.api_key_env, self.retries, self.timeout, self.temperature = api_key_env, retries, timeout, temperature
        self.backoff = backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "llm"

    def __repr__(self) -> str:
        return f"ChatClient({self.shown_url!r}, {self.model!r})"

    def _key(self, messages: list[dict]) -> str:
        # Keyed by the redacted URL: the same endpoint with a new password keeps its cache.
        blob = json.dumps([redact_url(self.base_url), self.model, self.temperature, messages], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _endpoint(self) -> str:
        """``{base_url}/chat/completions``, with base_url's query string (if any) kept at the end."""
        parts = urllib.parse.urlsplit(self.base_url)
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))

    def _wait(self, attempt: int, exc: Exception) -> float:
        """Seconds before retry ``attempt + 1``: exponential backoff, or the server's Retry-After."""
        wait = min(8 * self.backoff, self.backoff * 2**attempt)
        headers = getattr(exc, "headers", None)
        try:
            wait = max(wait, float(headers.get("Retry-After") or 0)) if headers is not None else wait
        except ValueError:
            pass  # an HTTP-date: keep the backoff
        return min(wait, 30.0)

    def _http_error(self, exc: urllib.error.HTTPError, key: str | None, attempts: int) -> LLMError:
        """One LLMError for an HTTP error reply: status, what the server said, what to do."""
        try:
            said = exc.read().decode("utf-8", "replace")
            detail = json.loads(said).get("error", said) if said.lstrip().startswith("{") else said
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        except (OSError, ValueError, AttributeError):
            detail = ""
        detail = " ".join(str(detail).split())[:200]
        if key:
            detail = detail.replace(key, "***")
        tried = f" after {attempts} attempt(s)" if attempts > 1 else ""
        said_part = f": {detail}" if detail else ""
        return LLMError(
            f"the chat endpoint {self.shown_url} answered HTTP {exc.code}{tried}{said_part}; "
            f"{_hint(exc.code, self.api_key_env, bool(key or self._basic_auth))}",
            status=exc.code,
        )

    def chat(self, messages: list[dict]) -> str:
        """The assistant's reply text to ``messages``, from the cache when it has been asked before."""
        path = self.cache_dir / f"{self._key(messages)}.json"
        if path.is_file():
            return json.loads(path.read_text())["content"]
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if self._basic_auth:
            headers["Authorization"] = self._basic_auth
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        payload, last = None, None
        for attempt in range(self.retries):
            request = urllib.request.Request(self._endpoint(), data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise self._http_error(exc, key, attempt + 1) from None  # will not change on retry
                last = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
            else:
                try:
                    payload = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise LLMError(f"{self.shown_url} answered with something that is not JSON: {exc}") from None
                break
            if attempt + 1 < self.retries:
                time.sleep(self._wait(attempt, last))
        if payload is None:
            if isinstance(last, urllib.error.HTTPError):
                raise self._http_error(last, key, self.retries) from None
            reason = getattr(last, "reason", last)
            raise LLMError(f"the chat endpoint {self.shown_url} did not answer after {self.retries} attempt(s) "
                           f"({reason}); check that it is running and that llm.base_url is right") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.shown_url} replied without choices[0].message.content: "
                           f"{str(payload)[:200]}") from None
        if not isinstance(content, str):
            raise LLMError(f"{self.shown_url} replied with non-text content: {content!r}"[:300])
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
