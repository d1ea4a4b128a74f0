"""The local Kubernetes API (support/kubeenv.py) behaves as operators need: the kubernetes
client works against the fake built-ins with real status codes, the real CRD server refuses
invalid FineTuneJobs through the router, and a real kopf operator runs against both
(child object, status patch, finalizer, deletion, garbage collection)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner

from catalog import CATALOG_DIR, load_case
from support.kubeenv import KubeApiError, KubeEnv
from support.kubefake import FakeKubeServer

HERE = Path(__file__).parent
REPO = HERE.parents[2]
OPERATOR = HERE / "ftj_configmap_operator.py"
FTJ_API = "kubetune.io/v1alpha1"
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


@pytest.fixture
def api(kube_env: KubeEnv) -> Iterator[kubernetes.client.ApiClient]:
    """A kubernetes client configured from the environment's kubeconfig file."""
    client = kubernetes.config.new_client_from_config(config_file=str(kube_env.kubeconfig_path))
    with client:
        yield client


def job(name: str, labels: dict[str, str] | None = None, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels or {"app": "trainer"}, **metadata},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "kubetune/trainer:test"}],
                }
            },
        },
    }


def pod(name: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {
            "containers": [
                {"name": "trainer", "image": "kubetune/trainer:1"},
                {"name": "metrics", "image": "kubetune/exporter:1"},
            ]
        },
    }


def message(exc: kubernetes.client.ApiException) -> str:
    """The API server's Status message of a refused request."""
    text: str = json.loads(exc.body)["message"]
    return text


def smoke_job(name: str, namespace: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(
        (REPO / "examples/finetunejob-smoke.yaml").read_text()
    )
    manifest["metadata"] = {"name": name, "namespace": namespace}
    return manifest


# ----------------------------------------------------------- kubernetes client on the fake


@pytest.mark.apiserver
def test_client_create_answers_201_and_409_on_duplicates(
    api: kubernetes.client.ApiClient, namespace: str
) -> None:
    batch = kubernetes.client.BatchV1Api(api)
    created, status, _ = batch.create_namespaced_job_with_http_info(namespace, job("train"))
    assert status == 201
    assert created.metadata.namespace == namespace
    assert created.metadata.uid
    assert created.metadata.generation == 1
    assert int(created.metadata.resource_version) > 0

    with pytest.raises(kubernetes.client.ApiException) as refused:
        batch.create_namespaced_job(namespace, job("train"))
    assert refused.value.status == 409
    assert message(refused.value) == 'jobs.batch "train" already exists'

    generated = batch.create_namespaced_job(namespace, job("", generateName="train-"))
    assert generated.metadata.name.startswith("train-")
    assert len(generated.metadata.name) == len("train-") + 5

    with pytest.raises(kubernetes.client.ApiException) as invalid:
        batch.create_namespaced_job(namespace, job("Train_Job"))
    assert invalid.value.status == 422
    assert message(invalid.value).startswith('Job "Train_Job" is invalid: metadata.name: ')


@pytest.mark.apiserver
def test_client_watch_resumes_and_follows_selectors(
    api: kubernetes.client.ApiClient, namespace: str
) -> None:
    batch = kubernetes.client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job("watched"))
    batch.create_namespaced_job(namespace, job("other", labels={"app": "exporter"}))
    listed = batch.list_namespaced_job(namespace, label_selector="app in (trainer),!missing")
    assert [j.metadata.name for j in listed.items] == ["watched"]
    since = listed.metadata.resource_version

    patched = batch.patch_namespaced_job("watched", namespace, {"metadata": {"labels": {"x": "1"}}})
    assert patched.metadata.labels == {"app": "trainer", "x": "1"}
    assert patched.metadata.generation == 1, "a metadata change keeps the generation"
    batch.patch_namespaced_job("watched", namespace, {"metadata": {"labels": {"app": "done"}}})
    batch.patch_namespaced_job("other", namespace, {"metadata": {"labels": {"app": "trainer"}}})

    events = [
        (e["type"], e["object"].metadata.name)
        for e in kubernetes.watch.Watch().stream(
            batch.list_namespaced_job,
            namespace,
            label_selector="app=trainer",
            resource_version=since,
            timeout_seconds=1,
        )
    ]
    # Leaving the selector reads as DELETED, entering it as ADDED, as from a real API server.
    assert events == [("MODIFIED", "watched"), ("DELETED", "watched"), ("ADDED", "other")]


@pytest.mark.apiserver
def test_client_status_subresource_generation_and_conflicts(
    api: kubernetes.client.ApiClient, namespace: str
) -> None:
    batch = kubernetes.client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job("status"))
    condition = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-29T04:00:00Z"}
    status = batch.patch_namespaced_job_status(
        "status", namespace, {"status": {"succeeded": 1, "conditions": [condition]}}
    )
    assert status.status.succeeded == 1
    assert status.metadata.generation == 1
    # A status written through the main resource is ignored, as on a cluster.
    main = batch.patch_namespaced_job("status", namespace, {"status": {"failed": 3}})
    assert main.status.failed is None

    stale = batch.read_namespaced_job("status", namespace)
    suspended = batch.patch_namespaced_job("status", namespace, {"spec": {"suspend": True}})
    assert suspended.metadata.generation == 2
    assert int(suspended.metadata.resource_version) > int(stale.metadata.resource_version)
    stale.spec.suspend = False
    with pytest.raises(kubernetes.client.ApiException) as conflict:
        batch.replace_namespaced_job("status", namespace, stale)
    assert conflict.value.status == 409
    assert "the object has been modified" in message(conflict.value)


@pytest.mark.apiserver
def test_client_pod_strategic_patch_and_field_selectors(
    api: kubernetes.client.ApiClient, namespace: str
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, pod("trainer-0"))
    core.create_namespaced_pod(namespace, pod("trainer-1"))
    patched = core.patch_namespaced_pod(
        "trainer-0",
        namespace,
        {"spec": {"containers": [{"name": "trainer", "image": "kubetune/trainer:2"}]}},
    )
    images = {c.name: c.image for c in patched.spec.containers}
    assert images == {"trainer": "kubetune/trainer:2", "metrics": "kubetune/exporter:1"}

    core.patch_namespaced_pod_status(
        "trainer-0",
        namespace,
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
    )
    core.patch_namespaced_pod_status(
        "trainer-0",
        namespace,
        {"status": {"conditions": [{"type": "Initialized", "status": "True"}]}},
    )
    running = core.list_namespaced_pod(namespace, field_selector="status.phase=Running")
    assert [p.metadata.name for p in running.items] == ["trainer-0"]
    conditions = {c.type: c.status for c in running.items[0].status.conditions}
    assert conditions == {"Ready": "True", "Initialized": "True"}, "merged by type"
    pending = core.list_namespaced_pod(namespace, field_selector="status.phase!=Running")
    assert [p.metadata.name for p in pending.items] == ["trainer-1"]


# ------------------------------------------------- fake semantics: finalizers, GC, counts


@pytest.mark.apiserver
def test_finalizers_and_garbage_collection_in_the_fake(kube_env: KubeEnv, namespace: str) -> None:
    owner = kube_env.create(job("owner"), namespace)
    ref = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    kube_env.create(pod("owned", ownerReferences=[ref], finalizers=["test/hold"]), namespace)
    # batch/v1 Jobs orphan their Pods unless told otherwise (the Kubernetes default).
    orphan_owner = kube_env.create(job("orphaning"), namespace)
    orphan_ref = {**ref, "name": "orphaning", "uid": orphan_owner["metadata"]["uid"]}
    kube_env.create(pod("orphan", ownerReferences=[orphan_ref]), namespace)

    kube_env.delete("batch/v1", "Job", "orphaning", namespace)
    orphan = kube_env.wait_for_object(
        "v1", "Pod", "orphan", namespace, lambda p: "ownerReferences" not in p["metadata"]
    )
    assert orphan["metadata"].get("deletionTimestamp") is None

    kube_env.delete("batch/v1", "Job", "owner", namespace, propagation="Background")
    held = kube_env.wait_for_object(
        "v1", "Pod", "owned", namespace, lambda p: p["metadata"].get("deletionTimestamp")
    )
    assert held["metadata"]["finalizers"] == ["test/hold"]
    with pytest.raises(KubeApiError) as forbidden:
        kube_env.patch("v1", "Pod", "owned", {"metadata": {"finalizers": ["a", "b"]}}, namespace)
    assert forbidden.value.status == 422
    kube_env.patch("v1", "Pod", "owned", {"metadata": {"finalizers": None}}, namespace)
    assert kube_env.get("v1", "Pod", "owned", namespace) is None


@pytest.mark.apiserver
def test_request_counts_per_verb_and_resource(kube_env: KubeEnv, namespace: str) -> None:
    kube_env.path_for("v1", "ConfigMap")  # discovery (cached) outside the counted window
    kube_env.path_for(FTJ_API, "FineTuneJob")
    kube_env.reset_counts()
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "counted"}}
    kube_env.create(cm, namespace)
    kube_env.get("v1", "ConfigMap", "counted", namespace)
    kube_env.list("v1", "ConfigMap", namespace)
    kube_env.patch("v1", "ConfigMap", "counted", {"data": {"a": "1"}}, namespace)
    kube_env.create(smoke_job("counted", namespace))
    kube_env.patch(FTJ_API, "FineTuneJob", "counted", {"status": {"stage": "Pending"}},
                   namespace, subresource="status")  # fmt: skip
    assert kube_env.request_counts() == {
        ("create", "configmaps"): 1,
        ("get", "configmaps"): 1,
        ("list", "configmaps"): 1,
        ("patch", "configmaps"): 1,
        ("create", "finetunejobs.kubetune.io"): 1,
        ("patch", "finetunejobs.kubetune.io/status"): 1,
    }


@pytest.mark.apiserver
def test_injected_errors_answer_the_next_requests(kube_env: KubeEnv, namespace: str) -> None:
    assert kube_env.fake is not None
    kube_env.fake.inject_error("create", "configmaps", status=503, message="etcd is down", times=2)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flaky"}}
    for _ in range(2):
        with pytest.raises(KubeApiError) as failed:
            kube_env.create(cm, namespace)
        assert (failed.value.status, failed.value.body["message"]) == (503, "etcd is down")
    assert kube_env.create(cm, namespace)["metadata"]["name"] == "flaky"


def test_watch_resumes_from_history_and_expires_compacted_versions() -> None:
    with FakeKubeServer(history=3) as fake:
        config = kubernetes.client.Configuration(host=fake.base_url)
        with kubernetes.client.ApiClient(config) as client:
            core = kubernetes.client.CoreV1Api(client)
            versions = [
                core.create_namespaced_config_map(
                    "ns", {"metadata": {"name": f"cm-{i}"}}
                ).metadata.resource_version
                for i in range(5)
            ]
            resumed = kubernetes.watch.Watch().stream(
                core.list_namespaced_config_map,
                "ns",
                resource_version=versions[2],
                timeout_seconds=1,
            )
            assert [e["object"].metadata.name for e in resumed] == ["cm-3", "cm-4"]
            with pytest.raises(kubernetes.client.ApiException) as gone:
                list(
                    kubernetes.watch.Watch().stream(
                        core.list_namespaced_config_map,
                        "ns",
                        resource_version=versions[0],
                        timeout_seconds=1,
                    )
                )
            assert gone.value.status == 410
        assert fake.request_counts()[("watch", "configmaps")] == 2


# ------------------------------------------------------------- the real CRD server, routed


@pytest.mark.apiserver
def test_invalid_finetunejob_is_refused_with_the_cel_message(
    api: kubernetes.client.ApiClient, namespace: str
) -> None:
    case = load_case(CATALOG_DIR / "14-epochs-and-max-steps.yaml")
    manifest = copy.deepcopy(case.manifest)
    manifest["metadata"] = {"name": "two-lengths", "namespace": namespace}
    custom = kubernetes.client.CustomObjectsApi(api)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", namespace, "finetunejobs", manifest
        )
    assert refused.value.status == 422
    causes = {
        (c["field"], c["message"]) for c in json.loads(refused.value.body)["details"]["causes"]
    }
    assert (case.path, case.message) in causes


# -------------------------------------------------------------------- a real kopf operator


@pytest.mark.apiserver
def test_kopf_operator_creates_owned_child_patches_status_and_releases(
    kube_env: KubeEnv, namespace: str, kubeconfig: Path, kopf_registry: kopf.OperatorRegistry
) -> None:
    name = "kopf-smoke"
    args = ["run", "--standalone", "--namespace", namespace, str(OPERATOR)]
    kube_env.reset_counts()
    with KopfRunner(args, registry=kopf_registry, timeout=30) as runner:
        t0 = time.monotonic()
        ftj = kube_env.create(smoke_job(name, namespace))
        config_map = kube_env.wait_for_object("v1", "ConfigMap", f"{name}-config", namespace)
        created_after = time.monotonic() - t0
        (owner,) = config_map["metadata"]["ownerReferences"]
        assert owner["uid"] == ftj["metadata"]["uid"]
        assert owner["kind"] == "FineTuneJob"
        assert owner["controller"] is True
        assert config_map["data"] == {"model": "builtin://smollm2-135m-instruct"}

        handled = kube_env.wait_for_object(
            FTJ_API, "FineTuneJob", name, namespace, lambda j: "status" in j
        )
        assert handled["status"]["stage"] == "Pending"
        assert handled["status"]["observedGeneration"] == 1
        assert KOPF_FINALIZER in handled["metadata"]["finalizers"]
        (event,) = kube_env.wait_for(
            lambda: kube_env.list("v1", "Event", namespace), what="the operator's Event"
        )
        assert event["reason"] == "Created"
        assert event["message"] == f"Created ConfigMap {name}-config"
        assert event["involvedObject"]["uid"] == ftj["metadata"]["uid"]

        deleting = kube_env.delete(FTJ_API, "FineTuneJob", name, namespace)
        assert deleting is not None
        assert deleting["metadata"].get("deletionTimestamp"), "held by kopf's finalizer"
        kube_env.wait_for_absent(FTJ_API, "FineTuneJob", name, namespace)  # finalizer released
        kube_env.wait_for_absent("v1", "ConfigMap", f"{name}-config", namespace)  # collected
    assert runner.exception is None
    assert runner.exit_code == 0
    assert created_after < 5

    counts = kube_env.request_counts()
    assert counts[("create", "configmaps")] == 1
    assert counts[("watch", "finetunejobs.kubetune.io")] >= 1
    assert counts[("patch", "finetunejobs.kubetune.io/status")] >= 1
    assert counts[("create", "events")] >= 1
