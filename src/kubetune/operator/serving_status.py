"""The status of a ModelDeployment, computed from what the operator observes.

Level-based like the FineTuneJob's: every reconcile hands `compute_serving_status` the
spec, the last status, the Deployment and its pods, and the plan (or why there is none),
and gets the whole new status back. The clock is injected; nothing here talks to the API
server.

`Ready` is the summary and is True only when the Deployment has observed its latest
generation, at least one replica is ready and no pod is crash-looping: a vLLM that fails
to load an adapter, or an init container that cannot fetch the artifact, shows as Ready
False with the container's last words (its termination message, or the end of its log),
not as a Running pod that never answers. `Available` and `Progressing` mirror the
Deployment's own conditions. `lastTransitionTime` changes only when a condition's status
flips, so a status that did not change is not written (`serving_status_patch`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import Enum
from typing import Any

from kubetune.api.contract import EXIT_CODES, Reason
from kubetune.api.meta import Condition, ConditionStatus
from kubetune.api.v1alpha1.modeldeployment import (
    DeploymentLineage,
    ModelDeployment,
    ModelDeploymentStatus,
    ServedModelStatus,
)
from kubetune.operator import status_io
from kubetune.operator.pod_state import clean_message
from kubetune.operator.progress import rfc3339
from kubetune.operator.serving import (
    LABEL_MODELDEPLOYMENT,
    ServingError,
    ServingPlan,
    deployment_name,
    endpoint,
)
from kubetune.operator.serving_objects import ANNOTATION_ARTIFACT_DIGEST, CONTAINER_NAME

READY = "Ready"
AVAILABLE = "Available"
PROGRESSING = "Progressing"
CONDITION_TYPES = (READY, AVAILABLE, PROGRESSING)
RESTART_THRESHOLD = 3
"""Restarts after which a container that is not ready counts as crash-looping."""
PROBLEMS_SHOWN = 5

_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_WAITING_ERRORS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
"""Kubelet waiting reasons that need the user (an image, a Secret), used as Ready reasons."""
_EXIT_REASONS = {row.code: row.reason for row in EXIT_CODES}


class ReadyReason(str, Enum):
    """Reasons of the Ready condition besides the refusals and the kubelet's."""

    SERVING = "Serving"
    """At least one replica of the latest generation answers."""

    DEPLOYING = "Deploying"
    """The Deployment is being created or rolled out; no replica is ready yet."""

    SCALED_TO_ZERO = "ScaledToZero"
    """No replica is wanted (replicas 0, or the autoscaler scaled to zero)."""

    CRASH_LOOPING = "CrashLooping"
    """The vLLM container keeps failing (e.g. an adapter that does not load)."""


Verdict = tuple[ConditionStatus, str, str]
"""A condition's status, reason and message."""


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    value: Any = obj
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _reason(text: object, default: str) -> str:
    return text if isinstance(text, str) and _REASON.match(text) else default


# --- Pods ------------------------------------------------------------------------------


def _own_pods(pods: Sequence[Mapping[str, Any]], md_name: str) -> list[Mapping[str, Any]]:
    """This deployment's pods that are not being deleted, by name."""
    own = [
        pod
        for pod in pods
        if (_get(pod, "metadata", "labels") or {}).get(LABEL_MODELDEPLOYMENT) == md_name
        and not _get(pod, "metadata", "deletionTimestamp")
    ]
    return sorted(own, key=lambda p: str(_get(p, "metadata", "name") or ""))


def _statuses(pod: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    init = [("init container", s) for s in _get(pod, "status", "initContainerStatuses") or []]
    main = [("container", s) for s in _get(pod, "status", "containerStatuses") or []]
    return [(kind, s) for kind, s in init + main if isinstance(s, Mapping)]


def _last_words(terminated: Mapping[str, Any]) -> str:
    code = terminated.get("exitCode")
    why = terminated.get("reason") or "Error"
    text = f"last exit code {code} ({why})"
    message = terminated.get("message")
    return f"{text}: {message}" if isinstance(message, str) and message.strip() else text


def _crash_reason(kind: str, name: str, terminated: Mapping[str, Any]) -> str:
    if terminated.get("reason") == "OOMKilled":
        return Reason.OUT_OF_MEMORY.value
    if kind == "init container":
        code = terminated.get("exitCode")
        row = _EXIT_REASONS.get(code) if isinstance(code, int) else None
        return (row or Reason.DOWNLOAD_FAILED).value
    return ReadyReason.CRASH_LOOPING.value if name == CONTAINER_NAME else "CrashLoopBackOff"


def crash_loop(pods: Sequence[Mapping[str, Any]]) -> Verdict | None:
    """The first crash-looping container of the pods (CrashLoopBackOff, or restarted at
    least three times and not ready), as a Ready verdict with its last words."""
    for pod in pods:
        pod_name = _get(pod, "metadata", "name")
        for kind, status in _statuses(pod):
            waiting = _get(status, "state", "waiting") or {}
            restarts = _int(status.get("restartCount"))
            terminated = _get(status, "lastState", "terminated") or _get(
                status, "state", "terminated"
            )
            looping = waiting.get("reason") == "CrashLoopBackOff" or (
                restarts >= RESTART_THRESHOLD and not status.get("ready") and terminated
            )
            if not looping:
                continue
            name = str(status.get("name") or "")
            last = terminated if isinstance(terminated, Mapping) else {}
            message = (
                f"{kind.capitalize()} {name} of pod {pod_name} is crash-looping "
                f"({restarts} restarts); {_last_words(last)}"
            )
            if last.get("reason") == "OOMKilled":
                message += "; raise spec.resources.memory"
            return ConditionStatus.FALSE, _crash_reason(kind, name, last), clean_message(message)
    return None


def _blocked(pods: Sequence[Mapping[str, Any]]) -> Verdict | None:
    """A container waiting on something the user must fix (an image, a Secret)."""
    for pod in pods:
        for kind, status in _statuses(pod):
            waiting = _get(status, "state", "waiting") or {}
            if waiting.get("reason") in _WAITING_ERRORS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                message = (
                    f"{kind.capitalize()} {status.get('name')} of pod "
                    f"{_get(pod, 'metadata', 'name')} is waiting: {waiting['reason']}{detail}"
                )
                return ConditionStatus.FALSE, str(waiting["reason"]), clean_message(message)
    return None


def _progress_detail(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """What the newest pod is doing while no replica is ready."""
    for pod in pods:
        name = _get(pod, "metadata", "name")
        for condition in _get(pod, "status", "conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                why = condition.get("message") or condition.get("reason") or "no node fits"
                return f"Pod {name} is not scheduled: {why}"
        for kind, status in _statuses(pod):
            if kind == "init container" and _get(status, "state", "running"):
                return f"Pod {name} is fetching the model (init container {status.get('name')})"
            if kind == "container" and _get(status, "state", "running") and not status["ready"]:
                return f"Pod {name}: vLLM is loading the model"
    return None


# --- Conditions ------------------------------------------------------------------------


def _deployment_condition(deployment: Mapping[str, Any], type_: str) -> Verdict | None:
    for condition in _get(deployment, "status", "conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == type_:
            try:
                status = ConditionStatus(condition.get("status"))
            except ValueError:
                status = ConditionStatus.UNKNOWN
            reason = _reason(condition.get("reason"), ReadyReason.DEPLOYING.value)
            return status, reason, str(condition.get("message") or "")
    return None


def _refusal_message(error: ServingError, serving: bool) -> str:
    shown = "; ".join(str(p) for p in error.problems[:PROBLEMS_SHOWN])
    more = len(error.problems) - PROBLEMS_SHOWN
    if more > 0:
        shown += f"; and {more} more"
    if serving:
        shown += ". The Deployment keeps serving what it served before"
    return shown


def _ready(
    md_name: str,
    namespace: str,
    deployment: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    outcome: ServingPlan | ServingError,
) -> Verdict:
    if isinstance(outcome, ServingError):
        message = _refusal_message(outcome, deployment is not None)
        return ConditionStatus.FALSE, outcome.reason, message
    name = deployment_name(md_name)
    if deployment is None:
        return ConditionStatus.FALSE, ReadyReason.DEPLOYING.value, f"Creating Deployment {name}"
    failing = crash_loop(pods) or _blocked(pods)
    if failing is not None:
        return failing
    generation = _int(_get(deployment, "metadata", "generation"))
    if _int(_get(deployment, "status", "observedGeneration")) < generation:
        message = f"Deployment {name} is rolling out generation {generation}"
        return ConditionStatus.FALSE, ReadyReason.DEPLOYING.value, message
    wanted = _get(deployment, "spec", "replicas")
    ready = _int(_get(deployment, "status", "readyReplicas"))
    if wanted == 0 and ready == 0:
        message = f"Deployment {name} is scaled to zero replicas"
        return ConditionStatus.FALSE, ReadyReason.SCALED_TO_ZERO.value, message
    if ready >= 1:
        total = wanted if isinstance(wanted, int) else ready
        message = (
            f"Serving {', '.join(m.name for m in outcome.served_models)} at "
            f"{endpoint(md_name, namespace)} ({ready} of {total} replicas ready)"
        )
        updated = _int(_get(deployment, "status", "updatedReplicas"))
        if updated < total:
            message += f"; rolling out {outcome.artifact_digest} ({updated} of {total} updated)"
        return ConditionStatus.TRUE, ReadyReason.SERVING.value, message
    detail = _progress_detail(pods) or f"Waiting for the pods of Deployment {name}"
    return ConditionStatus.FALSE, ReadyReason.DEPLOYING.value, detail


def _mirrored(
    type_: str,
    deployment: Mapping[str, Any] | None,
    outcome: ServingPlan | ServingError,
) -> Verdict:
    if deployment is not None:
        found = _deployment_condition(deployment, type_)
        if found is not None:
            return found
        return ConditionStatus.UNKNOWN, ReadyReason.DEPLOYING.value, "Not reported yet"
    if isinstance(outcome, ServingError):
        status = ConditionStatus.UNKNOWN if outcome.waiting else ConditionStatus.FALSE
        return status, outcome.reason, "No Deployment: see the Ready condition"
    if type_ == PROGRESSING:
        return ConditionStatus.TRUE, ReadyReason.DEPLOYING.value, "Creating the Deployment"
    return ConditionStatus.FALSE, ReadyReason.DEPLOYING.value, "No Deployment yet"


def _condition(
    type_: str,
    verdict: Verdict,
    generation: int,
    previous: Mapping[str, Condition],
    now: datetime,
) -> Condition:
    status, reason, message = verdict
    before = previous.get(type_)
    since = before.last_transition_time if before and before.status == status else rfc3339(now)
    return Condition(
        type=type_,
        status=status,
        reason=_reason(reason, ReadyReason.DEPLOYING.value),
        message=clean_message(message),
        observed_generation=generation,
        last_transition_time=since,
    )


# --- The status ------------------------------------------------------------------------


def _served(
    previous: ModelDeploymentStatus | None,
    deployment: Mapping[str, Any] | None,
    outcome: ServingPlan | ServingError,
) -> tuple[tuple[ServedModelStatus, ...], str | None, DeploymentLineage | None]:
    """What is served: the plan's; after a refusal, what the Deployment still serves."""
    if isinstance(outcome, ServingPlan):
        return outcome.served_models, outcome.artifact_digest, outcome.lineage
    if deployment is None or previous is None:
        return (), None, None
    pinned = _get(deployment, "spec", "template", "metadata", "annotations") or {}
    digest = pinned.get(ANNOTATION_ARTIFACT_DIGEST)
    return (
        tuple(previous.served_models or ()),
        digest if isinstance(digest, str) else previous.artifact_digest,
        previous.lineage,
    )


def compute_serving_status(
    md: ModelDeployment,
    generation: int,
    previous: ModelDeploymentStatus | None,
    deployment: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    outcome: ServingPlan | ServingError,
    now: datetime,
) -> ModelDeploymentStatus:
    """The whole status of a ModelDeployment.

    Args:
        md: the ModelDeployment.
        generation: its metadata.generation.
        previous: the status written last (None at first).
        deployment: its Deployment as a dict (None before it is created).
        pods: the Deployment's pods as dicts (others are ignored).
        outcome: the plan (`serving.plan_serving`), or why the spec cannot be served.
        now: the time of the observation (timezone-aware).
    """
    md_name = md.metadata.name or ""
    namespace = md.metadata.namespace or ""
    own = _own_pods(pods, md_name)
    verdicts = {
        READY: _ready(md_name, namespace, deployment, own, outcome),
        AVAILABLE: _mirrored(AVAILABLE, deployment, outcome),
        PROGRESSING: _mirrored(PROGRESSING, deployment, outcome),
    }
    before = {c.type: c for c in (previous.conditions if previous else None) or ()}
    conditions = [_condition(t, verdicts[t], generation, before, now) for t in CONDITION_TYPES]
    served, digest, lineage = _served(previous, deployment, outcome)
    wanted = _get(deployment, "spec", "replicas")
    if not isinstance(wanted, int) and isinstance(outcome, ServingPlan):
        wanted = outcome.replicas
    serving = deployment is not None or isinstance(outcome, ServingPlan)
    return ModelDeploymentStatus(
        observed_generation=generation,
        conditions=conditions,
        endpoint=endpoint(md_name, namespace) if serving else None,
        served_models=list(served) or None,
        artifact_digest=digest,
        replicas=wanted if isinstance(wanted, int) else None,
        ready_replicas=_int(_get(deployment, "status", "readyReplicas")) if deployment else None,
        lineage=lineage,
    )


# --- Writing it ------------------------------------------------------------------------


def load_serving_status(raw: Mapping[str, Any] | None) -> ModelDeploymentStatus | None:
    """The status as stored on the object (keys this model does not know are ignored);
    None when empty or unreadable."""
    return status_io.load(ModelDeploymentStatus, raw)


def dump_serving_status(status: ModelDeploymentStatus) -> dict[str, Any]:
    """The status as written to the API (camelCase, no nulls)."""
    return status_io.dump(status)


def serving_status_patch(
    previous: Mapping[str, Any] | None, new: ModelDeploymentStatus
) -> dict[str, Any] | None:
    """The JSON merge patch that turns the stored status into `new`, or None when nothing
    would change. Keys the status model does not know (another controller's) are left
    alone."""
    return status_io.patch_for(previous, new)
