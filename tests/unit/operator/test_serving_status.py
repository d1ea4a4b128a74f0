"""The status of a ModelDeployment, table-tested from Deployments and pods as dicts."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from test_serving import DIGEST_A, DIGEST_B, NAMESPACE, SETTINGS, artifact, make_md

from kubetune.api.contract import Reason
from kubetune.api.meta import ConditionStatus
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, ModelDeploymentStatus
from kubetune.operator.serving import (
    ClusterFeatures,
    Resolution,
    ServingError,
    ServingPlan,
    ServingProblem,
    ServingReason,
    missing_finetunejob,
    plan_serving,
)
from kubetune.operator.serving_objects import ANNOTATION_ARTIFACT_DIGEST
from kubetune.operator.serving_status import (
    AVAILABLE,
    PROGRESSING,
    READY,
    compute_serving_status,
    crash_loop,
    dump_serving_status,
    load_serving_status,
    serving_status_patch,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
LATER = NOW + timedelta(minutes=5)
ENDPOINT = "http://support-bot.ml-team.svc:8000/v1"
GENERATION = 3
MD = make_md()


def plan(digest: str = DIGEST_A) -> ServingPlan:
    return plan_serving(MD, Resolution(model=artifact(digest=digest)), SETTINGS, ClusterFeatures())


WAITING = ServingError([missing_finetunejob("spec.model.fineTuneJobRef", "support-bot", NAMESPACE)])
REFUSED = ServingError(
    [
        ServingProblem(
            "spec.model.variant",
            ServingReason.ADAPTER_INCOMPATIBLE,
            "the adapter uses DoRA; deploy variant Merged",
        )
    ]
)


def deployment(
    *,
    ready: int = 1,
    replicas: int = 1,
    updated: int | None = None,
    generation: int = 2,
    observed: int = 2,
    digest: str = DIGEST_A,
    available: str = "True",
    progressing: tuple[str, str] = ("True", "NewReplicaSetAvailable"),
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "support-bot", "namespace": NAMESPACE, "generation": generation},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {ANNOTATION_ARTIFACT_DIGEST: digest}}},
        },
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": [
                {
                    "type": "Available",
                    "status": available,
                    "reason": "MinimumReplicasAvailable"
                    if available == "True"
                    else "MinimumReplicasUnavailable",
                    "message": "Deployment has minimum availability.",
                },
                {
                    "type": "Progressing",
                    "status": progressing[0],
                    "reason": progressing[1],
                    "message": 'ReplicaSet "support-bot-6d5f" has successfully progressed.',
                },
            ],
        },
    }


def pod(
    name: str = "support-bot-6d5f8-abcde",
    *,
    md: str = "support-bot",
    containers: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {"kubetune.io/modeldeployment": md},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-03-01T11:59:00Z"
    status: dict[str, Any] = {"phase": "Running"}
    if containers is not None:
        status["containerStatuses"] = containers
    if init is not None:
        status["initContainerStatuses"] = init
    if conditions is not None:
        status["conditions"] = conditions
    return {"metadata": metadata, "status": status}


def container(
    name: str = "vllm",
    *,
    ready: bool = True,
    restarts: int = 0,
    waiting: str | None = None,
    running: bool = True,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting, "message": f"{waiting} details"}
    elif running:
        state["running"] = {"startedAt": "2026-03-01T11:00:00Z"}
    status: dict[str, Any] = {
        "name": name,
        "ready": ready,
        "restartCount": restarts,
        "state": state,
    }
    if last is not None:
        status["lastState"] = {"terminated": last}
    return status


VLLM_TRACEBACK = {
    "exitCode": 1,
    "reason": "Error",
    "message": "ValueError: LoRA rank 64 is greater than max_lora_rank 16",
}


def status_of(
    outcome: ServingPlan | ServingError,
    deploy: dict[str, Any] | None = None,
    pods: list[dict[str, Any]] | None = None,
    previous: ModelDeploymentStatus | None = None,
    now: datetime = NOW,
    md: ModelDeployment = MD,
) -> ModelDeploymentStatus:
    status = compute_serving_status(md, GENERATION, previous, deploy, pods or [], outcome, now)
    # What is written must be readable back (the CRD schema comes from the same model).
    assert load_serving_status(dump_serving_status(status)) == status
    return status


def conditions(status: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in status.conditions or ()}


def message(status: ModelDeploymentStatus, type_: str = READY) -> str:
    return next(c.message for c in status.conditions or () if c.type == type_)


# --- The summary ------------------------------------------------------------------------

CASES: dict[str, tuple[Any, ...]] = {
    "creating": (
        plan(),
        None,
        [],
        {
            READY: ("False", "Deploying"),
            AVAILABLE: ("False", "Deploying"),
            PROGRESSING: ("True", "Deploying"),
        },
        "Creating Deployment support-bot",
    ),
    "serving": (
        plan(),
        deployment(ready=2, replicas=2),
        [pod(containers=[container()])],
        {
            READY: ("True", "Serving"),
            AVAILABLE: ("True", "MinimumReplicasAvailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        f"Serving support-bot at {ENDPOINT} (2 of 2 replicas ready)",
    ),
    "rolling-out-a-new-artifact": (
        plan(DIGEST_B),
        deployment(ready=1, replicas=1, updated=0, digest=DIGEST_B),
        [pod(containers=[container()])],
        {
            READY: ("True", "Serving"),
            AVAILABLE: ("True", "MinimumReplicasAvailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        f"rolling out {DIGEST_B} (0 of 1 updated)",
    ),
    "generation-not-observed": (
        plan(),
        deployment(generation=3, observed=2),
        [pod(containers=[container()])],
        {
            READY: ("False", "Deploying"),
            AVAILABLE: ("True", "MinimumReplicasAvailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "rolling out generation 3",
    ),
    "loading-the-model": (
        plan(),
        deployment(ready=0, available="False", progressing=("True", "ReplicaSetUpdated")),
        [pod(containers=[container(ready=False)])],
        {
            READY: ("False", "Deploying"),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "ReplicaSetUpdated"),
        },
        "vLLM is loading the model",
    ),
    "fetching-the-model": (
        plan(),
        deployment(ready=0, available="False"),
        [pod(init=[container("fetch-model", ready=False)], containers=[])],
        {
            READY: ("False", "Deploying"),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "is fetching the model (init container fetch-model)",
    ),
    "no-gpu-free": (
        plan(),
        deployment(ready=0, available="False"),
        [
            pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    }
                ]
            )
        ],
        {
            READY: ("False", "Deploying"),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "is not scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
    ),
    "adapter-fails-to-load": (
        plan(),
        deployment(ready=1, replicas=2),
        [
            pod("support-bot-6d5f8-aaaaa", containers=[container()]),
            pod(
                "support-bot-6d5f8-bbbbb",
                containers=[
                    container(
                        ready=False, restarts=4, waiting="CrashLoopBackOff", last=VLLM_TRACEBACK
                    )
                ],
            ),
        ],
        {
            READY: ("False", "CrashLooping"),
            AVAILABLE: ("True", "MinimumReplicasAvailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "LoRA rank 64 is greater than max_lora_rank 16",
    ),
    "restarting-without-backoff-yet": (
        plan(),
        deployment(ready=0, available="False"),
        [pod(containers=[container(ready=False, restarts=3, last=VLLM_TRACEBACK)])],
        {
            READY: ("False", "CrashLooping"),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "(3 restarts); last exit code 1 (Error)",
    ),
    "fetch-cannot-find-the-run": (
        plan(),
        deployment(ready=0, available="False"),
        [
            pod(
                init=[
                    container(
                        "fetch-model",
                        ready=False,
                        restarts=2,
                        waiting="CrashLoopBackOff",
                        last={"exitCode": 13, "reason": "Error", "message": "no manifest.json"},
                    )
                ],
                containers=[],
            )
        ],
        {
            READY: ("False", Reason.SOURCE_NOT_FOUND.value),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "Init container fetch-model of pod support-bot-6d5f8-abcde is crash-looping",
    ),
    "out-of-memory": (
        plan(),
        deployment(ready=0, available="False"),
        [
            pod(
                containers=[
                    container(
                        ready=False,
                        restarts=1,
                        waiting="CrashLoopBackOff",
                        last={"exitCode": 137, "reason": "OOMKilled"},
                    )
                ]
            )
        ],
        {
            READY: ("False", Reason.OUT_OF_MEMORY.value),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "raise spec.resources.memory",
    ),
    "missing-secret": (
        plan(),
        deployment(ready=0, available="False"),
        [
            pod(
                init=[container("fetch-model", ready=False, waiting="CreateContainerConfigError")],
                containers=[],
            )
        ],
        {
            READY: ("False", "CreateContainerConfigError"),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "is waiting: CreateContainerConfigError: CreateContainerConfigError details",
    ),
    "rollout-stalled": (
        plan(),
        deployment(ready=0, available="False", progressing=("False", "ProgressDeadlineExceeded")),
        [],
        {
            READY: ("False", "Deploying"),
            AVAILABLE: ("False", "MinimumReplicasUnavailable"),
            PROGRESSING: ("False", "ProgressDeadlineExceeded"),
        },
        "Waiting for the pods of Deployment support-bot",
    ),
    "scaled-to-zero": (
        plan(),
        deployment(ready=0, replicas=0, available="True"),
        [],
        {
            READY: ("False", "ScaledToZero"),
            AVAILABLE: ("True", "MinimumReplicasAvailable"),
            PROGRESSING: ("True", "NewReplicaSetAvailable"),
        },
        "scaled to zero replicas",
    ),
    "waiting-for-the-job": (
        WAITING,
        None,
        [],
        {
            READY: ("False", Reason.SOURCE_NOT_FOUND.value),
            AVAILABLE: ("Unknown", Reason.SOURCE_NOT_FOUND.value),
            PROGRESSING: ("Unknown", Reason.SOURCE_NOT_FOUND.value),
        },
        "FineTuneJob support-bot not found in namespace ml-team",
    ),
    "refused": (
        REFUSED,
        None,
        [],
        {
            READY: ("False", "AdapterIncompatible"),
            AVAILABLE: ("False", "AdapterIncompatible"),
            PROGRESSING: ("False", "AdapterIncompatible"),
        },
        "spec.model.variant: the adapter uses DoRA; deploy variant Merged",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_conditions(case: str) -> None:
    outcome, deploy, pods, expected, text = CASES[case]
    status = status_of(outcome, deploy, pods)
    assert conditions(status) == expected
    assert text in message(status)
    assert status.observed_generation == GENERATION
    assert all(c.observed_generation == GENERATION for c in status.conditions or ())


def test_a_serving_status_has_the_endpoint_models_and_lineage() -> None:
    status = status_of(plan(), deployment(ready=2, replicas=3), [])
    assert status.endpoint == ENDPOINT
    assert status.artifact_digest == DIGEST_A
    assert (status.replicas, status.ready_replicas) == (3, 2)
    assert [m.name for m in status.served_models or ()] == ["support-bot"]
    assert status.lineage is not None
    assert status.lineage.run_id == "4f702c671992"
    assert status.lineage.eval_scores == {"Perplexity": "3.25", "ROUGEL": "0.4512"}


def test_a_refusal_without_a_deployment_has_no_endpoint() -> None:
    status = status_of(REFUSED)
    assert status.endpoint is None
    assert status.served_models is None
    assert status.artifact_digest is None
    assert (status.replicas, status.ready_replicas) == (None, None)


def test_a_refusal_keeps_what_the_deployment_still_serves() -> None:
    before = status_of(plan(), deployment(), [pod(containers=[container()])])
    after = status_of(REFUSED, deployment(), [pod(containers=[container()])], previous=before)
    assert conditions(after)[READY] == ("False", "AdapterIncompatible")
    assert "keeps serving what it served before" in message(after)
    assert conditions(after)[AVAILABLE] == ("True", "MinimumReplicasAvailable")
    assert after.served_models == before.served_models
    assert after.lineage == before.lineage
    assert after.artifact_digest == DIGEST_A
    assert after.endpoint == ENDPOINT


def test_pods_of_other_deployments_and_terminating_pods_are_ignored() -> None:
    crashing = [container(ready=False, restarts=9, waiting="CrashLoopBackOff", last=VLLM_TRACEBACK)]
    pods = [
        pod("other-5f-xxxxx", md="other", containers=crashing),
        pod("support-bot-old-yyyyy", containers=crashing, deleting=True),
    ]
    status = status_of(plan(), deployment(), pods)
    assert conditions(status)[READY] == ("True", "Serving")


@pytest.mark.parametrize(
    ("status", "looping"),
    [
        (container(), False),
        (container(restarts=5, last=VLLM_TRACEBACK), False),  # recovered: ready now
        (container(ready=False, restarts=2, last=VLLM_TRACEBACK), False),
        (container(ready=False, restarts=3, last=VLLM_TRACEBACK), True),
        (container(ready=False, restarts=1, waiting="CrashLoopBackOff", last=VLLM_TRACEBACK), True),
    ],
    ids=["healthy", "recovered", "two-restarts", "three-restarts", "backoff"],
)
def test_crash_loop_detection(status: dict[str, Any], looping: bool) -> None:
    assert (crash_loop([pod(containers=[status])]) is not None) is looping


def test_crash_messages_are_cleaned_and_capped() -> None:
    last = {
        "exitCode": 1,
        "reason": "Error",
        "message": "boto3 failed with aws_secret_access_key=abc123secret\n" + "x" * 5000,
    }
    verdict = crash_loop(
        [pod(containers=[container(ready=False, waiting="CrashLoopBackOff", last=last)])]
    )
    assert verdict is not None
    _, _, text = verdict
    assert "abc123secret" not in text
    assert "\n" not in text
    assert len(text) <= 1024


# --- Transitions and writing ------------------------------------------------------------


def test_last_transition_time_changes_only_when_the_status_flips() -> None:
    first = status_of(plan(), deployment(ready=0, available="False"), [])
    second = status_of(
        plan(), deployment(ready=0, available="False"), [], previous=first, now=LATER
    )
    assert second.conditions == first.conditions
    assert serving_status_patch(dump_serving_status(first), second) is None
    ready = status_of(plan(), deployment(ready=1), [], previous=second, now=LATER)
    times = {c.type: c.last_transition_time for c in ready.conditions or ()}
    before = {c.type: c.last_transition_time for c in first.conditions or ()}
    assert times[READY] == "2026-03-01T12:05:00Z"
    assert times[AVAILABLE] == "2026-03-01T12:05:00Z"
    assert times[PROGRESSING] == before[PROGRESSING]  # True both times


def test_status_patch() -> None:
    first = status_of(plan(), deployment(ready=0, available="False"), [])
    stored = dump_serving_status(first)
    assert serving_status_patch(stored, first) is None
    # Another controller's keys are left alone and do not count as a change.
    assert serving_status_patch({**stored, "kopf": {"progress": {}}}, first) is None
    ready = status_of(plan(), deployment(ready=1), [], previous=first, now=LATER)
    patch = serving_status_patch(stored, ready)
    assert patch is not None
    assert patch["readyReplicas"] == 1
    assert {c["type"] for c in patch["conditions"]} == {READY, AVAILABLE, PROGRESSING}
    assert "endpoint" not in patch
    refused = status_of(REFUSED)
    removal = serving_status_patch(stored, refused)
    assert removal is not None
    assert removal["endpoint"] is None
    assert serving_status_patch(None, first) == stored


def test_unreadable_stored_status_is_treated_as_none() -> None:
    assert load_serving_status(None) is None
    assert load_serving_status({"replicas": "many"}) is None
    stored = dump_serving_status(status_of(plan(), deployment(), []))
    assert load_serving_status({**stored, "extra": 1}) == load_serving_status(stored)


def test_the_status_does_not_depend_on_the_input_order_of_pods() -> None:
    a = pod("support-bot-6d5f8-aaaaa", containers=[container(ready=False)])
    b = pod(
        "support-bot-6d5f8-bbbbb",
        containers=[container(ready=False, waiting="CrashLoopBackOff", last=VLLM_TRACEBACK)],
    )
    one = status_of(plan(), deployment(ready=0), [a, b])
    two = status_of(plan(), deployment(ready=0), [copy.deepcopy(b), copy.deepcopy(a)])
    assert one == two
    assert conditions(one)[READY][0] == ConditionStatus.FALSE.value
