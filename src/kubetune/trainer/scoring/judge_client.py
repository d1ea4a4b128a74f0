"""Requests to an OpenAI-compatible chat completions endpoint, for the LLM judge.

One `JudgeClient` is shared by the judge's worker threads. It retries connection errors,
timeouts, HTTP 408, 429 and 5xx with exponential backoff plus jitter (or the server's
Retry-After, in seconds), capped at `MAX_WAIT_SECONDS`. A refused key (401/403) or an
unknown endpoint or model (404) stops the whole evaluation with an `EvaluationError` that
names the field to fix; other 4xx answers fail only the request that got them. When the
first `FAIL_FAST_AFTER` requests all fail after their retries, the judge is considered down
and the remaining requests are not sent.

The API key is read from the environment variable `API_KEY_ENV` and is removed from every
message this module produces (a server may echo request headers in its error pages).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from kubetune.api.contract import JUDGE_API_KEY_ENV, Reason
from kubetune.api.v1alpha1.evaluation import JudgeSpec
from kubetune.trainer.evaluate import EvaluationError

API_KEY_ENV = JUDGE_API_KEY_ENV
"""Environment variable holding the judge's API key (from evaluation.judge.apiKeySecretRef)."""

BACKOFF_SECONDS = 1.0
"""First retry waits about this long; each further retry doubles it."""

MAX_WAIT_SECONDS = 60.0
"""Longest wait before a retry, whatever Retry-After asks for."""

FAIL_FAST_AFTER = 8
"""Stop sending when this many requests have failed after all retries and none succeeded."""

RETRY_LOG_LINES = 20
"""Retry messages logged before the rest are only counted."""

RETRYABLE_STATUS = frozenset({408, 429})
ERROR_BODY_CHARS = 200


@dataclass(frozen=True)
class Reply:
    """The judge's answer to one request, or why there is none."""

    text: str | None = None
    """choices[0].message.content; None when the request failed."""

    error: str | None = None
    """What went wrong (the API key removed)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


def backoff_seconds(attempt: int, rng: random.Random) -> float:
    """Wait before retry number `attempt + 1`: 1, 2, 4 ... s plus up to 1 s of jitter."""
    return min(MAX_WAIT_SECONDS, BACKOFF_SECONDS * 2**attempt + rng.uniform(0, BACKOFF_SECONDS))


def retry_after_seconds(value: str | None) -> float | None:
    """The Retry-After header in seconds, capped; None when absent or an HTTP date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds:  # NaN
        return None
    return min(MAX_WAIT_SECONDS, max(0.0, seconds))


def is_retryable(status: int) -> bool:
    """Whether an HTTP status is worth retrying (timeouts, rate limits, server errors)."""
    return status in RETRYABLE_STATUS or status >= 500


def display_url(url: str) -> str:
    """The URL without user:password@, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


def redact(text: str, secret: str | None) -> str:
    """The text with every occurrence of the secret replaced."""
    return text.replace(secret, "[redacted]") if secret else text


def read_reply(payload: Any) -> Reply:
    """The message content and token usage of a chat completion response body."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        return Reply(error="the response has no choices[0].message.content")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return Reply(
        text=content,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def snippet(text: str, secret: str | None) -> str:
    """The start of a response body for a message, the secret removed first: cutting first
    could leave a piece of the secret that no longer matches it whole."""
    text = " ".join(redact(text, secret).split())
    return text[:ERROR_BODY_CHARS] + ("..." if len(text) > ERROR_BODY_CHARS else "")


class JudgeClient:
    """Sends chat completion requests for the judge, with retries; safe across threads."""

    def __init__(
        self,
        spec: JudgeSpec,
        http: httpx.Client,
        *,
        log: Callable[[str], None],
        sleep: Callable[[float], None],
        max_tokens: int,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.url = spec.endpoint.rstrip("/") + "/chat/completions"
        self.shown_url = display_url(self.url)
        self.max_tokens = max_tokens
        self._http = http
        self._log = log
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._key = os.environ.get(API_KEY_ENV) or None
        self._headers = {"Content-Type": "application/json"}
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        self.succeeded = 0
        self.failed = 0
        self.unavailable = 0
        self.retries = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last_error = ""

    @property
    def sends_key(self) -> bool:
        """Whether requests carry an API key."""
        return self._key is not None

    def clean(self, text: str) -> str:
        """Text safe to log or store: the API key removed."""
        return redact(text, self._key)

    def _said(self, response: httpx.Response) -> str:
        """The start of the response body, safe to quote."""
        return snippet(response.text, self._key)

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """A deterministic request body (temperature 0)."""
        return {
            "model": self.spec.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }

    def ask(self, messages: list[dict[str, str]]) -> Reply:
        """One chat completion; retried as the spec allows. Raises EvaluationError when the
        endpoint refuses the key or does not know the endpoint or model."""
        try:
            return self._ask(self.body(messages))
        except EvaluationError:
            self.stopped.set()
            raise

    def _ask(self, body: dict[str, Any]) -> Reply:
        retries = self.spec.max_retries
        problem = ""
        for attempt in range(retries + 1):
            if self.stopped.is_set():
                return Reply(error="not sent: the judge was unreachable")
            wait: float | None = None
            try:
                response = self._http.post(
                    self.url,
                    json=body,
                    headers=self._headers,
                    timeout=httpx.Timeout(self.spec.timeout_seconds),
                )
            except httpx.TimeoutException:
                problem = f"no reply within {self.spec.timeout_seconds} s"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._finish(self._parse(response), unavailable=False)
                self._refuse_fatal(response)
                problem = f"HTTP {response.status_code}: {self._said(response)}"
                if not is_retryable(response.status_code):
                    return self._finish(Reply(error=self.clean(problem)), unavailable=False)
                wait = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt < retries:
                delay = backoff_seconds(attempt, self._rng) if wait is None else wait
                self._note_retry(problem, attempt + 1, retries, delay)
                self._sleep(delay)
        suffix = f" (after {retries} retries)" if retries else ""
        return self._finish(Reply(error=self.clean(problem + suffix)), unavailable=True)

    def _parse(self, response: httpx.Response) -> Reply:
        try:
            payload = response.json()
        except ValueError:
            return Reply(error=self.clean(f"the response is not JSON: {self._said(response)}"))
        reply = read_reply(payload)
        if reply.text is not None:
            return Reply(self.clean(reply.text), None, reply.prompt_tokens, reply.completion_tokens)
        return reply

    def _refuse_fatal(self, response: httpx.Response) -> None:
        status = response.status_code
        said = self._said(response)
        if status in (401, 403):
            key = (
                f"the key from {API_KEY_ENV} was refused"
                if self._key
                else f"no key was sent ({API_KEY_ENV} is not set)"
            )
            raise EvaluationError(
                Reason.SOURCE_UNAUTHORIZED,
                f"The judge at {self.shown_url} answered HTTP {status}: {key}. Set "
                f"evaluation.judge.apiKeySecretRef to a Secret key holding a valid API key "
                f"(the trainer reads it from {API_KEY_ENV}). The server said: {said}",
            )
        if status == 404:
            raise EvaluationError(
                Reason.SOURCE_NOT_FOUND,
                f"The judge at {self.shown_url} answered HTTP 404 for model "
                f"{self.spec.model!r}: check evaluation.judge.endpoint (the API's base URL, "
                f"e.g. http://judge:8000/v1, without /chat/completions) and "
                f"evaluation.judge.model. The server said: {said}",
            )

    def _note_retry(self, problem: str, number: int, retries: int, delay: float) -> None:
        with self._lock:
            self.retries += 1
            count = self.retries
        if count <= RETRY_LOG_LINES:
            self._log(
                self.clean(
                    f"Judge request to {self.shown_url} failed ({problem}); "
                    f"retry {number} of {retries} in {delay:.1f} s"
                )
            )
        if count == RETRY_LOG_LINES:
            self._log("Further judge retries are counted, not logged")

    def _finish(self, reply: Reply, *, unavailable: bool) -> Reply:
        with self._lock:
            if reply.text is not None:
                self.succeeded += 1
                self.prompt_tokens += reply.prompt_tokens
                self.completion_tokens += reply.completion_tokens
                return reply
            self.failed += 1
            self.last_error = reply.error or ""
            if unavailable:
                self.unavailable += 1
                if self.succeeded == 0 and self.unavailable >= FAIL_FAST_AFTER:
                    self.stopped.set()
        return reply
