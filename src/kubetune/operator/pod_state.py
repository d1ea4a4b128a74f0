"""What the operator reads from a FineTuneJob's Job and Pods: the trainer's result in the
termination message, exit codes, disruptions, why a pod is pending, GPU-hours, and messages
cleaned of anything that looks like a credential. Pure functions over the objects as dicts
(`status.py` builds the status from them)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from kubetune.api.contract import TrainerResult
from kubetune.operator import names

MESSAGE_LIMIT = 1024
"""Longest condition or event message (the trainer's own messages are at most this)."""


DISRUPTION = "DisruptionTarget"


SECRET_NAME = (
    r"(?:[A-Za-z0-9]{1,32}[_-]){0,6}"
    r"(?:secret[_-]?access[_-]?key|access[_-]?key[_-]?id|session[_-]?token|api[_-]?key"
    r"|secret|token|password|passwd)"
)
"""A name whose value is a credential, in any spelling a library or a server uses:
`AWS_SECRET_ACCESS_KEY`, `secretAccessKey`, `X-Amz-Security-Token`, `HF_TOKEN`,
`KUBETUNE_JUDGE_API_KEY`, `client_secret`, `refresh_token`, `password`. Only the last word
counts, so `credentialsSecretRef` and `max_tokens` are not names of credentials."""

REDACTIONS = (
    (re.compile(r"(?i)(://)[^/\s:@]+:[^/\s@]+@"), r"\1***@"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}\b"), "***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "***"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (
        re.compile(r"(?i)\b(authorization[\"']?\s*[=:]\s*[\"']?basic)\s+[A-Za-z0-9+/=]+"),
        r"\1 ***",
    ),
    (re.compile(r"(?i)(x-amz-(?:signature|credential|security-token)=)[^&\s]+"), r"\1***"),
    (re.compile(r"(?i)\b(credential=)[^/\s,&]+"), r"\1***"),
    (
        re.compile(rf"(?i)\b({SECRET_NAME})([\"']?\s*[=:]\s*)([\"']?)[^\s\"',;&]+"),
        r"\1\2\3***",
    ),
)


CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def clean_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message fit for a status or an Event: credentials masked, one line, capped."""
    for pattern, replacement in REDACTIONS:
        text = pattern.sub(replacement, text)
    text = " ".join(CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def object_status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    value = obj.get("status")
    return value if isinstance(value, Mapping) else {}


def object_name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp from the API, or None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def created_at(obj: Mapping[str, Any]) -> datetime:
    return parse_time((obj.get("metadata") or {}).get("creationTimestamp")) or EPOCH


def terminated_states(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    states = []
    for container in object_status(pod).get("containerStatuses") or []:
        for key in ("state", "lastState"):
            terminated = (container.get(key) or {}).get("terminated")
            if isinstance(terminated, Mapping):
                states.append(terminated)
    return states


RESULT_FIELDS = frozenset(info.alias or name for name, info in TrainerResult.model_fields.items())


def parse_result_text(text: object) -> TrainerResult | None:
    """A TrainerResult from a termination message; None for garbage, truncated JSON or a
    result this operator cannot read. Unknown keys (a newer trainer) are ignored."""
    if not isinstance(text, str) or not text.strip():
        return None
    lines = [line for line in reversed(text.strip().splitlines()) if line.startswith("{")]
    for candidate in (text.strip(), *lines):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        try:
            return TrainerResult.model_validate(
                {k: v for k, v in data.items() if k in RESULT_FIELDS}
            )
        except ValidationError:
            continue
    return None


def parse_termination_message(pod: Mapping[str, Any]) -> TrainerResult | None:
    """The trainer's result from a pod's terminated container, or None."""
    for terminated in terminated_states(pod):
        result = parse_result_text(terminated.get("message"))
        if result is not None:
            return result
    return None


def finished_at(pod: Mapping[str, Any]) -> datetime | None:
    times = [parse_time(t.get("finishedAt")) for t in terminated_states(pod)]
    return max((t for t in times if t is not None), default=None)


def leader_first(pod: Mapping[str, Any]) -> tuple[bool, datetime, bool]:
    """Sort key: the pod of completion index 0 (the one that writes the result of a
    multi-node run), then the latest to finish. Times have one-second resolution; of two
    pods that finished in the same second, the one that succeeded is the later (nothing
    runs after a success)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    leader = annotations.get(names.ANNOTATION_COMPLETION_INDEX, "0") == "0"
    return leader, finished_at(pod) or created_at(pod), pod_phase(pod) == "Succeeded"


def latest_result(pods: Sequence[Mapping[str, Any]]) -> TrainerResult | None:
    """The result of the most recently terminated pod that left a readable one."""
    for pod in sorted(pods, key=leader_first, reverse=True):
        result = parse_termination_message(pod)
        if result is not None:
            return result
    return None


def exit_code(pod: Mapping[str, Any]) -> int | None:
    """The first non-zero exit code of a pod's containers, or None."""
    for terminated in terminated_states(pod):
        code = terminated.get("exitCode")
        if isinstance(code, int) and code != 0:
            return code
    return None


def disruption(pod: Mapping[str, Any]) -> str | None:
    """Why Kubernetes disrupted a pod (preemption, eviction, node drain), or None."""
    for condition in object_status(pod).get("conditions") or []:
        if condition.get("type") == DISRUPTION and condition.get("status") == "True":
            detail = condition.get("message") or condition.get("reason") or "disrupted"
            return f"Pod {object_name(pod)} was preempted: {detail}"
    return None


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str(object_status(pod).get("phase") or "Pending")


def pending_detail(pod: Mapping[str, Any]) -> str:
    name = object_name(pod)
    for condition in object_status(pod).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            why = condition.get("message") or condition.get("reason") or "no node fits"
            return f"Pod {name} is not scheduled: {why}"
    for container in object_status(pod).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if isinstance(waiting, Mapping) and waiting.get("reason"):
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"Pod {name} is waiting: {waiting['reason']}{detail}"
    return f"Pod {name} is starting"


def pod_gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or resources.get("requests") or {}
        for key, value in limits.items():
            if str(key).endswith("/gpu"):
                try:
                    total += int(value)
                except (TypeError, ValueError):
                    continue
    return total


def gpu_hours(pods: Sequence[Mapping[str, Any]], now: datetime) -> float:
    """GPUs × hours each pod held them: from the pod's start to its containers' end, or to
    `now` while it runs. Pods that never started count nothing."""
    hours = 0.0
    for pod in pods:
        gpus = pod_gpus(pod)
        start = parse_time(object_status(pod).get("startTime"))
        if not gpus or start is None:
            continue
        phase = pod_phase(pod)
        end = now if phase == "Running" else finished_at(pod)
        if end is None or end <= start:
            continue
        hours += gpus * (end - start).total_seconds() / 3600
    return hours


def text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def job_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in object_status(job).get("conditions") or []:
        if (
            isinstance(condition, Mapping)
            and condition.get("type") in types
            and condition.get("status") == "True"
        ):
            return condition
    return None
