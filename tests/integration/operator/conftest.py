"""Fixtures for operator integration tests: one local Kubernetes API per test session.

``kube_env`` starts the real CRD server (with ``crds/*.yaml``), the fake built-in API and the
router once per session (about two seconds). Without the CRD server's binaries (``make
apiserver``) it raises with the build hint, so the tests that use it error instead of
skipping: mark such test modules ``pytestmark = pytest.mark.apiserver``.

Tests share the servers, so each test works in its own namespace (``namespace`` fixture).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import kopf
import kubernetes
import pytest

from support.kubeenv import KubeEnv


@pytest.fixture(scope="session")
def kube_env() -> Iterator[KubeEnv]:
    with KubeEnv() as env:
        yield env


@pytest.fixture
def namespace(kube_env: KubeEnv, request: pytest.FixtureRequest) -> str:
    """A namespace of this test's own, created in the fake. Custom resources need no
    Namespace object, but kopf does: it serves only namespaces it sees listed."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
    name = f"{slug}-{digest}"
    kube_env.ensure_namespace(name)
    return name


@pytest.fixture
def kubeconfig(kube_env: KubeEnv, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``KUBECONFIG`` pointing at the environment, for this test only.

    The kubernetes client reads ``KUBECONFIG`` once, when imported (long before this
    fixture runs), into ``KUBE_CONFIG_DEFAULT_LOCATION``; that is patched too, so
    ``load_kube_config()`` without arguments (kopf's default login) finds the environment.
    """
    path = str(kube_env.kubeconfig_path)
    monkeypatch.setenv("KUBECONFIG", path)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
    return kube_env.kubeconfig_path


@pytest.fixture
def kopf_registry() -> kopf.OperatorRegistry:
    """A fresh registry for ``KopfRunner(..., registry=...)``.

    Each ``kopf run`` re-imports the operator module into the registry it is given; a fresh one
    per test keeps handlers from being registered twice. Unlike kopf's default registry, a
    plain ``OperatorRegistry`` has no login handler: add the kubernetes-client login the
    default one uses (it reads the kubeconfig, see the ``kubeconfig`` fixture).
    """
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry, id="login_via_client")(kopf.login_via_client)
    return registry
