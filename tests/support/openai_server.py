"""A scripted OpenAI-compatible chat completions server for tests, on 127.0.0.1.

Each POST to /v1/chat/completions is recorded (path, headers, JSON body) and answered by
the next scripted reply in the queue, or else by the responder function given the request
body. A reply is a string (the message content of a 200 answer) or a `Scripted` with any
status, headers, raw body and a delay before answering. The server also records how many
requests were in flight at once.

    with OpenAIServer() as server:
        server.push("Score: 7", Scripted(429, headers={"Retry-After": "3"}))
        ...  # point the client at server.url ("http://127.0.0.1:PORT/v1")
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Scripted:
    """One scripted answer."""

    status: int = 200
    content: str | None = None
    """Message content of a 200 answer (ignored when body is given)."""
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    """Raw response body; default: a chat completion (200) or an error object."""
    delay: float = 0.0
    """Seconds to wait before answering."""


@dataclass(frozen=True)
class Recorded:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    body: Any

    @property
    def user_text(self) -> str:
        """The content of the last user message."""
        users = [m for m in self.body.get("messages", []) if m.get("role") == "user"]
        return str(users[-1]["content"]) if users else ""


Reply = str | Scripted
Responder = Callable[[dict[str, Any]], Reply]


def completion(content: str, model: str = "judge") -> dict[str, Any]:
    """A standard chat completion response body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class OpenAIServer:
    """The scripted server; use as a context manager (starts and stops it)."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder = responder
        self.requests: list[Recorded] = []
        self.max_in_flight = 0
        self._queue: deque[Reply] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL of the API, as evaluation.judge.endpoint takes it."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def push(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        with self._lock:
            self._queue.extend(replies)

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, body: dict[str, Any]) -> Scripted:
        with self._lock:
            reply = self._queue.popleft() if self._queue else None
        if reply is None and self.responder is not None:
            reply = self.responder(body)
        if reply is None:
            return Scripted(500, body='{"error": {"message": "no reply scripted"}}')
        return Scripted(content=reply) if isinstance(reply, str) else reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with server._lock:
                    server.requests.append(Recorded(self.path, dict(self.headers), body))
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    self._answer(server._next(body or {}), body)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _answer(self, reply: Scripted, body: Any) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.body is not None:
                    payload = reply.body
                elif reply.status == 200:
                    model = body.get("model", "judge") if isinstance(body, dict) else "judge"
                    payload = json.dumps(completion(reply.content or "", model))
                else:
                    payload = json.dumps({"error": {"message": f"HTTP {reply.status}"}})
                data = payload.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
