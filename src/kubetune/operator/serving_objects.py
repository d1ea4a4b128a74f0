"""The objects a ModelDeployment owns, as plain dicts ready for the API server.

For a ModelDeployment `support-bot` the operator creates:

- a Deployment `support-bot`: init containers with the kubetune image fetch each artifact
  (`kubetune fetch`, sha256-verified against the run's manifest) into the model volume,
  then the vLLM OpenAI-compatible server (`vllm serve`, port 8000) reads it read-only;
- a Service `support-bot` (ClusterIP, port 8000 named `http`);
- a PodDisruptionBudget `support-bot`;
- with `autoscaling`, a HorizontalPodAutoscaler (autoscaling/v2, on a vLLM metric served
  by the Prometheus Adapter) or a KEDA ScaledObject (a Prometheus query);
- a ServiceMonitor when the Prometheus Operator's CRD is installed;
- a PersistentVolumeClaim `support-bot-model-cache` for `modelCache.type: PVC` without
  `claimName`.

The manifest digest of what is served is pinned in the pod template's
`kubetune.io/artifact-digest` annotation: a new artifact rolls the pods, the same one
changes nothing. Rendering is deterministic, so identical inputs give byte-identical
objects (a reconciler can compare them to what is in the cluster).

Pods follow the `restricted` Pod Security Standard like the trainer's. vLLM writes its
caches (Hugging Face, vLLM, Triton, torch.compile) under HOME and /tmp, so those are an
emptyDir; /dev/shm is memory-backed for tensor parallelism.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.meta import StorageKind, VolumeSpec
from kubetune.api.v1alpha1.modeldeployment import ServingResources
from kubetune.operator import names
from kubetune.operator.pod import (
    PVC_ROOT,
    container_security_context,
    pod_security_context,
    quantity,
)
from kubetune.operator.serving import (
    Autoscaler,
    ClusterFeatures,
    Resolution,
    ServingPlan,
    cache_claim_name,
    deployment_name,
    plan_serving,
    selector_labels,
    service_name,
    serving_labels,
)
from kubetune.operator.serving_args import MODELS_DIR, PORT, PORT_NAME, vllm_record
from kubetune.operator.serving_sources import FetchStep

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.modeldeployment import ModelDeployment
    from kubetune.operator.settings import OperatorSettings

CONTAINER_NAME = "vllm"
ANNOTATION_ARTIFACT_DIGEST = "kubetune.io/artifact-digest"
SCRATCH_DIR = "/scratch"
SCRATCH_SIZE = "20Gi"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
SCRAPE_INTERVAL = "15s"
TERMINATION_GRACE_SECONDS = 60
PROGRESS_DEADLINE_SECONDS = 3600
"""Fetching a large model and loading it can take a while before a rollout stalls."""
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURES = 180
"""Up to 30 minutes for vLLM to load the weights and capture CUDA graphs."""
KEDA_POLLING_SECONDS = 15
KEDA_COOLDOWN_SECONDS = 300
FETCH_RESOURCES = {
    "requests": {"cpu": "1", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}

VLLM_ENV = {
    "HOME": SCRATCH_DIR,
    "TMPDIR": "/tmp",
    "XDG_CACHE_HOME": f"{SCRATCH_DIR}/.cache",
    "XDG_CONFIG_HOME": f"{SCRATCH_DIR}/.config",
    "HF_HOME": f"{SCRATCH_DIR}/.cache/huggingface",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}
"""vLLM's caches (vLLM, Triton, torch.compile, FlashInfer) land in HOME, the XDG folders
and /tmp, all on the scratch volume. The model is local: no hub calls, and no usage
reports leave the cluster."""

FETCH_ENV = {
    "HOME": SCRATCH_DIR,
    "TMPDIR": "/tmp",
    "HF_HOME": f"{MODELS_DIR}/.cache/huggingface",
    "KUBETUNE_CACHE_DIR": f"{MODELS_DIR}/.cache/kubetune",
    "KUBETUNE_PVC_ROOT": PVC_ROOT,
    "PYTHONUNBUFFERED": "1",
}
"""Download caches go to the model volume (sized for models), not to the scratch volume."""


def owner_reference(md: ModelDeployment) -> dict[str, Any]:
    """The ownerReference that makes an object a child of `md`.

    Raises:
        ValueError: the ModelDeployment has no metadata.uid (it was not read from the
            cluster).
    """
    uid = (md.metadata.model_extra or {}).get("uid")
    if not isinstance(uid, str) or not uid:
        raise ValueError(
            f"ModelDeployment {md.metadata.name} has no metadata.uid: read it from the API server"
        )
    return {
        "apiVersion": md.api_version,
        "kind": md.kind,
        "name": md.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_hash(md: ModelDeployment) -> str:
    """sha256 (hex) of the whole spec, for the `kubetune.io/spec-hash` annotation."""
    wire = md.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    text = json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _labels(md: ModelDeployment) -> dict[str, str]:
    return {**(md.metadata.labels or {}), **serving_labels(md.metadata.name or "")}


def _metadata(md: ModelDeployment, name: str, **annotations: str) -> dict[str, Any]:
    if not md.metadata.name or not md.metadata.namespace:
        raise ValueError("the ModelDeployment needs metadata.name and metadata.namespace")
    return {
        "name": name,
        "namespace": md.metadata.namespace,
        "labels": _labels(md),
        "annotations": {names.ANNOTATION_SPEC_HASH: spec_hash(md), **annotations},
        "ownerReferences": [owner_reference(md)],
    }


# --- The pod ---------------------------------------------------------------------------


def _env(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": key, "value": value} for key, value in values.items()]


def _claims(plan: ServingPlan) -> dict[str, str]:
    """pvc:// sources → volume name, in a stable order."""
    claims = sorted({step.claim for step in plan.fetches if step.claim})
    return {claim: f"pvc-{index}" for index, claim in enumerate(claims)}


def _fetch_container(
    step: FetchStep, settings: OperatorSettings, claims: dict[str, str]
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": MODELS_DIR},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
    ]
    if step.claim:
        mounts.append(
            {
                "name": claims[step.claim],
                "mountPath": f"{PVC_ROOT}/{step.claim}",
                "readOnly": True,
            }
        )
    return {
        "name": step.container,
        "image": settings.trainer_image,
        "command": ["kubetune"],
        "args": step.args(),
        "env": _env(FETCH_ENV) + [use.to_env() for use in step.credentials],
        "resources": copy.deepcopy(FETCH_RESOURCES),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _probe(period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": HEALTH_PATH, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _vllm_container(
    plan: ServingPlan, resources: ServingResources, settings: OperatorSettings
) -> dict[str, Any]:
    amounts = {
        "cpu": quantity(resources.cpu or settings.default_cpu),
        "memory": quantity(resources.memory or settings.default_memory),
    }
    if plan.gpus > 0:
        amounts[plan.gpu_resource] = str(plan.gpus)
    return {
        "name": CONTAINER_NAME,
        "image": plan.image,
        "command": list(vllm_record().entrypoint),
        "args": list(plan.vllm_args),
        "env": _env(VLLM_ENV),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "securityContext": container_security_context(),
        "startupProbe": _probe(STARTUP_PERIOD_SECONDS, STARTUP_FAILURES, 5),
        "readinessProbe": _probe(5, 3, 5),
        "livenessProbe": _probe(10, 6, 10),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _models_volume(
    cache: VolumeSpec | None, md_name: str, settings: OperatorSettings
) -> dict[str, Any]:
    spec = cache or VolumeSpec()
    if spec.type == StorageKind.EMPTY_DIR:
        size = quantity(spec.size or settings.default_scratch_size)
        return {"name": "models", "emptyDir": {"sizeLimit": size}}
    claim = spec.claim_name or cache_claim_name(md_name)
    return {"name": "models", "persistentVolumeClaim": {"claimName": claim}}


def build_pod_template(
    md: ModelDeployment, plan: ServingPlan, settings: OperatorSettings
) -> dict[str, Any]:
    """The pod template of the serving Deployment."""
    md_name = md.metadata.name or ""
    resources = md.spec.resources or ServingResources()
    claims = _claims(plan)
    volumes = [
        _models_volume(md.spec.model_cache, md_name, settings),
        {"name": "scratch", "emptyDir": {"sizeLimit": SCRATCH_SIZE}},
        {
            "name": "shm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": quantity(resources.shm_size or settings.default_shm_size),
            },
        },
        *(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            for claim, volume in claims.items()
        ),
    ]
    pod: dict[str, Any] = {
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": pod_security_context(settings),
        "initContainers": [_fetch_container(s, settings, claims) for s in plan.fetches],
        "containers": [_vllm_container(plan, resources, settings)],
        "volumes": volumes,
    }
    if plan.node_selector:
        pod["nodeSelector"] = dict(plan.node_selector)
    if resources.tolerations:
        pod["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True)
            for t in resources.tolerations
        ]
    if resources.affinity:
        pod["affinity"] = copy.deepcopy(resources.affinity)
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return {
        "metadata": {
            "labels": _labels(md),
            "annotations": {
                ANNOTATION_ARTIFACT_DIGEST: plan.artifact_digest,
                names.ANNOTATION_DEFAULT_CONTAINER: CONTAINER_NAME,
            },
        },
        "spec": pod,
    }


# --- The objects -----------------------------------------------------------------------


def build_deployment(
    md: ModelDeployment, plan: ServingPlan, settings: OperatorSettings
) -> dict[str, Any]:
    """The apps/v1 Deployment. With an autoscaler, `replicas` is left out so that the
    autoscaler owns it (the API server starts it at 1)."""
    md_name = md.metadata.name or ""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(md_name)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
        "template": build_pod_template(md, plan, settings),
    }
    if plan.replicas is not None:
        spec["replicas"] = plan.replicas
    annotations = {ANNOTATION_ARTIFACT_DIGEST: plan.artifact_digest, **plan.lineage_annotations}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(md, deployment_name(md_name), **annotations),
        "spec": spec,
    }


def build_service(md: ModelDeployment) -> dict[str, Any]:
    """The ClusterIP Service in front of the vLLM pods (port 8000, named http)."""
    md_name = md.metadata.name or ""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(md, service_name(md_name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(md_name),
            "ports": [
                {"name": PORT_NAME, "port": PORT, "targetPort": PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


def build_pod_disruption_budget(md: ModelDeployment, plan: ServingPlan) -> dict[str, Any]:
    """The PodDisruptionBudget: with more than one replica expected, a drain keeps at least
    one serving (minAvailable 1); with one, a drain may take it (maxUnavailable 1) rather
    than block the node forever. Crash-looping pods never block a drain."""
    md_name = md.metadata.name or ""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(md_name)},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    if plan.min_replicas > 1:
        spec["minAvailable"] = 1
    else:
        spec["maxUnavailable"] = 1
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(md, deployment_name(md_name)),
        "spec": spec,
    }


def _target_ref(md_name: str) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name(md_name)}


def build_hpa(md: ModelDeployment, plan: ServingPlan) -> dict[str, Any]:
    """The autoscaling/v2 HorizontalPodAutoscaler: the per-pod average of a vLLM metric,
    read through the custom metrics API (the Prometheus Adapter)."""
    auto = md.spec.autoscaling
    if auto is None or plan.metric is None:
        raise ValueError("the ModelDeployment has no autoscaling")
    md_name = md.metadata.name or ""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(md, deployment_name(md_name)),
        "spec": {
            "scaleTargetRef": _target_ref(md_name),
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": plan.metric},
                        "target": {"type": "AverageValue", "averageValue": auto.target},
                    },
                }
            ],
        },
    }


def prometheus_query(metric: str, namespace: str, deployment: str) -> str:
    """The sum of a vLLM metric over the Deployment's pods (KEDA divides by replicas)."""
    pods = f"{deployment}-[a-z0-9]+-[a-z0-9]+"
    return f'sum({metric}{{namespace="{namespace}",pod=~"{pods}"}}) or vector(0)'


def build_scaled_object(
    md: ModelDeployment, plan: ServingPlan, features: ClusterFeatures
) -> dict[str, Any]:
    """The KEDA ScaledObject (keda.sh/v1alpha1) with a Prometheus trigger."""
    auto = md.spec.autoscaling
    if auto is None or plan.metric is None or features.prometheus_url is None:
        raise ValueError("KEDA needs autoscaling and the Prometheus URL")
    md_name = md.metadata.name or ""
    query = prometheus_query(plan.metric, md.metadata.namespace or "", deployment_name(md_name))
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(md, deployment_name(md_name)),
        "spec": {
            "scaleTargetRef": _target_ref(md_name),
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "pollingInterval": KEDA_POLLING_SECONDS,
            "cooldownPeriod": KEDA_COOLDOWN_SECONDS,
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": features.prometheus_url,
                        "query": query,
                        "threshold": auto.target,
                    },
                }
            ],
        },
    }


def build_service_monitor(md: ModelDeployment) -> dict[str, Any]:
    """The Prometheus Operator ServiceMonitor scraping vLLM's /metrics."""
    md_name = md.metadata.name or ""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(md, service_name(md_name)),
        "spec": {
            "selector": {"matchLabels": selector_labels(md_name)},
            "namespaceSelector": {"matchNames": [md.metadata.namespace]},
            "endpoints": [{"port": PORT_NAME, "path": METRICS_PATH, "interval": SCRAPE_INTERVAL}],
        },
    }


def build_cache_claim(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any] | None:
    """The model-cache claim the operator creates (`modelCache.type: PVC` without
    `claimName`): ReadWriteMany, since every replica mounts it."""
    cache = md.spec.model_cache
    if cache is None or cache.type != StorageKind.PVC or cache.claim_name:
        return None
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {
            "requests": {"storage": quantity(cache.size or settings.default_scratch_size)}
        },
    }
    if cache.storage_class_name:
        claim["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(md, cache_claim_name(md.metadata.name or "")),
        "spec": claim,
    }


@dataclass(frozen=True)
class ServingChildren:
    """Everything a ModelDeployment owns.

    Attributes:
        deployment: the vLLM Deployment.
        service: its ClusterIP Service.
        pod_disruption_budget: its PodDisruptionBudget.
        autoscaler: the HorizontalPodAutoscaler or KEDA ScaledObject, if any.
        service_monitor: the ServiceMonitor, when its CRD is installed.
        cache_claim: the model-cache claim the operator creates, if any.
        plan: the decisions behind them.
    """

    deployment: dict[str, Any]
    service: dict[str, Any]
    pod_disruption_budget: dict[str, Any]
    autoscaler: dict[str, Any] | None
    service_monitor: dict[str, Any] | None
    cache_claim: dict[str, Any] | None
    plan: ServingPlan

    @property
    def objects(self) -> list[dict[str, Any]]:
        """The objects in creation order: what the pods mount first, the Deployment, then
        what watches it."""
        ordered = [
            self.cache_claim,
            self.service,
            self.deployment,
            self.pod_disruption_budget,
            self.autoscaler,
            self.service_monitor,
        ]
        return [o for o in ordered if o is not None]


def build_serving_children(
    md: ModelDeployment, plan: ServingPlan, settings: OperatorSettings, features: ClusterFeatures
) -> ServingChildren:
    """Every object of a planned ModelDeployment.

    Raises:
        ValueError: the ModelDeployment lacks metadata.name, namespace or uid.
    """
    autoscaler = None
    if plan.autoscaler == Autoscaler.HPA:
        autoscaler = build_hpa(md, plan)
    elif plan.autoscaler == Autoscaler.KEDA:
        autoscaler = build_scaled_object(md, plan, features)
    return ServingChildren(
        deployment=build_deployment(md, plan, settings),
        service=build_service(md),
        pod_disruption_budget=build_pod_disruption_budget(md, plan),
        autoscaler=autoscaler,
        service_monitor=build_service_monitor(md) if features.servicemonitor_crd else None,
        cache_claim=build_cache_claim(md, settings),
        plan=plan,
    )


def build_serving(
    md: ModelDeployment,
    resolution: Resolution,
    settings: OperatorSettings,
    features: ClusterFeatures,
) -> ServingChildren:
    """Plan and render a ModelDeployment.

    Raises:
        ServingError: it cannot be served as specified (every problem, each naming its
            field).
        ValueError: it lacks metadata.name, namespace or uid, or an artifact is missing
            from `resolution` without a problem saying why.
    """
    owner_reference(md)
    return build_serving_children(
        md, plan_serving(md, resolution, settings, features), settings, features
    )
