"""A local Kubernetes API for operator tests: real CRDs, fake built-ins, one kubeconfig.

:class:`KubeEnv` starts the real ``apiextensions-apiserver`` with the project's CRDs
(``crds/*.yaml``), the fake built-in API (:mod:`support.kubefake`) and the router that puts
both behind one URL (:mod:`support.kuberouter`), then writes a kubeconfig for that URL. kopf,
the kubernetes client and ``kubectl`` all work against it:

    with KubeEnv() as env:
        os.environ["KUBECONFIG"] = str(env.kubeconfig_path)     # or env.env()
        env.ensure_namespace("team-a")
        env.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                   namespace="team-a")
        env.get("v1", "ConfigMap", "c", "team-a")                 # dict, or None if absent
        env.wait_for(lambda: env.get("batch/v1", "Job", "j", "team-a"), what="Job j")
        env.request_counts()                                     # {("create", "configmaps"): 1}
        env.kubeconfig_for("my-operator")    # the same server; writes recorded as that user

The fake and the router share one background event loop thread; the CRD server is two
subprocesses (etcd + apiserver), started in about two seconds; the first write of a custom
resource in the first seconds after its CRD is established waits about two seconds more (the
server's own delay). The binaries come from
``make apiserver``; without them :class:`KubeEnv` raises with the build hint (tests that use
it fail loudly rather than skip).
"""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from support.apiserver import REPO_ROOT, CRDApiServer
from support.kubefake import FakeKubeServer, LoopThread
from support.kuberouter import KubeRouter

__all__ = ["KubeApiError", "KubeEnv"]

T = TypeVar("T")
Obj = dict[str, Any]

_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


class KubeApiError(Exception):
    """A non-2xx answer; ``body`` is the API server's Status object."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else None
        super().__init__(f"{method} {path}: HTTP {status}: {message or body}")
        self.status = status
        self.body = body


class KubeEnv:
    """CRD server + fake built-ins + router + kubeconfig; a context manager."""

    def __init__(
        self,
        *,
        crds: Iterable[str | Path] | None = None,
        namespace: str = "default",
    ) -> None:
        self.crd_files = (
            [Path(p) for p in crds]
            if crds is not None
            else sorted((REPO_ROOT / "crds").glob("*.yaml"))
        )
        self.default_namespace = namespace
        self.crd_server: CRDApiServer | None = None
        self.fake: FakeKubeServer | None = None
        self.router: KubeRouter | None = None
        self._loop: LoopThread | None = None
        self._workdir: Path | None = None
        self._paths: dict[tuple[str, str], tuple[str, bool]] = {}
        #: Seconds ``start()`` took (CRD server + CRDs + fake + router).
        self.startup_seconds: float | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> KubeEnv:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.router is not None:
            return
        t0 = time.monotonic()
        try:
            self.crd_server = CRDApiServer()
            self.crd_server.start()
            for path in self.crd_files:
                self.crd_server.apply_crd_yaml(path)
            self._loop = LoopThread("kubeenv")
            self.fake = FakeKubeServer(loop_thread=self._loop)
            self.fake.start()
            self.router = KubeRouter(self.fake, self.crd_server, loop_thread=self._loop)
            self.router.start()
            self._workdir = Path(tempfile.mkdtemp(prefix="kubetune-kubeenv-"))
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        if self.fake is not None:
            self.fake.stop()
            self.fake = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        if self.crd_server is not None:
            self.crd_server.stop()
            self.crd_server = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _write_kubeconfig(self, path: Path | None = None, user: str = "kubetune-test") -> Path:
        path = path or self.kubeconfig_path
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubetune-test", "cluster": {"server": self.base_url}}],
            # The router checks no credentials; it tells clients apart by their token.
            "users": [{"name": user, "user": {"token": user}}],
            "contexts": [
                {
                    "name": "kubetune-test",
                    "context": {
                        "cluster": "kubetune-test",
                        "user": user,
                        "namespace": self.default_namespace,
                    },
                }
            ],
            "current-context": "kubetune-test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def kubeconfig_for(self, user: str) -> Path:
        """A kubeconfig for the same server whose bearer token is ``user``: the router
        records each write with its client's token (:meth:`KubeRouter.writes`), so a test
        tells the operator's writes from its own. ``user`` must be a file-name-safe token."""
        if self._workdir is None:
            raise RuntimeError("KubeEnv is not started")
        return self._write_kubeconfig(self._workdir / f"kubeconfig-{user}", user)

    # ---------------------------------------------------------------- properties
    @property
    def kubeconfig_path(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("KubeEnv is not started")
        return self._workdir / "kubeconfig"

    @property
    def base_url(self) -> str:
        if self.router is None:
            raise RuntimeError("KubeEnv is not started")
        return self.router.base_url

    def env(self) -> dict[str, str]:
        """Environment variables for a client or operator process (``KUBECONFIG``)."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    def request_counts(self, user: str | None = None) -> dict[tuple[str, str], int]:
        """Requests per ``(verb, resource)`` seen at the router (both servers), e.g.
        ``("create", "jobs.batch")``, ``("patch", "finetunejobs.kubetune.io/status")``,
        ``("watch", "pods")``; discovery as ``("get", "/apis")``. Only ``user``'s (a
        bearer token, see :meth:`kubeconfig_for`) when given."""
        assert self.router is not None
        return self.router.request_counts(user)

    def reset_counts(self) -> None:
        assert self.router is not None
        self.router.reset_counts()
        if self.fake is not None:
            self.fake.reset_counts()

    # ------------------------------------------------------------------- HTTP
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any]:
        """One request through the router. Returns (status, decoded JSON body); never
        raises on HTTP errors."""
        assert self.router is not None
        assert self.router.port is not None
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read().decode(errors="replace")
        finally:
            conn.close()
        try:
            return response.status, json.loads(payload) if payload else {}
        except json.JSONDecodeError:
            return response.status, {"raw": payload}

    def _checked(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, answer = self.request(method, path, body, **kwargs)
        if status >= 300:
            raise KubeApiError(method, path, status, answer)
        return answer

    def _resource(self, api_version: str, kind_or_plural: str) -> tuple[str, bool]:
        """(plural, namespaced) from discovery through the router, cached."""
        key = (api_version, kind_or_plural)
        if key not in self._paths:
            prefix = "/api/" if "/" not in api_version else "/apis/"
            discovery = self._checked("GET", prefix + api_version)
            for res in discovery.get("resources", []):
                if "/" in res["name"]:
                    continue
                names = {res["name"], res["kind"], *res.get("shortNames", [])}
                self._paths[(api_version, res["name"])] = (res["name"], res["namespaced"])
                self._paths[(api_version, res["kind"])] = (res["name"], res["namespaced"])
                for name in names:
                    self._paths.setdefault((api_version, name), (res["name"], res["namespaced"]))
            if key not in self._paths:
                raise KeyError(f"{kind_or_plural!r} is not served in {api_version}")
        return self._paths[key]

    def path_for(
        self,
        api_version: str,
        kind_or_plural: str,
        name: str | None = None,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> str:
        plural, namespaced = self._resource(api_version, kind_or_plural)
        path = ("/api/" if "/" not in api_version else "/apis/") + api_version
        if namespaced:
            path += f"/namespaces/{namespace or self.default_namespace}"
        path += f"/{plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    # ---------------------------------------------------------------- objects
    def create(self, obj: Obj, namespace: str | None = None) -> Obj:
        """POST an object (built-in or custom); its namespace is ``namespace``, else
        ``metadata.namespace``, else the default. Raises KubeApiError on refusal."""
        ns = namespace or obj.get("metadata", {}).get("namespace")
        path = self.path_for(obj["apiVersion"], obj["kind"], namespace=ns)
        result: Obj = self._checked("POST", path, obj)
        return result

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> Obj | None:
        """The object, or None when it does not exist."""
        path = self.path_for(api_version, kind, name, namespace)
        status, body = self.request("GET", path)
        if status == 404:
            return None
        if status >= 300:
            raise KubeApiError("GET", path, status, body)
        result: Obj = body
        return result

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[Obj]:
        params = {"labelSelector": label_selector} if label_selector else None
        body = self._checked(
            "GET", self.path_for(api_version, kind, None, namespace), params=params
        )
        items: list[Obj] = body.get("items", [])
        return items

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> Obj:
        """``patch_type``: merge | json | strategic."""
        path = self.path_for(api_version, kind, name, namespace, subresource)
        result: Obj = self._checked("PATCH", path, patch, content_type=_PATCH_TYPES[patch_type])
        return result

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str | None = None,
    ) -> Obj | None:
        """DELETE; returns the object (with ``deletionTimestamp`` while finalizers hold it),
        None when it did not exist."""
        path = self.path_for(api_version, kind, name, namespace)
        params = {"propagationPolicy": propagation} if propagation else None
        status, body = self.request("DELETE", path, params=params)
        if status == 404:
            return None
        if status >= 300:
            raise KubeApiError("DELETE", path, status, body)
        result: Obj = body
        return result

    def ensure_namespace(self, name: str) -> Obj:
        """Create the Namespace in the fake unless it exists (custom resources need none)."""
        existing = self.get("v1", "Namespace", name)
        if existing is not None:
            return existing
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    @staticmethod
    def wait_for(
        predicate: Callable[[], T | None],
        timeout: float = 10.0,
        interval: float = 0.05,
        what: str = "",
    ) -> T:
        """Poll until ``predicate()`` is truthy and return it; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
            time.sleep(interval)

    def wait_for_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        condition: Callable[[Obj], object] | None = None,
        *,
        timeout: float = 10.0,
    ) -> Obj:
        """Poll until the object exists (and ``condition(obj)`` holds) and return it."""

        def check() -> Obj | None:
            obj = self.get(api_version, kind, name, namespace)
            return obj if obj is not None and (condition is None or condition(obj)) else None

        return self.wait_for(check, timeout, what=f"{kind} {namespace}/{name}")

    def wait_for_absent(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        timeout: float = 10.0,
    ) -> None:
        """Poll until the object is gone (deleted, finalizers released, collected)."""
        self.wait_for(
            lambda: self.get(api_version, kind, name, namespace) is None,
            timeout,
            what=f"{kind} {namespace}/{name} to be gone",
        )
