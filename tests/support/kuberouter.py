"""One URL for the real CRD server and the fake built-ins, so one kubeconfig serves kopf.

A cluster's kube-apiserver serves built-in kinds and custom resources behind one address. In
tests they come from two servers: custom resources (and CRDs) from the real
``apiextensions-apiserver`` (:class:`support.apiserver.CRDApiServer`, HTTPS with a client
certificate) and built-in kinds from :class:`support.kubefake.FakeKubeServer` (plain HTTP).
:class:`KubeRouter` listens on ``http://127.0.0.1:PORT`` without authentication and:

- sends ``/apis/<group>/...`` to the CRD server for every group the fake does not serve
  (``kubetune.io``, ``apiextensions.k8s.io``, any other CRD group), plus ``/version`` and the
  health endpoints, authenticating with the admin client certificate from the CRD server's
  kubeconfig; everything else goes to the fake;
- answers ``GET /apis`` itself by merging both servers' group lists (the standalone
  apiextensions-apiserver serves no ``/apis``);
- streams watch responses chunk by chunk as they arrive (other answers are passed on whole);
- counts requests per ``(verb, resource)`` (:func:`support.kubefake.count_key`): the number
  "API requests per job, counted at the server" in the scale benchmark;
- bridges garbage collection: it watches every custom resource in the CRD server and tells
  the fake when one is deleted, so built-in objects with an ownerReference to a custom
  resource are collected as the kube-controller-manager's garbage collector would;
- records every write (POST, PUT, PATCH, DELETE, subresources included) with the client that
  made it: clients are told apart by their bearer token, as a real API server tells users
  apart (the router checks no credentials; :meth:`support.kubeenv.KubeEnv.kubeconfig_for`
  writes a kubeconfig per user), and calls hooks on each write after the server has applied
  it and before the client has the answer (to kill an operator "right after its k-th
  write");
- injects faults a real API server produces: an error answer to the next writes of a verb
  and resource, either instead of the write or after it landed (the answer lost, as when a
  client retries after a timeout), dropped watch streams, optionally resumed with
  ``410 Gone`` so the client must list again, and requests held unanswered until released.

    with CRDApiServer() as crd, FakeKubeServer() as fake, KubeRouter(fake, crd) as router:
        router.base_url           # one server for a kubeconfig
        router.request_counts()   # {("create", "jobs.batch"): 3, ("watch", "pods"): 1, ...}
        router.writes(user="kubetune-operator", namespace="team-a")   # [Write(...), ...]
        remove = router.on_write(lambda write: print(write))        # on the router's loop
        router.inject_error("patch", "finetunejobs.kubetune.io/status", status=409,
                            reason="Conflict")
        router.drop_watches(expire=True)   # close every watch; resuming them gives 410
        release = router.hold("list", "pods", user="op")   # op's pod lists wait for release()
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from support.apiserver import CRDApiServer
from support.kubefake import (
    FakeKubeServer,
    LoopThread,
    count_key,
    parse_api_path,
    request_verb,
)

__all__ = ["KubeRouter", "Write", "crd_client_ssl_context"]

logger = logging.getLogger(__name__)

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the router's own
# (unchecked) credentials: the CRD server authenticates the router by its client certificate.
_REQUEST_DROP = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "authorization"}
)
_RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_CRD_NON_API_PATHS = ("/version", "/healthz", "/readyz", "/livez", "/openapi")


def _abort_connection(response: aiohttp.ClientResponse) -> None:
    """Drop an upstream connection at once.

    Closing a TLS connection in the middle of a stream starts a TLS shutdown that needs the
    peer's answer; when the event loop stops first, the socket is left open (a
    ResourceWarning, an error under ``filterwarnings = error``). Aborting skips the shutdown.
    """
    connection = response.connection
    if connection is not None and connection.transport is not None:
        connection.transport.abort()


_WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


@dataclass(frozen=True)
class Write:
    """One write that went through the router, as the server answered it."""

    seq: int
    """Position among all writes through the router (1, 2, ...)."""
    user: str
    """The client's bearer token ("" without one)."""
    verb: str
    """create, update, patch, delete or deletecollection."""
    resource: str
    """As in :func:`support.kubefake.count_key`: ``jobs.batch``,
    ``finetunejobs.kubetune.io/status``."""
    namespace: str | None
    name: str | None
    """From the path, else the body's ``metadata.name`` (or ``generateName`` + ``*``)."""
    status: int
    """The HTTP status the client was answered (an injected error's, if any)."""

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else str(self.name)
        return f"{self.verb} {self.resource} {where} -> {self.status}"


@dataclass
class _Fault:
    verb: str
    resource: str
    status: int
    reason: str
    message: str | None
    times: int
    namespace: str | None
    forward: bool

    def matches(self, verb: str, resource: str, namespace: str | None) -> bool:
        return (verb, resource) == (self.verb, self.resource) and self.namespace in (
            None,
            namespace,
        )


@dataclass
class _Stream:
    path: str
    request: web.Request
    upstream: aiohttp.ClientResponse


def _user(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _body_name(body: bytes) -> str | None:
    try:
        meta = json.loads(body).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    if meta.get("name"):
        return str(meta["name"])
    return f"{meta['generateName']}*" if meta.get("generateName") else None


def _status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _fault_message(fault: _Fault, name: str | None) -> str:
    """The API server's wording for the common injected refusals."""
    if fault.message is not None:
        return fault.message
    resource = fault.resource.split("/")[0]
    if fault.reason == "AlreadyExists":
        return f'{resource} "{name}" already exists'
    if fault.reason == "Conflict":
        return (
            f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again"
        )
    return f"injected by the test ({fault.reason})"


def crd_client_ssl_context(kubeconfig: Path) -> ssl.SSLContext:
    """TLS context (CA + admin client certificate) read from the CRD server's kubeconfig."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    context.load_cert_chain(user["client-certificate"], user["client-key"])
    return context


def api_path_is_watch(request: web.Request) -> bool:
    """Whether a request is a watch (a stream the router can drop)."""
    api_path = parse_api_path(request.path)
    return (
        api_path is not None
        and api_path.plural is not None
        and request_verb(request.method, api_path, request.query) == "watch"
    )


class KubeRouter:
    """The router on ``http://127.0.0.1:PORT``; a context manager. Public methods are safe to
    call from any thread."""

    def __init__(
        self,
        fake: FakeKubeServer,
        crd_server: CRDApiServer,
        *,
        loop_thread: LoopThread | None = None,
        collect_garbage: bool = True,
    ) -> None:
        self.fake = fake
        self.crd_server = crd_server
        self.collect_garbage = collect_garbage
        self._own_loop = loop_thread is None
        self._loop_thread = loop_thread
        self._fake_groups = frozenset(g["name"] for g in fake.api_groups())
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._user_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._fake_session: aiohttp.ClientSession | None = None
        self._crd_session: aiohttp.ClientSession | None = None
        self._owner_watches: dict[str, asyncio.Task[None]] = {}
        self._writes: list[Write] = []
        self._write_hooks: list[Callable[[Write], None]] = []
        self._faults: list[_Fault] = []
        self._streams: dict[int, _Stream] = {}
        self._expired: set[str] = set()
        self._holds: dict[tuple[str, str, str | None], asyncio.Event] = {}
        self._gone_counts: collections.Counter[str] = collections.Counter()
        self.port: int | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> KubeRouter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def loop_thread(self) -> LoopThread:
        if self._loop_thread is None:
            raise RuntimeError("the router is not started")
        return self._loop_thread

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the router is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self._runner is not None:
            return
        if self._loop_thread is None:
            self._loop_thread = LoopThread("kuberouter")
        self.loop_thread.run(self._start())
        if self.collect_garbage:
            self.refresh_owner_watches()

    async def _start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._fake_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=timeout,
            auto_decompress=False,
        )
        self._crd_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, ssl=crd_client_ssl_context(self.crd_server.kubeconfig_path)
            ),
            timeout=timeout,
            auto_decompress=False,
        )
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=2.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is None:
            return
        self.loop_thread.run(self._stop())
        self._runner = None
        if self._own_loop:
            self.loop_thread.stop()
            self._loop_thread = None

    async def _stop(self) -> None:
        for task in self._owner_watches.values():
            task.cancel()
        await asyncio.gather(*self._owner_watches.values(), return_exceptions=True)
        self._owner_watches.clear()
        assert self._runner is not None
        await self._runner.cleanup()
        for session in (self._fake_session, self._crd_session):
            if session is not None:
                await session.close()
        # aiohttp closes TLS transports a moment after the session (its docs: "Graceful
        # Shutdown"); without the wait the CRD server's sockets leak as ResourceWarnings.
        await asyncio.sleep(0.25)

    # ------------------------------------------------------------------ counting
    def request_counts(self, user: str | None = None) -> dict[tuple[str, str], int]:
        """Requests routed so far per ``(verb, resource)``, both servers together; only
        those of ``user`` (a bearer token) when given."""
        with self._counts_lock:
            if user is None:
                return dict(self._counts)
            return {k[1:]: n for k, n in self._user_counts.items() if k[0] == user}

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()
            self._user_counts.clear()

    # -------------------------------------------------------------------- writes
    def writes(self, user: str | None = None, namespace: str | None = None) -> list[Write]:
        """The writes so far, oldest first; only those of ``user`` (a bearer token) and in
        ``namespace`` when given."""
        with self._counts_lock:
            found = list(self._writes)
        return [
            w
            for w in found
            if (user is None or w.user == user) and (namespace is None or w.namespace == namespace)
        ]

    def on_write(self, hook: Callable[[Write], None]) -> Callable[[], None]:
        """Call ``hook(write)`` for every write from now on, on the router's event loop,
        after the server applied the write and before the client receives the answer.
        Returns a function that removes the hook."""
        self.loop_thread.call(lambda: self._write_hooks.append(hook))

        def remove() -> None:
            self.loop_thread.call(
                lambda: self._write_hooks.remove(hook) if hook in self._write_hooks else None
            )

        return remove

    # -------------------------------------------------------------------- faults
    def inject_error(
        self,
        verb: str,
        resource: str,
        *,
        status: int = 409,
        reason: str = "Conflict",
        message: str | None = None,
        times: int = 1,
        namespace: str | None = None,
        forward: bool = False,
    ) -> None:
        """Answer the next ``times`` requests for ``(verb, resource)`` (in ``namespace``,
        if given) with an error Status, for either server. ``reason`` ``AlreadyExists`` and
        ``Conflict`` get the API server's messages unless ``message`` is given. With
        ``forward`` the request reaches the server first (the write lands, its answer is
        lost and replaced by the error), as a client sees it when it retries a write whose
        answer timed out."""
        fault = _Fault(verb, resource, status, reason, message, times, namespace, forward)
        self.loop_thread.call(lambda: self._faults.append(fault))

    def pending_faults(self) -> int:
        """Injected errors not answered yet."""
        return self.loop_thread.call(lambda: sum(f.times for f in self._faults))

    def drop_watches(self, *, expire: bool = False) -> int:
        """Close every watch stream in flight, as a restarting API server or a load balancer
        does; returns how many. With ``expire``, the first resumption of each (a watch of
        the same collection from a ``resourceVersion``) is answered ``410 Gone`` (an
        ``ERROR`` event, as the API server sends when that version is compacted), so the
        client must list again and sees only the objects that still exist."""

        def drop() -> int:
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                if expire:
                    self._expired.add(stream.path)
                _abort_connection(stream.upstream)
                transport = stream.request.transport
                if transport is not None:
                    transport.abort()
            return len(streams)

        return self.loop_thread.call(drop)

    def hold(self, verb: str, resource: str, user: str | None = None) -> Callable[[], None]:
        """Keep every request for ``(verb, resource)`` (of ``user`` only, if given) waiting,
        unanswered, until the returned function is called: an API server slow to answer,
        e.g. a client's list while the test changes the cluster behind its back."""
        gate_key = (verb, resource, user)

        def add() -> asyncio.Event:
            gate = asyncio.Event()
            self._holds[gate_key] = gate
            return gate

        gate = self.loop_thread.call(add)

        def release() -> None:
            def open_gate() -> None:
                gate.set()
                if self._holds.get(gate_key) is gate:
                    del self._holds[gate_key]

            self.loop_thread.call(open_gate)

        return release

    def gone_answers(self) -> dict[str, int]:
        """How many watches of each resource (``pods``, ``finetunejobs.kubetune.io``) were
        answered ``410 Gone`` after :meth:`drop_watches`."""
        with self._counts_lock:
            return dict(self._gone_counts)

    def _take_fault(self, verb: str, resource: str, namespace: str | None) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(verb, resource, namespace):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _record_write(
        self, request: web.Request, verb: str, resource: str, body: bytes, status: int
    ) -> None:
        api_path = parse_api_path(request.path)
        namespace = api_path.namespace if api_path else None
        name = (api_path.name if api_path else None) or _body_name(body)
        with self._counts_lock:
            seq = len(self._writes) + 1
            write = Write(seq, _user(request), verb, resource, namespace, name, status)
            self._writes.append(write)
        for hook in list(self._write_hooks):
            try:
                hook(write)
            except Exception:  # a test's hook must not turn into a 500 for the client
                logger.exception("write hook %r failed on %s", hook, write)

    # ------------------------------------------------------------------- routing
    def _crd_bound(self, path: str) -> bool:
        api_path = parse_api_path(path)
        if api_path is None:
            return path.startswith(_CRD_NON_API_PATHS)
        return bool(api_path.group) and api_path.group not in self._fake_groups

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = count_key(request.method, request.path, request.query)
        with self._counts_lock:
            self._counts[key] += 1
            self._user_counts[(_user(request), *key)] += 1
        if request.method == "GET" and request.path.rstrip("/") == "/apis":
            return await self._group_list()
        verb, resource = key
        for gate_key in ((verb, resource, None), (verb, resource, _user(request))):
            gate = self._holds.get(gate_key)
            if gate is not None:
                await gate.wait()
        resuming = verb == "watch" and "resourceVersion" in request.query
        if resuming and request.path in self._expired:
            self._expired.discard(request.path)
            with self._counts_lock:
                self._gone_counts[resource] += 1
            return await self._gone(request)
        if verb not in _WRITE_VERBS:
            return await self._forward(request, await request.read())
        body = await request.read()
        api_path = parse_api_path(request.path)
        namespace = api_path.namespace if api_path else None
        fault = self._take_fault(verb, resource, namespace)
        if fault is None:
            response = await self._forward(request, body)
        else:
            if fault.forward:
                await self._forward(request, body)
            name = (api_path.name if api_path else None) or _body_name(body)
            message = _fault_message(fault, name)
            response = web.json_response(
                _status_body(fault.status, fault.reason, message), status=fault.status
            )
        self._record_write(request, verb, resource, body, response.status)
        return response

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self._crd_bound(request.path):
            assert self._crd_session is not None
            return await self._proxy(request, body, self._crd_session, self.crd_server.base_url)
        assert self._fake_session is not None
        return await self._proxy(request, body, self._fake_session, self.fake.base_url)

    async def _gone(self, request: web.Request) -> web.StreamResponse:
        """A watch resumed from a compacted resourceVersion: 200, then one ERROR event."""
        since = request.query.get("resourceVersion", "")
        status = _status_body(410, "Expired", f"too old resource version: {since}")
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
        await response.write_eof()
        return response

    async def _group_list(self) -> web.Response:
        loop = asyncio.get_running_loop()
        crd_groups = await loop.run_in_executor(None, self.crd_server.api_group_list)
        groups = list(self.fake.api_groups())
        names = {g["name"] for g in groups}
        groups += [g for g in crd_groups["groups"] if g["name"] not in names]
        body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        return web.json_response(body)

    async def _proxy(
        self, request: web.Request, body: bytes, session: aiohttp.ClientSession, base_url: str
    ) -> web.StreamResponse:
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP
        )
        url = URL(base_url + request.raw_path, encoded=True)
        async with session.request(
            request.method, url, data=body or None, headers=headers, allow_redirects=False
        ) as upstream:
            out_headers: CIMultiDict[str] = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP
            )
            watch = api_path_is_watch(request)
            if upstream.headers.get("Content-Length") is not None or not watch:
                # Buffered, so that a write's hooks run before the client has the answer.
                payload = await upstream.read()
                return web.Response(status=upstream.status, body=payload, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            self._streams[id(response)] = _Stream(request.path, request, upstream)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientPayloadError):
                _abort_connection(upstream)  # either side went away in the middle of a stream
            except asyncio.CancelledError:
                _abort_connection(upstream)  # the client went away, or the router stops
                raise
            finally:
                self._streams.pop(id(response), None)
            return response

    # -------------------------------------------------------- garbage collection
    def refresh_owner_watches(self) -> list[str]:
        """Watch every custom resource the CRD server serves (call after applying CRDs);
        returns the watched collection paths."""
        return self.loop_thread.run(self._refresh_owner_watches())

    async def _refresh_owner_watches(self) -> list[str]:
        assert self._crd_session is not None
        url = self.crd_server.base_url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        async with self._crd_session.get(url) as response:
            response.raise_for_status()
            crds = await response.json()
        for crd in crds.get("items", []):
            spec = crd["spec"]
            served = [v["name"] for v in spec["versions"] if v.get("served")]
            storage = next((v["name"] for v in spec["versions"] if v.get("storage")), None)
            version = storage if storage in served else (served[0] if served else None)
            if version is None:
                continue
            path = f"/apis/{spec['group']}/{version}/{spec['names']['plural']}"
            if path not in self._owner_watches or self._owner_watches[path].done():
                self._owner_watches[path] = asyncio.get_running_loop().create_task(
                    self._watch_owners(path), name=f"owner-watch {path}"
                )
        return sorted(self._owner_watches)

    async def _watch_owners(self, path: str) -> None:
        """List, then watch one custom resource; report every deleted uid to the fake.

        A relist (after a 410 or a dropped connection) reports the uids that disappeared
        while the watch was down.
        """
        assert self._crd_session is not None
        url = self.crd_server.base_url + path
        known: set[str] = set()
        resource_version: str | None = None
        while True:
            stream: aiohttp.ClientResponse | None = None
            try:
                if resource_version is None:
                    async with self._crd_session.get(url) as response:
                        response.raise_for_status()
                        listing = await response.json()
                    uids = {o["metadata"]["uid"] for o in listing.get("items", [])}
                    for uid in known - uids:
                        self.fake.owner_deleted(uid)
                    known = uids
                    resource_version = listing["metadata"]["resourceVersion"]
                params = {
                    "watch": "true",
                    "resourceVersion": resource_version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                async with self._crd_session.get(url, params=params) as response:
                    response.raise_for_status()
                    stream = response
                    async for line in response.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj: dict[str, Any] = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            resource_version = None
                            break
                        resource_version = obj["metadata"]["resourceVersion"]
                        uid = obj["metadata"].get("uid")
                        if event["type"] == "DELETED" and uid:
                            known.discard(uid)
                            self.fake.owner_deleted(uid)
                        elif event["type"] in ("ADDED", "MODIFIED") and uid:
                            known.add(uid)
            except asyncio.CancelledError:
                if stream is not None:
                    _abort_connection(stream)
                raise
            except (aiohttp.ClientError, ValueError, KeyError):
                resource_version = None
                await asyncio.sleep(0.5)
