"""A fault-injecting HTTP proxy for the local S3 server: it sits between boto3 and moto (or
any S3 endpoint on 127.0.0.1) and, following a plan that tests change at run time, resets
connections, answers 500 / 503 with S3's XML error body, delays responses, truncates or
corrupts bodies. Every request and every injected fault is counted, so a test can assert
that the faults it planned really happened.

The proxy speaks HTTP/1.1 with keep-alive to the client (as botocore expects, including
`Expect: 100-continue`) and opens one upstream connection per request. It runs an asyncio
loop in a daemon thread::

    with fault_proxy(moto_endpoint) as proxy:
        proxy.plan(Fault("error", status=503, code="SlowDown", first=2))
        store = S3Store(bucket, endpoint_url=proxy.url)
        ...
        assert proxy.injected["503 SlowDown"] == 2

Fault kinds:

- `reset`: close the connection with a TCP reset, during the request (`phase="request"`:
  after `fraction` of its body; the server never sees it) or during the response
  (`phase="response"`: the server did the work, the client gets the headers and `fraction`
  of the body).
- `error`: answer `status` with `<Error><Code>code</Code>…` instead of forwarding.
- `slow`: send `fraction` of the response, wait `delay_s`, send the rest.
- `truncate`: send the headers (with the full Content-Length) and `fraction` of the body,
  then close the connection cleanly.
- `corrupt`: flip one byte in the middle of the request body (`phase="request"`: the
  server stores other bytes than the client sent) or of the response body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

FaultKind = Literal["reset", "error", "slow", "truncate", "corrupt"]
Phase = Literal["request", "response"]

ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
}
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te"}
)
BODYLESS_STATUSES = frozenset({204, 304})
ANSWERED_WITH_A_BODY = ("GET", "POST")
CORRUPT_ANSWER = ("corrupt", "response")
CORRUPT_REQUEST = ("corrupt", "request")


@dataclass
class Fault:
    """One rule of a fault plan: which requests it hits, how often, and what it does.

    A request matches when its method, path and query contain what is given (None matches
    anything). Among matching requests the fault fires on the first `first` ones, or on
    every `every`-th one, or (neither given) on all of them; `limit` caps how many times.

    Attributes:
        kind: what to do (see the module docstring).
        method: HTTP method to match, e.g. "GET".
        key: substring of the request path (`/bucket/key`).
        query: substring of the raw query string (`partNumber`, `uploads`, `uploadId`).
        first: fire on the first this many matching requests.
        every: fire on every this-many-th matching request.
        limit: fire at most this many times.
        status: HTTP status of an `error`.
        code: S3 error code of an `error`.
        delay_s: seconds a `slow` response pauses.
        fraction: share of the body sent (or read) before a reset, a truncation or a pause.
        phase: whether a `reset` or `corrupt` hits the request or the response.
        matched: requests that matched so far.
        injected: times it fired so far.
    """

    kind: FaultKind
    method: str | None = None
    key: str | None = None
    query: str | None = None
    first: int | None = None
    every: int | None = None
    limit: int | None = None
    status: int = 503
    code: str = "SlowDown"
    delay_s: float = 1.0
    fraction: float = 0.5
    phase: Phase = "response"
    matched: int = 0
    injected: int = 0

    @property
    def name(self) -> str:
        """The counter this fault adds to, e.g. `503 SlowDown`, `reset-response`, `slow`."""
        if self.kind == "error":
            return f"{self.status} {self.code}"
        if self.kind in ("reset", "corrupt"):
            return f"{self.kind}-{self.phase}"
        return self.kind

    def matches(self, method: str, path: str, query: str, has_body: bool) -> bool:
        """Whether a request is one this fault is about (and one it can change at all: a
        truncated or corrupted response needs a GET or POST, which answer with a body; a
        corrupted request needs a body)."""
        changes_answer = self.kind == "truncate" or (self.kind, self.phase) == CORRUPT_ANSWER
        if changes_answer and method not in ANSWERED_WITH_A_BODY:
            return False
        if (self.kind, self.phase) == CORRUPT_REQUEST and not has_body:
            return False
        return (
            (self.method is None or self.method == method)
            and (self.key is None or self.key in path)
            and (self.query is None or self.query in query)
        )

    def fires(self) -> bool:
        """Count one matching request; whether the fault hits it."""
        self.matched += 1
        if self.limit is not None and self.injected >= self.limit:
            return False
        if self.first is not None:
            hit = self.matched <= self.first
        elif self.every is not None:
            hit = self.matched % self.every == 0
        else:
            hit = True
        if hit:
            self.injected += 1
        return hit


@dataclass(frozen=True)
class Seen:
    """One request the proxy received, and the fault it got (None: forwarded untouched).

    Attributes:
        method: the HTTP method.
        path: `/bucket/key`.
        query: the raw query string.
        fault: the `Fault.name` it got, or None.
        headers: its headers, names in lower case.
    """

    method: str
    path: str
    query: str
    fault: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class _Response:
    status_line: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes = field(default=b"")


class FaultProxy:
    """The proxy; use `fault_proxy()` to run one.

    Attributes:
        upstream: the S3 endpoint requests are forwarded to.
        url: the proxy's endpoint (give it to boto3 / `S3Store` / `AWS_ENDPOINT_URL_S3`).
        injected: faults injected since the start (or `reset_counts`), by `Fault.name`.
        seen: every request received since then.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream = upstream
        self._upstream = (parts.hostname, parts.port)
        self.url = ""
        self.injected: Counter[str] = Counter()
        self.seen: list[Seen] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    # --- Control, from the test's thread ---------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def plan(self, *faults: Fault) -> list[Fault]:
        """Replace the fault plan (the counters so far are kept); returns the faults."""
        with self._lock:
            self._faults = list(faults)
        return list(faults)

    def clear(self) -> None:
        """Forward everything untouched from now on."""
        self.plan()

    def reset_counts(self) -> None:
        with self._lock:
            self.injected.clear()
            self.seen.clear()

    @property
    def requests(self) -> int:
        """Requests received since the start (or `reset_counts`)."""
        with self._lock:
            return len(self.seen)

    def total_injected(self) -> int:
        with self._lock:
            return sum(self.injected.values())

    # --- The loop ---------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _choose(self, request: _Request) -> Fault | None:
        with self._lock:
            chosen = None
            has_body = int(request.header("content-length") or 0) > 0
            for fault in self._faults:
                matches = fault.matches(request.method, request.path, request.query, has_body)
                if matches and fault.fires():
                    chosen = fault
                    break
            if chosen is not None:
                self.injected[chosen.name] += 1
            headers = {k.lower(): v for k, v in request.headers}
            name = chosen.name if chosen else None
            self.seen.append(Seen(request.method, request.path, request.query, name, headers))
        return chosen

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (
            ConnectionError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # the client went away, or sent something that is not HTTP
        except asyncio.CancelledError:
            pass  # the proxy is stopping: end the connection quietly
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its response; whether the connection stays open."""
        request = await _read_head(reader)
        if request is None:
            return False
        fault = self._choose(request)
        if (request.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if fault is not None and fault.kind == "reset" and fault.phase == "request":
            length = int(request.header("content-length") or 0)
            await reader.readexactly(int(length * fault.fraction))
            _reset(writer)
            return False
        request.body = await _read_body(reader, request.headers, until_eof=False)
        keep_alive = (request.header("connection") or "").lower() != "close"
        if fault is not None and fault.kind == "corrupt" and fault.phase == "request":
            request.body = _flip(request.body)
        if fault is not None and fault.kind == "error":
            await _send(writer, _error_response(fault, request, next(self._ids)), keep_alive)
            return keep_alive
        response = await self._forward(request)
        if fault is None:
            await _send(writer, response, keep_alive)
            return keep_alive
        return await _misbehave(writer, response, fault, keep_alive)

    async def _forward(self, request: _Request) -> _Response:
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            lines = [f"{request.method} {request.target} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in request.headers if k.lower() not in HOP_BY_HOP]
            lines = [line for line in lines if not line.lower().startswith("content-length:")]
            if request.body or request.method in ("PUT", "POST"):
                lines.append(f"Content-Length: {len(request.body)}")
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            await writer.drain()
            while True:
                status_line = await reader.readline()
                status = int(status_line.split()[1])
                headers = await _read_headers(reader)
                if status >= 200:
                    break
            body = b""
            if request.method != "HEAD" and status not in BODYLESS_STATUSES:
                body = await _read_body(reader, headers, until_eof=True)
            return _Response(status_line, status, headers, body)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """Run a proxy in front of `upstream` (`http://127.0.0.1:PORT`); yields it."""
    proxy = FaultProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.stop()


async def _misbehave(
    writer: asyncio.StreamWriter, response: _Response, fault: Fault, keep_alive: bool
) -> bool:
    """Send the upstream's answer the way `fault` says; whether the connection stays open."""
    head = _head_bytes(response, keep_alive)
    cut = int(len(response.body) * fault.fraction)
    if fault.kind == "reset":
        writer.write(head + response.body[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)  # let the client read what was sent, then reset
        _reset(writer)
        return False
    if fault.kind == "truncate":
        writer.write(head + response.body[:cut])
        await writer.drain()
        return False  # closed cleanly by _serve: a short body, then EOF
    if fault.kind == "slow":
        writer.write(head + response.body[:cut] if cut else b"")
        await writer.drain()
        await asyncio.sleep(fault.delay_s)
        writer.write(response.body[cut:] if cut else head + response.body)
        await writer.drain()
        return keep_alive
    if fault.kind == "corrupt" and fault.phase == "response":
        response.body = _flip(response.body)
    await _send(writer, response, keep_alive)
    return keep_alive


# --- HTTP/1.1, just what S3 clients and servers use ------------------------------------------


async def _read_headers(reader: asyncio.StreamReader) -> list[tuple[str, str]]:
    headers = []
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return headers


async def _read_head(reader: asyncio.StreamReader) -> _Request | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    path, _, query = target.partition("?")
    return _Request(method, target, path, query, await _read_headers(reader))


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], *, until_eof: bool
) -> bytes:
    values = {k.lower(): v for k, v in headers}
    if "chunked" in values.get("transfer-encoding", "").lower():
        body = bytearray()
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await _read_headers(reader)  # trailers
        return bytes(body)
    if "content-length" in values:
        return await reader.readexactly(int(values["content-length"]))
    return await reader.read() if until_eof else b""


def _head_bytes(response: _Response, keep_alive: bool) -> bytes:
    reason = response.status_line.decode("latin-1").split(" ", 2)[2:] or ["\r\n"]
    lines = [f"HTTP/1.1 {response.status} {reason[0].strip()}"]
    lines += [f"{k}: {v}" for k, v in response.headers if k.lower() not in HOP_BY_HOP]
    if not any(k.lower() == "content-length" for k, _ in response.headers):
        lines.append(f"Content-Length: {len(response.body)}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send(writer: asyncio.StreamWriter, response: _Response, keep_alive: bool) -> None:
    writer.write(_head_bytes(response, keep_alive) + response.body)
    await writer.drain()


def _error_response(fault: Fault, request: _Request, request_id: int) -> _Response:
    message = ERROR_MESSAGES.get(fault.code, "Injected by the fault proxy.")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{fault.code}</Code><Message>{message}</Message>"
        f"<Resource>{request.path}</Resource><RequestId>faultproxy-{request_id}</RequestId>"
        "</Error>"
    ).encode()
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(fault.status, "Error")
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
    return _Response(f"HTTP/1.1 {fault.status} {reason}".encode(), fault.status, headers, body)


def _flip(body: bytes) -> bytes:
    if not body:
        return body
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), as a crashed server or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
