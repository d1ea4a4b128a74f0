"""The objects a FineTuneJob owns, as plain dicts ready for the API server.

One run of a FineTuneJob is:

- a ConfigMap `<job>-<run>-config` holding the `TrainerConfig` (key `trainer-config.json`,
  mounted read-only at /etc/kubetune); it carries the spec, whose credentials are Secret
  references only, never values;
- a batch/v1 Job `<job>-<run>` with one pod, or, for `distributed.nodes > 1`, an Indexed
  Job with one pod per node plus a headless Service so that pod 0 is reachable by name for
  the torchrun rendezvous;
- a PersistentVolumeClaim `<job>-<run>-scratch` when `resources.scratch.type: PVC` names no
  existing claim (one node; several nodes get one ephemeral claim per pod).

Every child has an ownerReference to the FineTuneJob (controller, blockOwnerDeletion), the
labels of `names.labels` and the `kubetune.io/spec-hash` annotation. The Job's
podFailurePolicy comes from the contract's exit-code table: user errors and out-of-memory
fail the Job at once, infrastructure errors are retried within `backoffLimit`, and pods
disrupted by preemption or eviction do not count at all.

`build_cleanup_pod` renders the pod that deletes a job's artifacts when
`output.deletePolicy: Delete` and the FineTuneJob is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import FailureClass, Reason, RunIdentity, TrainerConfig, codes_of
from kubetune.api.meta import StorageKind
from kubetune.api.v1alpha1.resources import ResourcesSpec
from kubetune.operator import names
from kubetune.operator.pod import (
    CONFIG_KEY,
    CONTAINER_NAME,
    PVC_ROOT,
    Problem,
    SpecError,
    TrainerPlan,
    build_pod_template,
    claim_volumes,
    container_security_context,
    plan_trainer,
    pod_security_context,
    quantity,
    secret_uses,
)

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.finetunejob import FineTuneJob, OutputSpec
    from kubetune.operator.settings import OperatorSettings

MAX_EXIT_CODE_VALUES = 255
"""The API server's limit on `podFailurePolicy.rules[].onExitCodes.values`."""
DISRUPTION_TARGET = "DisruptionTarget"
DELETE_MODULE = "kubetune.storage.delete"
"""Module the cleanup pod runs: `python -m kubetune.storage.delete URI… [--endpoint-url U]
[--region R]` deletes every object under each URI."""
CLEANUP_DEADLINE_SECONDS = 3600
CLEANUP_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}


def _identity(job: FineTuneJob) -> tuple[str, str]:
    name, namespace = job.metadata.name, job.metadata.namespace
    if not name or not namespace:
        raise ValueError("the FineTuneJob needs metadata.name and metadata.namespace")
    return name, namespace


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """The ownerReference that makes an object a child of `job` (garbage-collected with it,
    and found by the operator's owner indexes).

    Raises:
        ValueError: the FineTuneJob has no metadata.uid (it was not read from the cluster).
    """
    name, _ = _identity(job)
    uid = (job.metadata.model_extra or {}).get("uid")
    if not isinstance(uid, str) or not uid:
        raise ValueError(f"FineTuneJob {name} has no metadata.uid: read it from the API server")
    return {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    job: FineTuneJob, name: str, child_labels: dict[str, str], **extra_labels: str
) -> dict[str, Any]:
    _, namespace = _identity(job)
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**(job.metadata.labels or {}), **child_labels, **extra_labels},
        "annotations": {names.ANNOTATION_SPEC_HASH: names.spec_hash(job.spec)},
        "ownerReferences": [owner_reference(job)],
    }


def _child_metadata(job: FineTuneJob, name: str, run_id: str) -> dict[str, Any]:
    return _metadata(job, name, names.labels(job.metadata.name or "", run_id))


def trainer_config(job: FineTuneJob, settings: OperatorSettings, run_id: str) -> TrainerConfig:
    """The TrainerConfig of one run: the spec (Secret references only), where the run's
    artifacts go, and the operator's settings the trainer needs.

    Raises:
        SpecError: the spec has no output.
    """
    name, namespace = _identity(job)
    if job.spec.output is None:
        raise SpecError(
            [
                Problem(
                    "spec.output",
                    Reason.INVALID_SPEC,
                    "a cluster run needs an artifact store: set spec.output.uri",
                )
            ]
        )
    return TrainerConfig(
        run=RunIdentity(
            namespace=namespace, job_name=name, run_id=run_id, output_uri=job.spec.output.uri
        ),
        spec=job.spec,
        metrics_port=settings.metrics_port,
        allow_builtin_random=settings.allow_builtin_random,
    )


def build_config_map(job: FineTuneJob, settings: OperatorSettings, run_id: str) -> dict[str, Any]:
    """The ConfigMap holding the run's TrainerConfig as JSON (key `trainer-config.json`)."""
    config = trainer_config(job, settings, run_id)
    text = json.dumps(
        config.model_dump(mode="json", by_alias=True, exclude_none=True),
        indent=2,
        sort_keys=True,
        ensure_ascii=False,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _child_metadata(
            job, names.config_map_name(job.metadata.name or "", run_id), run_id
        ),
        "data": {CONFIG_KEY: text + "\n"},
    }


def _exit_codes(*classes: FailureClass) -> list[int]:
    codes = sorted({code for c in classes for code in codes_of(c)})
    if 0 in codes or len(codes) > MAX_EXIT_CODE_VALUES:
        raise ValueError(
            f"the exit-code table gives {len(codes)} codes (0 included: {0 in codes}); a "
            f"podFailurePolicy rule takes at most {MAX_EXIT_CODE_VALUES} and never 0"
        )
    return codes


def pod_failure_policy() -> dict[str, Any]:
    """podFailurePolicy from the contract's exit-code table (rules apply in order).

    1. A pod disrupted by preemption, eviction or a node drain (condition DisruptionTarget)
       is ignored: it does not count against backoffLimit.
    2. User errors and out-of-memory fail the Job at once: retrying cannot help.
    3. Infrastructure errors count against backoffLimit (the retry resumes from the last
       checkpoint). Any other non-zero code is counted too (the Job's default).
    """
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": DISRUPTION_TARGET, "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": _exit_codes(FailureClass.USER, FailureClass.OUT_OF_MEMORY),
                },
            },
            {
                "action": "Count",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": _exit_codes(FailureClass.INFRASTRUCTURE),
                },
            },
        ]
    }


def build_job(
    job: FineTuneJob, settings: OperatorSettings, run_id: str, plan: TrainerPlan
) -> dict[str, Any]:
    """The batch/v1 Job of one run: one pod, or an Indexed Job with one pod per node.

    With `spec.queueName` the Job carries Kueue's queue label and is created suspended
    (Kueue unsuspends it on admission); without it, `Job.spec.suspend` follows
    `spec.suspend`.
    """
    spec = job.spec
    ftj = job.metadata.name or ""
    metadata = _child_metadata(job, names.job_name(ftj, run_id), run_id)
    if spec.queue_name:
        metadata["labels"][names.LABEL_KUEUE_QUEUE] = spec.queue_name
    body: dict[str, Any] = {
        "completions": plan.nodes,
        "parallelism": plan.nodes,
        "backoffLimit": spec.backoff_limit,
        "suspend": True if spec.queue_name else spec.suspend,
        "podFailurePolicy": pod_failure_policy(),
        "podReplacementPolicy": "Failed",
        "template": build_pod_template(job, settings, run_id, plan),
    }
    if plan.nodes > 1:
        body["completionMode"] = "Indexed"
    if spec.active_deadline_seconds is not None:
        body["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        body["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": body}


def build_service(job: FineTuneJob, settings: OperatorSettings, run_id: str) -> dict[str, Any]:
    """The headless Service of a multi-node run: gives pod 0 the DNS name
    `<job>-0.<service>` (published before the pods are ready, for the rendezvous)."""
    ftj = job.metadata.name or ""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _child_metadata(job, names.service_name(ftj, run_id), run_id),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.labels(ftj, run_id),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": settings.rendezvous_port,
                    "targetPort": settings.rendezvous_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_scratch_claim(
    job: FineTuneJob, settings: OperatorSettings, run_id: str, plan: TrainerPlan
) -> dict[str, Any] | None:
    """The scratch PersistentVolumeClaim the operator creates, or None when the pod uses an
    emptyDir, an existing claim, or (several nodes) one ephemeral claim per pod."""
    scratch = (job.spec.resources or ResourcesSpec()).scratch
    if scratch is None or scratch.type != StorageKind.PVC or scratch.claim_name or plan.nodes > 1:
        return None
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {
            "requests": {"storage": quantity(scratch.size or settings.default_scratch_size)}
        },
    }
    if scratch.storage_class_name:
        claim["storageClassName"] = scratch.storage_class_name
    ftj = job.metadata.name or ""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _child_metadata(job, names.scratch_claim_name(ftj, run_id), run_id),
        "spec": claim,
    }


@dataclass(frozen=True)
class Children:
    """Everything one run of a FineTuneJob owns.

    Attributes:
        config_map: the TrainerConfig.
        job: the batch/v1 Job (Indexed for several nodes).
        service: the headless Service (several nodes only).
        scratch_claim: the scratch PersistentVolumeClaim the operator creates, if any.
        plan: the decisions behind them (GPUs, credentials, claims).
    """

    config_map: dict[str, Any]
    job: dict[str, Any]
    service: dict[str, Any] | None
    scratch_claim: dict[str, Any] | None
    plan: TrainerPlan

    @property
    def objects(self) -> list[dict[str, Any]]:
        """The objects in creation order: what the pod mounts or resolves first, the Job
        last."""
        first = [self.config_map, self.scratch_claim, self.service]
        return [o for o in first if o is not None] + [self.job]

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user should know about the choices made (e.g. how Auto was sized)."""
        return self.plan.notes


def build_children(job: FineTuneJob, settings: OperatorSettings, run_id: str) -> Children:
    """Every object of one run of `job`.

    Raises:
        SpecError: the spec cannot run in the cluster (every problem, each naming its field).
        ValueError: the FineTuneJob lacks metadata.name, namespace or uid.
    """
    owner_reference(job)
    plan = plan_trainer(job.spec, settings)
    return Children(
        config_map=build_config_map(job, settings, run_id),
        job=build_job(job, settings, run_id, plan),
        service=build_service(job, settings, run_id) if plan.nodes > 1 else None,
        scratch_claim=build_scratch_claim(job, settings, run_id, plan),
        plan=plan,
    )


def _output(job: FineTuneJob) -> OutputSpec:
    if job.spec.output is None:
        raise SpecError(
            [Problem("spec.output", Reason.INVALID_SPEC, "no output: there is nothing to delete")]
        )
    return job.spec.output


def build_cleanup_pod(
    job: FineTuneJob, settings: OperatorSettings, run_uris: Sequence[str]
) -> dict[str, Any]:
    """The pod that deletes artifacts when a FineTuneJob with `output.deletePolicy: Delete`
    is deleted.

    It runs the trainer image with the output's credentials only and deletes every object
    under each URI.

    Args:
        job: the FineTuneJob being deleted.
        settings: the operator settings.
        run_uris: RUN_URIs to delete (`status.runs`), or the job's root
            `<output>/<namespace>/<job>` for everything it ever wrote.

    Raises:
        ValueError: no URI given, or one outside the job's root (the pod would delete
            someone else's data).
        SpecError: the spec has no output.
    """
    ftj, namespace = _identity(job)
    output = _output(job)
    root = f"{output.uri.rstrip('/')}/{namespace}/{ftj}"
    if not run_uris:
        raise ValueError("no run URI to delete")
    for uri in run_uris:
        if uri.rstrip("/") != root and not uri.startswith(root + "/"):
            raise ValueError(f"{uri} is not inside {root}, the artifacts of this FineTuneJob")
    resources = job.spec.resources or ResourcesSpec()
    args = ["-m", DELETE_MODULE, *run_uris]
    if output.endpoint:
        args += ["--endpoint-url", output.endpoint]
    if output.region:
        args += ["--region", output.region]
    credentials = [
        use.to_env()
        for use in secret_uses(job.spec, settings)
        if use.field == "spec.output.credentialsSecretRef"
    ]
    claims = {}
    if output.uri.startswith("pvc://"):
        claims[output.uri.removeprefix("pvc://").split("/", 1)[0]] = False
    claim_vols, claim_mounts = claim_volumes(claims)
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *credentials,
    ]
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "activeDeadlineSeconds": CLEANUP_DEADLINE_SECONDS,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "containers": [
            {
                "name": "cleanup",
                "image": resources.image or settings.trainer_image,
                "command": ["python"],
                "args": args,
                "env": env,
                "resources": {k: dict(v) for k, v in CLEANUP_RESOURCES.items()},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *claim_mounts],
                "securityContext": container_security_context(),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}, *claim_vols],
    }
    if resources.service_account_name:
        pod["serviceAccountName"] = resources.service_account_name
    else:
        pod["automountServiceAccountToken"] = False
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    cleanup_labels = {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_MANAGED_BY: names.MANAGER,
        names.LABEL_COMPONENT: names.COMPONENT_CLEANUP,
        names.LABEL_FINETUNEJOB: ftj,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, names.cleanup_pod_name(ftj), cleanup_labels),
        "spec": pod,
    }
