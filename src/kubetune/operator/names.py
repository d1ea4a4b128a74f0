"""Names, labels and annotations of the objects the operator creates.

Everything a FineTuneJob owns is named `<job>-<run id>` (plus a suffix) and labelled with
the job and the run, so `kubectl get all -l kubetune.io/finetunejob=support-bot` finds it and
the operator's indexes can key on the owner. Names are DNS labels of at most
`MAX_CHILD_NAME` characters: an Indexed Job's pods are called `<job name>-<index>` and that
hostname must itself stay a DNS label. A name too long is cut and given a hash of the full
name, so the same job and run always give the same, unique name.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_RUN_ID = "kubetune.io/run-id"
LABEL_MODELDEPLOYMENT = "kubetune.io/modeldeployment"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""Set by the Job controller on each pod of an Indexed Job (its index)."""
ANNOTATION_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

APP_NAME = "kubetune"
MANAGER = "kubetune-operator"
COMPONENT_TRAINER = "trainer"
COMPONENT_CLEANUP = "cleanup"

DNS_LABEL_MAX = 63
MAX_CHILD_NAME = DNS_LABEL_MAX - len("-255")
"""Longest child name: leaves room for the `-<index>` hostname suffix of up to 256 nodes."""
HASH_LENGTH = 8


def fit_name(base: str, limit: int = DNS_LABEL_MAX) -> str:
    """`base` as a DNS label of at most `limit` characters.

    Dots become dashes (a FineTuneJob name may be a DNS subdomain). A longer name keeps its
    head and ends with 8 hex characters of the sha256 of the whole name.
    """
    name = base.lower().replace(".", "-").strip("-")
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_LENGTH]
    head = name[: limit - HASH_LENGTH - 1].rstrip("-")
    return f"{head}-{digest}"


def job_name(ftj_name: str, run_id: str) -> str:
    """Name of the Job (and the stem of every other child) of one run."""
    return fit_name(f"{ftj_name}-{run_id}", MAX_CHILD_NAME)


def config_map_name(ftj_name: str, run_id: str) -> str:
    """Name of the ConfigMap holding the run's TrainerConfig."""
    return f"{job_name(ftj_name, run_id)}-config"


def scratch_claim_name(ftj_name: str, run_id: str) -> str:
    """Name of the PersistentVolumeClaim the operator creates for `scratch.type: PVC`."""
    return f"{job_name(ftj_name, run_id)}-scratch"


def service_name(ftj_name: str, run_id: str) -> str:
    """Name of the headless Service of a multi-node run.

    A Service name must start with a letter (RFC 1035); the Job's name is used when it
    does, else it gets a `kt-` prefix.
    """
    name = job_name(ftj_name, run_id)
    if name[0].isalpha():
        return name
    return fit_name(f"kt-{ftj_name}-{run_id}", MAX_CHILD_NAME)


def cleanup_pod_name(ftj_name: str) -> str:
    """Name of the pod that deletes a job's artifacts (`output.deletePolicy: Delete`)."""
    return fit_name(f"{ftj_name}-cleanup")


def labels(ftj_name: str, run_id: str) -> dict[str, str]:
    """Labels of every child of one run (also the Service's pod selector)."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_COMPONENT: COMPONENT_TRAINER,
        LABEL_FINETUNEJOB: ftj_name,
        LABEL_RUN_ID: run_id,
    }


def spec_hash(spec: FineTuneJobSpec) -> str:
    """sha256 (hex) of the whole spec as the operator rendered it, for the
    `kubetune.io/spec-hash` annotation: unlike the run id (training fields only), it changes
    with any field, e.g. tolerations or suspend, so a handler can tell a child is stale."""
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    text = json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
