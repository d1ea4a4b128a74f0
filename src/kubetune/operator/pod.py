"""The training pod: what runs `python -m kubetune.trainer`, and how it is locked down.

`plan_trainer` checks what only a cluster refuses (local paths, a missing output, random
weights, credentials that collide, GPUs that cannot fit) and collects every problem at
once, each naming its field; `build_pod_template` then renders the pod.

The pod follows the `restricted` Pod Security Standard: non-root, read-only root file
system, no capabilities, RuntimeDefault seccomp, no service account token unless the job
names a service account. Everything writable is a volume: the scratch volume at /scratch
(HOME, TMPDIR, the Hugging Face and kubetune caches, the work directory; its tmp/ folder is
also /tmp for libraries that ignore TMPDIR), /dev/shm in memory, and the `pvc://` claims the
spec names under /mnt/kubetune/pvc/<claim>. Credentials reach the pod only as Secret
references (`valueFrom.secretKeyRef`); the operator never reads a Secret's values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import JUDGE_API_KEY_ENV, Reason
from kubetune.api.meta import SecretRef, StorageKind, VolumeSpec
from kubetune.api.uris import is_local, scheme
from kubetune.api.v1alpha1.dataset import DatasetSpec
from kubetune.api.v1alpha1.resources import ResourcesSpec
from kubetune.operator import names
from kubetune.operator.sizing import GPUSizing, SizingError, size_gpus

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.finetunejob import FineTuneJob, FineTuneJobSpec
    from kubetune.operator.settings import OperatorSettings

CONTAINER_NAME = "trainer"
CONFIG_KEY = "trainer-config.json"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
SCRATCH_DIR = "/scratch"
WORK_DIR = f"{SCRATCH_DIR}/work"
PVC_ROOT = "/mnt/kubetune/pvc"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT_NAME = "metrics"
RENDEZVOUS_PORT_NAME = "rendezvous"
GIB = 2**30

SCRATCH_ENV = {
    "HOME": f"{SCRATCH_DIR}/home",
    "TMPDIR": f"{SCRATCH_DIR}/tmp",
    "HF_HOME": f"{SCRATCH_DIR}/huggingface",
    "KUBETUNE_CACHE_DIR": f"{SCRATCH_DIR}/cache",
}
"""Every cache and temporary file goes to the scratch volume (the root is read-only)."""

OUTPUT_FIELD = "spec.output.uri"
URI_KEYS = frozenset({"uri", "uris", "modelUri"})
"""Wire names of the spec fields holding model, data or artifact locations."""

# Keys read from a credentials Secret, by URI scheme: (environment variable = Secret key,
# required). The trainer reads them from its environment (storage.s3, trainer.resolve).
S3_KEYS = (
    ("AWS_ACCESS_KEY_ID", True),
    ("AWS_SECRET_ACCESS_KEY", True),
    ("AWS_SESSION_TOKEN", False),
    ("AWS_REGION", False),
    ("AWS_DEFAULT_REGION", False),
    ("AWS_ENDPOINT_URL", False),
    ("AWS_ENDPOINT_URL_S3", False),
)
HF_KEYS = (("HF_TOKEN", True), ("HF_ENDPOINT", False))
HTTPS_KEYS = (("KUBETUNE_HTTPS_TOKEN", True),)
CREDENTIAL_KEYS: dict[str, tuple[tuple[str, bool], ...]] = {
    "s3": S3_KEYS,
    "hf": HF_KEYS,
    "https": HTTPS_KEYS,
}


@dataclass(frozen=True)
class Problem:
    """One thing in a spec that keeps it from running in the cluster."""

    field: str
    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(Exception):
    """The spec cannot run in the cluster. `problems` lists every reason, each naming its
    field; `reason` is the first one's (for the `Succeeded` condition)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = tuple(problems)

    @property
    def reason(self) -> Reason:
        return self.problems[0].reason


@dataclass(frozen=True)
class SecretUse:
    """One environment variable of the pod filled from a Secret key.

    Attributes:
        field: the spec field that references the Secret.
        secret: name of the Secret (in the job's namespace).
        key: key in the Secret.
        env: environment variable of the trainer container.
        optional: whether the pod starts without it.
    """

    field: str
    secret: str
    key: str
    env: str
    optional: bool

    def to_env(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": self.secret, "key": self.key}
        if self.optional:
            ref["optional"] = True
        return {"name": self.env, "valueFrom": {"secretKeyRef": ref}}


@dataclass(frozen=True)
class TrainerPlan:
    """What `plan_trainer` decided for the pod of one job.

    Attributes:
        sizing: GPUs, GPU class and grace period.
        nodes: pods of the run (an Indexed Job when more than one).
        credentials: Secret keys the trainer gets as environment variables.
        claims: `pvc://` claims to mount, claim name → read-only.
        node_selector: the GPU class's node labels merged with the spec's.
        memory: the pod's memory request and limit (`pod_memory`).
        notes: what the user should know (e.g. how Auto was sized).
    """

    sizing: GPUSizing
    nodes: int
    credentials: tuple[SecretUse, ...]
    claims: dict[str, bool]
    node_selector: dict[str, str]
    memory: str
    notes: tuple[str, ...] = ()


def _walk(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}"
            if key in URI_KEYS and isinstance(item, str):
                yield child, item
            elif key in URI_KEYS and isinstance(item, list):
                yield from ((f"{child}[{i}]", u) for i, u in enumerate(item) if isinstance(u, str))
            else:
                yield from _walk(item, child)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def spec_uris(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every model, dataset, suite and artifact location in the spec,
    e.g. ("spec.dataset.uris[1]", "s3://b/k")."""
    return list(_walk(spec.model_dump(mode="json", by_alias=True, exclude_none=True), "spec"))


def check_cluster_spec(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[Problem]:
    """What keeps a valid spec from running in the cluster: local paths, a missing output,
    random weights the settings do not allow."""
    problems = []
    if spec.output is None:
        problems.append(
            Problem(
                "spec.output",
                Reason.INVALID_SPEC,
                "a cluster run needs an artifact store: set spec.output.uri to "
                "s3://bucket/prefix or pvc://claim/path",
            )
        )
    for field, uri in spec_uris(spec):
        if is_local(uri):
            where = (
                "use s3://bucket/prefix or pvc://claim/path"
                if field == OUTPUT_FIELD
                else "upload it to s3:// or a PersistentVolumeClaim (pvc://claim/path), or "
                "use hf://"
            )
            problems.append(
                Problem(
                    field,
                    Reason.LOCAL_URI_IN_CLUSTER,
                    f"{uri} is a local path that only `kubetune run` on your machine can "
                    f"read: {where}",
                )
            )
        elif uri.startswith("builtin://random/") and not settings.allow_builtin_random:
            problems.append(
                Problem(
                    field,
                    Reason.INVALID_SPEC,
                    f"{uri} has random weights (for benchmarks and tests) and the operator "
                    "settings do not allow it: use a real model, or ask the platform team to "
                    "set allowBuiltinRandom",
                )
            )
    return problems


def _dataset_uris(dataset: DatasetSpec) -> list[str]:
    uris = [dataset.uri] if dataset.uri else list(dataset.uris or [])
    if dataset.validation and dataset.validation.uri:
        uris.append(dataset.validation.uri)
    return uris


def _credential_sources(
    spec: FineTuneJobSpec, settings: OperatorSettings
) -> Iterator[tuple[str, SecretRef | None, list[str]]]:
    yield "spec.model.credentialsSecretRef", spec.model.credentials_secret_ref, [spec.model.uri]
    datasets: list[tuple[str, DatasetSpec | None]] = [("spec.dataset", spec.dataset)]
    datasets += [(f"spec.stages[{i}].dataset", s.dataset) for i, s in enumerate(spec.stages)]
    if spec.evaluation and spec.evaluation.eval_dataset:
        datasets.append(("spec.evaluation.evalDataset", spec.evaluation.eval_dataset))
    for path, dataset in datasets:
        if dataset is not None:
            yield (
                f"{path}.credentialsSecretRef",
                dataset.credentials_secret_ref,
                _dataset_uris(dataset),
            )
    if spec.output is not None:
        ref = spec.output.credentials_secret_ref
        if ref is None and settings.default_output_credentials_secret:
            ref = SecretRef(name=settings.default_output_credentials_secret)
        yield "spec.output.credentialsSecretRef", ref, [spec.output.uri]


def secret_uses(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[SecretUse]:
    """Every Secret key the training pod reads, with the field that asks for it.

    A credentials Secret gives the keys its sources' schemes need: AWS_* for s3://, HF_TOKEN
    (and HF_ENDPOINT) for hf://, KUBETUNE_HTTPS_TOKEN for https://; the judge's API key goes
    to KUBETUNE_JUDGE_API_KEY. The handler can check these exist before creating the Job
    (Reason SecretNotFound).
    """
    uses = []
    for field, ref, uris in _credential_sources(spec, settings):
        if ref is None:
            continue
        schemes = {scheme(u) for u in uris}
        for kind, keys in CREDENTIAL_KEYS.items():
            if kind in schemes:
                uses += [SecretUse(field, ref.name, key, key, not req) for key, req in keys]
    judge = spec.evaluation.judge if spec.evaluation else None
    if judge is not None and judge.api_key_secret_ref is not None:
        ref_key = judge.api_key_secret_ref
        uses.append(
            SecretUse(
                "spec.evaluation.judge.apiKeySecretRef",
                ref_key.name,
                ref_key.key,
                JUDGE_API_KEY_ENV,
                False,
            )
        )
    return uses


def merge_credentials(uses: list[SecretUse]) -> tuple[list[SecretUse], list[Problem]]:
    """One entry per environment variable; two different Secret keys for the same variable
    are a problem (the pod has one environment), reported once per pair of fields."""
    merged: dict[str, SecretUse] = {}
    clashes: dict[tuple[str, str, str, str], list[str]] = {}
    for use in uses:
        first = merged.get(use.env)
        if first is None:
            merged[use.env] = use
        elif (first.secret, first.key) == (use.secret, use.key):
            if first.optional and not use.optional:
                merged[use.env] = use
        else:
            pair = (first.field, first.secret, use.field, use.secret)
            clashes.setdefault(pair, []).append(use.env)
    problems = [
        Problem(
            field,
            Reason.INVALID_SPEC,
            f"Secret {secret} would set {', '.join(envs)}, which Secret {first_secret} "
            f"({first_field}) already sets, and the training pod has one environment: "
            "reference one Secret holding the keys of both",
        )
        for (first_field, first_secret, field, secret), envs in clashes.items()
    ]
    return list(merged.values()), problems


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by `pvc://` URIs → read-only (all but the output's claim)."""
    claims: dict[str, bool] = {}
    for field, uri in spec_uris(spec):
        if scheme(uri) == "pvc":
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            claims[claim] = claims.get(claim, True) and field != OUTPUT_FIELD
    return dict(sorted(claims.items()))


def _merge_node_selector(
    sizing: GPUSizing, resources: ResourcesSpec
) -> tuple[dict[str, str], list[Problem]]:
    merged = dict(sizing.node_selector)
    problems = []
    for key, value in (resources.node_selector or {}).items():
        if merged.get(key, value) != value:
            name = sizing.gpu_class.name if sizing.gpu_class else "the GPU class"
            problems.append(
                Problem(
                    f"spec.resources.nodeSelector.{key}",
                    Reason.INVALID_SPEC,
                    f"{value!r} contradicts GPU class {name}, which selects {key}: "
                    f"{merged[key]!r}; remove the label or choose another gpuClass",
                )
            )
        merged[key] = value
    return merged, problems


def pod_memory(
    resources: ResourcesSpec, sizing: GPUSizing, settings: OperatorSettings
) -> tuple[str, str]:
    """The training pod's memory and a note: `resources.memory` when set, else the
    settings' default plus the pinned host memory that activation offload takes for each
    GPU of the pod (the note says so; rounded up to whole GiB)."""
    if resources.memory:
        return quantity(resources.memory), ""
    default = quantity(settings.default_memory)
    check = sizing.check
    per_gpu = check.estimate.host_offload_gib if check is not None else 0.0
    if not per_gpu:
        return default, ""
    from kubernetes.utils import parse_quantity

    extra = math.ceil(per_gpu * max(sizing.gpus, 1))
    total = math.ceil(float(parse_quantity(default)) / GIB) + extra
    note = (
        f"activation offload keeps ~{extra} GiB of checkpointed activations in host memory: "
        f"the pod's memory is {default} + {extra}Gi (set resources.memory to choose it)"
    )
    return f"{total}Gi", note


def plan_trainer(spec: FineTuneJobSpec, settings: OperatorSettings) -> TrainerPlan:
    """Decide the training pod of `spec`, or refuse it with every problem at once.

    Raises:
        SpecError: local URIs (LocalURIInCluster), no output, random weights not allowed,
            colliding credentials, an unknown GPU class (InvalidSpec) or a job that does not
            fit (InsufficientGPUMemory).
    """
    problems = check_cluster_spec(spec, settings)
    credentials, conflicts = merge_credentials(secret_uses(spec, settings))
    problems += conflicts
    resources = spec.resources or ResourcesSpec()
    sizing: GPUSizing | None = None
    if not is_local(spec.model.uri):
        try:
            sizing = size_gpus(spec, settings)
        except SizingError as exc:
            problems.append(Problem(exc.field, exc.reason, exc.message))
    node_selector: dict[str, str] = {}
    if sizing is not None:
        node_selector, clashes = _merge_node_selector(sizing, resources)
        problems += clashes
    if problems or sizing is None:
        raise SpecError(problems)
    memory, memory_note = pod_memory(resources, sizing, settings)
    return TrainerPlan(
        sizing=sizing,
        nodes=spec.distributed.nodes if spec.distributed else 1,
        credentials=tuple(credentials),
        claims=pvc_claims(spec),
        node_selector=node_selector,
        memory=memory,
        notes=tuple(note for note in (sizing.note, memory_note) if note),
    )


def quantity(value: int | str) -> str:
    """A resource quantity as the API prints it."""
    return str(value)


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """Pod-level security: non-root user and group, volumes owned by fsGroup."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_group,
        "fsGroup": settings.fs_group,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Container-level security of the `restricted` Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def claim_volumes(claims: dict[str, bool]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) for `pvc://` claims, mounted at /mnt/kubetune/pvc/<claim>."""
    volumes, mounts = [], []
    for index, (claim, read_only) in enumerate(claims.items()):
        name = f"pvc-{index}"
        source: dict[str, Any] = {"claimName": claim}
        if read_only:
            source["readOnly"] = True
        volumes.append({"name": name, "persistentVolumeClaim": source})
        mounts.append({"name": name, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
    return volumes, mounts


def scratch_volume(
    scratch: VolumeSpec | None,
    settings: OperatorSettings,
    claim_name: str,
    child_labels: dict[str, str],
    nodes: int,
) -> dict[str, Any]:
    """The scratch volume: an emptyDir (default), an existing claim, the claim the operator
    creates (`claim_name`, one pod), or a per-pod ephemeral claim (several nodes)."""
    spec = scratch or VolumeSpec()
    size = quantity(spec.size or settings.default_scratch_size)
    if spec.type == StorageKind.EMPTY_DIR:
        return {"name": "scratch", "emptyDir": {"sizeLimit": size}}
    if spec.claim_name:
        return {"name": "scratch", "persistentVolumeClaim": {"claimName": spec.claim_name}}
    if nodes == 1:
        return {"name": "scratch", "persistentVolumeClaim": {"claimName": claim_name}}
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if spec.storage_class_name:
        claim["storageClassName"] = spec.storage_class_name
    return {
        "name": "scratch",
        "ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": child_labels}, "spec": claim}},
    }


LAUNCHER = ("python", "-m", "kubetune.trainer.launch")
"""torchrun with the trainer's exit code (one process per GPU, several GPUs or nodes)."""


def _launch(plan: TrainerPlan) -> tuple[list[str], list[str]]:
    trainer = [
        "-m",
        "kubetune.trainer",
        "--config",
        CONFIG_PATH,
        "--result-file",
        TERMINATION_LOG,
        "--work-dir",
        WORK_DIR,
    ]
    if plan.nodes > 1:
        rendezvous = [
            "--nnodes=$(NNODES)",
            "--nproc-per-node=$(NPROC_PER_NODE)",
            "--node-rank=$(NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
        return [*LAUNCHER], [*rendezvous, "--", *trainer[2:]]
    if plan.sizing.gpus > 1:
        return [*LAUNCHER], [
            "--standalone",
            "--nproc-per-node=$(NPROC_PER_NODE)",
            "--",
            *trainer[2:],
        ]
    return ["python"], trainer


def _distributed_env(
    plan: TrainerPlan, ftj_name: str, run_id: str, settings: OperatorSettings
) -> list[dict[str, Any]]:
    per_node = str(max(plan.sizing.gpus, 1))
    if plan.nodes == 1:
        return [{"name": "NPROC_PER_NODE", "value": per_node}] if plan.sizing.gpus > 1 else []
    index = f"metadata.annotations['{names.ANNOTATION_COMPLETION_INDEX}']"
    master = f"{names.job_name(ftj_name, run_id)}-0.{names.service_name(ftj_name, run_id)}"
    return [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(settings.rendezvous_port)},
        {"name": "NNODES", "value": str(plan.nodes)},
        {"name": "NPROC_PER_NODE", "value": per_node},
    ]


def _resources(
    resources: ResourcesSpec, plan: TrainerPlan, settings: OperatorSettings
) -> dict[str, Any]:
    amounts = {
        "cpu": quantity(resources.cpu or settings.default_cpu),
        "memory": plan.memory,
    }
    if plan.sizing.gpus > 0:
        amounts[plan.sizing.resource_name] = str(plan.sizing.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _ports(plan: TrainerPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    ports = []
    if settings.metrics_port:
        ports.append(
            {"name": METRICS_PORT_NAME, "containerPort": settings.metrics_port, "protocol": "TCP"}
        )
    if plan.nodes > 1:
        ports.append(
            {
                "name": RENDEZVOUS_PORT_NAME,
                "containerPort": settings.rendezvous_port,
                "protocol": "TCP",
            }
        )
    return ports


def base_env() -> list[dict[str, Any]]:
    """Environment every kubetune pod gets: caches on the scratch volume, unbuffered logs."""
    env = [{"name": k, "value": v} for k, v in SCRATCH_ENV.items()]
    env += [
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    return env


def build_pod_template(
    job: FineTuneJob, settings: OperatorSettings, run_id: str, plan: TrainerPlan
) -> dict[str, Any]:
    """The pod template of the run's Job (one pod per node)."""
    ftj = job.metadata.name or ""
    spec = job.spec
    resources = spec.resources or ResourcesSpec()
    child_labels = names.labels(ftj, run_id)
    command, args = _launch(plan)
    claim_vols, claim_mounts = claim_volumes(plan.claims)
    volumes = [
        {
            "name": "config",
            "configMap": {
                "name": names.config_map_name(ftj, run_id),
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
            },
        },
        scratch_volume(
            resources.scratch,
            settings,
            names.scratch_claim_name(ftj, run_id),
            child_labels,
            plan.nodes,
        ),
        {
            "name": "shm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": quantity(resources.shm_size or settings.default_shm_size),
            },
        },
        *claim_vols,
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
        *claim_mounts,
    ]
    env = base_env() + _distributed_env(plan, ftj, run_id, settings)
    env += [use.to_env() for use in plan.credentials]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": resources.image or settings.trainer_image,
        "command": command,
        "args": args,
        "env": env,
        "resources": _resources(resources, plan, settings),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    ports = _ports(plan, settings)
    if ports:
        container["ports"] = ports
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": plan.sizing.termination_grace_seconds,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "containers": [container],
        "volumes": volumes,
    }
    if resources.service_account_name:
        pod["serviceAccountName"] = resources.service_account_name
    else:
        pod["automountServiceAccountToken"] = False
    if resources.priority_class_name:
        pod["priorityClassName"] = resources.priority_class_name
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
    if plan.nodes > 1:
        pod["subdomain"] = names.service_name(ftj, run_id)
    return {
        "metadata": {
            "labels": {**(job.metadata.labels or {}), **child_labels},
            "annotations": {
                names.ANNOTATION_DEFAULT_CONTAINER: CONTAINER_NAME,
                names.ANNOTATION_SPEC_HASH: names.spec_hash(spec),
            },
        },
        "spec": pod,
    }
