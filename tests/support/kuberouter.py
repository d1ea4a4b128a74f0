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
- streams responses without a ``Content-Length`` (watches) chunk by chunk as they arrive;
- counts requests per ``(verb, resource)`` (:func:`support.kubefake.count_key`): the number
  "API requests per job, counted at the server" in the scale benchmark;
- bridges garbage collection: it watches every custom resource in the CRD server and tells
  the fake when one is deleted, so built-in objects with an ownerReference to a custom
  resource are collected as the kube-controller-manager's garbage collector would.

    with CRDApiServer() as crd, FakeKubeServer() as fake, KubeRouter(fake, crd) as router:
        router.base_url           # one server for a kubeconfig
        router.request_counts()   # {("create", "jobs.batch"): 3, ("watch", "pods"): 1, ...}
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import threading
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from support.apiserver import CRDApiServer
from support.kubefake import FakeKubeServer, LoopThread, count_key, parse_api_path

__all__ = ["KubeRouter", "crd_client_ssl_context"]

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


def crd_client_ssl_context(kubeconfig: Path) -> ssl.SSLContext:
    """TLS context (CA + admin client certificate) read from the CRD server's kubeconfig."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    context.load_cert_chain(user["client-certificate"], user["client-key"])
    return context


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
        self._counts_lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._fake_session: aiohttp.ClientSession | None = None
        self._crd_session: aiohttp.ClientSession | None = None
        self._owner_watches: dict[str, asyncio.Task[None]] = {}
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
    def request_counts(self) -> dict[tuple[str, str], int]:
        """Requests routed so far per ``(verb, resource)``, both servers together."""
        with self._counts_lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

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
        if request.method == "GET" and request.path.rstrip("/") == "/apis":
            return await self._group_list()
        if self._crd_bound(request.path):
            assert self._crd_session is not None
            return await self._proxy(request, self._crd_session, self.crd_server.base_url)
        assert self._fake_session is not None
        return await self._proxy(request, self._fake_session, self.fake.base_url)

    async def _group_list(self) -> web.Response:
        loop = asyncio.get_running_loop()
        crd_groups = await loop.run_in_executor(None, self.crd_server.api_group_list)
        groups = list(self.fake.api_groups())
        names = {g["name"] for g in groups}
        groups += [g for g in crd_groups["groups"] if g["name"] not in names]
        body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        return web.json_response(body)

    async def _proxy(
        self, request: web.Request, session: aiohttp.ClientSession, base_url: str
    ) -> web.StreamResponse:
        body = await request.read()
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
            if upstream.headers.get("Content-Length") is not None:
                payload = await upstream.read()
                return web.Response(status=upstream.status, body=payload, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientPayloadError):
                _abort_connection(upstream)  # either side went away in the middle of a stream
            except asyncio.CancelledError:
                _abort_connection(upstream)  # the client went away, or the router stops
                raise
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
