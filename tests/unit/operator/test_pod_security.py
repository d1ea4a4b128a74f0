"""Every pod the operator renders passes the `restricted` Pod Security Standard, and more.

The builders' own tests check each pod's security context field by field; this file checks
the rules themselves (Kubernetes' `restricted` profile, baseline included) over a matrix of
spec and settings variants: training Jobs (one node, Indexed multi-node, every example
job, scratch and data claims, tolerations, a service account, pull Secrets, another user
id), the artifact cleanup Pod, and serving Deployments (merged, quantized, adapter,
multi-LoRA on a private base with its fetch init containers, claims, autoscaling). Beyond
the profile: a read-only root file system everywhere, no user or group 0, no host
namespaces, ports or paths, and no service account token in any pod.

Which pods need the Kubernetes API: none. The trainer and `kubetune fetch` talk to the
artifact store and the Hub only; vLLM serves HTTP. A training Job or cleanup Pod that names
`spec.resources.serviceAccountName` leaves `automountServiceAccountToken` to that service
account (workload identity and Vault agents authenticate with its token); the operator's
own Deployment (the Helm chart) is the only kubetune pod that calls the API.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from test_builders import EXAMPLES, NAMESPACE, RUN_ID, SETTINGS, UID, make_job
from test_serving import SETTINGS as SERVING_SETTINGS
from test_serving import artifact, make_md, multi_md, multi_resolution

from kubetune.api.uris import is_local
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, Variant
from kubetune.operator.children import build_children, build_cleanup_pod
from kubetune.operator.serving import ClusterFeatures, Resolution
from kubetune.operator.serving_objects import build_serving
from kubetune.operator.settings import OperatorSettings

RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
"""Volume types the `restricted` profile allows (no hostPath, nfs, iscsi, …)."""
ALLOWED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
"""The only capability the `restricted` profile lets a container add."""
SECCOMP_OK = frozenset({"RuntimeDefault", "Localhost"})
POD_SPEC_KEYS = frozenset(
    {
        "restartPolicy",
        "terminationGracePeriodSeconds",
        "activeDeadlineSeconds",
        "enableServiceLinks",
        "automountServiceAccountToken",
        "serviceAccountName",
        "securityContext",
        "initContainers",
        "containers",
        "volumes",
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "imagePullSecrets",
        "subdomain",
    }
)
"""Pod fields the builders may set. A new one (hostNetwork, shareProcessNamespace, …)
fails here until it is reviewed and added."""


def _containers(pod: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _effective(pod: Mapping[str, Any], container: Mapping[str, Any], field: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    own = (container.get("securityContext") or {}).get(field)
    return own if own is not None else (pod.get("securityContext") or {}).get(field)


def violations(pod: Mapping[str, Any]) -> list[str]:
    """What in a pod spec breaks the `restricted` profile or kubetune's own rules."""
    found = []
    context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC", "hostUsers", "shareProcessNamespace"):
        if flag in pod:
            found.append(f"pod sets {flag}")
    unknown = set(pod) - POD_SPEC_KEYS
    if unknown:
        found.append(f"pod sets unreviewed fields {sorted(unknown)}")
    if context.get("sysctls"):
        found.append("pod sets sysctls")
    if context.get("fsGroup") == 0 or context.get("runAsGroup") == 0:
        found.append("pod runs with group 0")
    if pod.get("automountServiceAccountToken") is not False and "serviceAccountName" not in pod:
        found.append("pod mounts the default service account token")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} is {sorted(kinds)}")
    for container in _containers(pod):
        name = container["name"]
        own = container.get("securityContext") or {}
        if own.get("privileged"):
            found.append(f"{name}: privileged")
        if own.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if own.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: the root file system is writable")
        if own.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {own['procMount']}")
        if (own.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{name}: hostProcess")
        capabilities = own.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities not dropped")
        if set(capabilities.get("add") or []) - ALLOWED_CAPABILITIES:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if _effective(pod, container, "runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if _effective(pod, container, "runAsUser") == 0:
            found.append(f"{name}: runs as user 0")
        if _effective(pod, container, "runAsGroup") == 0:
            found.append(f"{name}: runs as group 0")
        seccomp = (_effective(pod, container, "seccompProfile") or {}).get("type")
        if seccomp not in SECCOMP_OK:
            found.append(f"{name}: seccomp {seccomp}")
        selinux = _effective(pod, container, "seLinuxOptions") or {}
        if selinux.get("user") or selinux.get("role"):
            found.append(f"{name}: sets an SELinux user or role")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{name}: hostPort {port['hostPort']}")
    return found


# --- The pods -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPod:
    """One pod spec the operator renders, and where it came from."""

    source: str
    spec: Mapping[str, Any]
    needs_api: bool = False
    """Whether the pod may carry a service account token (it names a service account)."""


def _pods_of(objects: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(kind, pod spec) of every object holding a pod; every kind here is a known one."""
    pods = []
    for obj in objects:
        if obj["kind"] == "Pod":
            pods.append(("Pod", obj["spec"]))
        elif "template" in (obj.get("spec") or {}):
            pods.append((obj["kind"], obj["spec"]["template"]["spec"]))
    assert {kind for kind, _ in pods} <= {"Job", "Pod", "Deployment"}, pods
    return pods


def _training(name: str, job: FineTuneJob, settings: OperatorSettings) -> list[RenderedPod]:
    children = build_children(job, settings, RUN_ID)
    root = f"{job.spec.output.uri}/{NAMESPACE}/{job.metadata.name}"  # type: ignore[union-attr]
    cleanup = build_cleanup_pod(job, settings, [root])
    named = bool(job.spec.resources and job.spec.resources.service_account_name)
    return [
        RenderedPod(f"{name}: {kind}", spec, needs_api=named)
        for kind, spec in _pods_of([*children.objects, cleanup])
    ]


def _example_jobs() -> list[tuple[str, FineTuneJob]]:
    jobs = []
    for path in EXAMPLES:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if not document or document.get("kind") != "FineTuneJob":
                continue
            document = copy.deepcopy(document)
            document["metadata"].update(namespace=NAMESPACE, uid=UID)
            output = document["spec"].setdefault("output", {"uri": "s3://ml-artifacts/kubetune"})
            if is_local(output["uri"]):
                output["uri"] = "s3://ml-artifacts/kubetune"
            jobs.append((f"{path.stem}-{index}", FineTuneJob.model_validate(document)))
    return jobs


GPU = {"gpus": 1, "gpuClass": "h100-80gb"}
JOB_VARIANTS: dict[str, tuple[dict[str, Any], OperatorSettings]] = {
    "one-gpu": ({"resources": GPU}, SETTINGS),
    "indexed-multi-node": (
        {"resources": GPU, "distributed": {"nodes": 3, "strategy": "FSDP"}},
        SETTINGS,
    ),
    "scratch-claim-and-pvc-data": (
        {
            "dataset": {"uri": "pvc://datasets/support/*.jsonl"},
            "output": {"uri": "pvc://artifacts/runs", "deletePolicy": "Delete"},
            "resources": {**GPU, "scratch": {"type": "PVC", "size": "200Gi"}},
        },
        SETTINGS,
    ),
    "multi-node-ephemeral-scratch": (
        {
            "resources": {**GPU, "scratch": {"type": "PVC", "size": "200Gi"}},
            "distributed": {"nodes": 2, "strategy": "DDP"},
        },
        SETTINGS,
    ),
    "scheduling-and-pull-secrets": (
        {
            "resources": {
                **GPU,
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "priorityClassName": "training-low",
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}
                            ]
                        }
                    }
                },
            }
        },
        SETTINGS.model_copy(
            update={"image_pull_secrets": ["registry"], "run_as_user": 65532, "fs_group": 65532}
        ),
    ),
    "named-service-account": (
        {
            "resources": {**GPU, "serviceAccountName": "s3-reader"},
            "output": {"uri": "s3://ml-artifacts/kubetune", "deletePolicy": "Delete"},
        },
        SETTINGS,
    ),
}


def _serving(name: str, md: ModelDeployment, resolution: Resolution) -> list[RenderedPod]:
    features = ClusterFeatures(
        keda_installed=True,
        servicemonitor_crd=True,
        prometheus_url="http://prometheus-operated.monitoring.svc:9090",
    )
    children = build_serving(md, resolution, SERVING_SETTINGS, features)
    return [RenderedPod(f"{name}: {kind}", spec) for kind, spec in _pods_of(children.objects)]


def serving_variants() -> dict[str, tuple[ModelDeployment, Resolution]]:
    by_variant = {
        v.value: (
            make_md(model={"fineTuneJobRef": {"name": "support-bot"}, "variant": v.value}),
            Resolution(model=artifact(v)),
        )
        for v in (Variant.MERGED, Variant.W4A16, Variant.ADAPTER)
    }
    return {
        **by_variant,
        "multi-lora-private-base": (
            multi_md(
                "billing",
                "tickets",
                credentialsSecretRef={"name": "s3-credentials"},
                resources={"gpus": 2, "gpuClass": "h100-80gb"},
                vllm={"tensorParallelSize": 2},
            ),
            multi_resolution("billing", "tickets"),
        ),
        "pvc-model-cache-and-autoscaling": (
            make_md(
                modelCache={"type": "PVC", "size": "100Gi"},
                autoscaling={"minReplicas": 1, "maxReplicas": 4},
            ),
            Resolution(model=artifact(Variant.MERGED)),
        ),
        "pvc-artifact": (
            make_md(model={"uri": "pvc://models/ml-team/support-bot/4f702c671992"}),
            Resolution(
                model=artifact(
                    Variant.MERGED, run_uri="pvc://models/ml-team/support-bot/4f702c671992"
                )
            ),
        ),
    }


def rendered_pods() -> list[Any]:
    pods: list[RenderedPod] = []
    for name, (spec, settings) in JOB_VARIANTS.items():
        pods += _training(name, make_job(**spec), settings)
    for name, job in _example_jobs():
        pods += _training(name, job, SETTINGS.model_copy(update={"allow_builtin_random": True}))
    for name, (md, resolution) in serving_variants().items():
        pods += _serving(name, md, resolution)
    return [pytest.param(pod, id=pod.source.replace(" ", "")) for pod in pods]


@pytest.mark.parametrize("pod", rendered_pods())
def test_every_rendered_pod_is_restricted(pod: RenderedPod) -> None:
    assert violations(pod.spec) == []
    if pod.needs_api:
        assert "automountServiceAccountToken" not in pod.spec  # the account decides
    else:
        assert pod.spec["automountServiceAccountToken"] is False


def test_the_matrix_covers_every_kind_of_pod() -> None:
    sources = [p.values[0].source for p in rendered_pods()]
    assert any("Job" in s and "indexed" in s for s in sources)
    assert any(s.endswith(": Pod") for s in sources)  # the cleanup pod
    serving = [p.values[0] for p in rendered_pods() if "Deployment" in p.values[0].source]
    assert any(pod.spec.get("initContainers") for pod in serving)  # fetch init containers


BAD_PODS: dict[str, tuple[dict[str, Any], str]] = {
    "host-network": ({"hostNetwork": True}, "hostNetwork"),
    "host-pid": ({"hostPID": True}, "hostPID"),
    "host-path": ({"volumes": [{"name": "v", "hostPath": {"path": "/"}}]}, "hostPath"),
    "token": ({"automountServiceAccountToken": True}, "token"),
    "root-user": ({"securityContext": {"runAsUser": 0}}, "user 0"),
    "escalation": ({"container": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
    "writable-root": ({"container": {"readOnlyRootFilesystem": False}}, "writable"),
    "capabilities": ({"container": {"capabilities": {"add": ["SYS_ADMIN"]}}}, "SYS_ADMIN"),
    "privileged": ({"container": {"privileged": True}}, "privileged"),
    "unconfined": ({"container": {"seccompProfile": {"type": "Unconfined"}}}, "seccomp"),
    "host-port": ({"ports": [{"containerPort": 80, "hostPort": 80}]}, "hostPort"),
}


@pytest.mark.parametrize("case", sorted(BAD_PODS))
def test_the_check_catches_each_rule(case: str) -> None:
    """The check itself can fail: break one rule of a rendered pod at a time."""
    change, expected = BAD_PODS[case]
    pod = copy.deepcopy(dict(_training("base", make_job(resources=GPU), SETTINGS)[0].spec))
    container = pod["containers"][0]
    for key, value in change.items():
        if key == "container":
            container["securityContext"].update(value)
        elif key == "ports":
            container["ports"] = value
        elif key == "securityContext":
            container["securityContext"].update(value)
        else:
            pod[key] = value
    found = violations(pod)
    assert any(expected in problem for problem in found), found
