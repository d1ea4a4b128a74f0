"""FineTuneJob status from what the operator observes: one row per Job and pod situation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.contract import Reason, TrainerResult, exit_code_for
from kubetune.api.meta import ConditionStatus
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.status import (
    FineTuneJobStatus,
    JobStage,
    RunRecord,
    RunState,
    StageState,
)
from kubetune.operator import names
from kubetune.operator.pod_state import (
    MESSAGE_LIMIT,
    clean_message,
    gpu_hours,
    latest_result,
    parse_termination_message,
)
from kubetune.operator.progress import Scrape, StageSample
from kubetune.operator.status import (
    CONDITION_TYPES,
    Observed,
    Refusal,
    compute_status,
    dump_status,
    events_for,
    load_status,
    status_patch,
)
from kubetune.storage.layout import run_id_for

ROOT = Path(__file__).parents[3]
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
STARTED = "2025-03-01T10:00:00Z"
RUN_ROOT = "s3://ml-artifacts/kubetune/ml-team/support-bot-lora"
OOM_ADVICE = (
    "CUDA out of memory at step 12 (peak 79.1 GiB of 80 GiB). Lower training.batchSize to 4 "
    "or set training.gradientCheckpointing: Enabled; the calculator estimates 61 GiB then."
)


def example(name: str) -> FineTuneJobSpec:
    data = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    return FineTuneJob.model_validate(data).spec


LORA = example("finetunejob-lora")
DPO = example("finetunejob-dpo")
RUN = run_id_for(LORA)


def edited(spec: FineTuneJobSpec, **changes: Any) -> FineTuneJobSpec:
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    wire.update(changes)
    return FineTuneJobSpec.model_validate(wire)


# --- Kubernetes objects as the API server returns them --------------------------------


def job(
    spec: FineTuneJobSpec = LORA,
    *,
    condition: tuple[str, str] | None = None,
    failed: int = 0,
    suspend: bool = False,
    run_id: str | None = None,
    completion: str | None = None,
) -> dict[str, Any]:
    run = run_id or run_id_for(spec)
    status: dict[str, Any] = {"failed": failed} if failed else {}
    if not suspend:
        status["startTime"] = STARTED
    if condition is not None:
        kind, reason = condition
        status["conditions"] = [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": f"Job has reached the specified {reason}",
                "lastTransitionTime": "2025-03-01T11:30:00Z",
            }
        ]
    if completion:
        status["completionTime"] = completion
    return {
        "metadata": {
            "name": names.job_name("support-bot-lora", run),
            "labels": names.labels("support-bot-lora", run),
            "annotations": {names.ANNOTATION_SPEC_HASH: names.spec_hash(spec)},
        },
        "spec": {"suspend": suspend, "backoffLimit": spec.backoff_limit},
        "status": status,
    }


def result(reason: Reason, message: str = "", **fields: Any) -> str:
    return TrainerResult(reason=reason, message=message, **fields).to_termination_message()


def pod(
    name: str,
    phase: str,
    *,
    created: str = "2025-03-01T10:00:00Z",
    start: str | None = STARTED,
    finished: str | None = None,
    exit_code: int | None = None,
    message: str | None = None,
    gpus: int = 1,
    waiting: tuple[str, str] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    run_id: str = RUN,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if phase == "Running":
        state = {"running": {"startedAt": start}}
    elif exit_code is not None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "startedAt": start,
                "finishedAt": finished or "2025-03-01T11:00:00Z",
                **({"message": message} if message is not None else {}),
            }
        }
    elif waiting is not None:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if start and phase != "Pending":
        status["startTime"] = start
    if phase != "Pending":
        status["podIP"] = "10.0.0.7"
    status["containerStatuses"] = [{"name": "trainer", "state": state}]
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": names.labels("support-bot-lora", run_id),
        },
        "spec": {
            "containers": [
                {"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
            ]
        },
        "status": status,
    }


def sft_progress(step: int = 40, total: int = 100, stage: str = "SFT") -> Scrape:
    sample = StageSample(
        stage=stage,
        step=step,
        total_steps=total,
        loss=1.234567,
        learning_rate=2e-4,
        tokens_per_second=1234.5,
        eta_seconds=750,
        epoch=0.4,
    )
    return Scrape(stages=(sample,), observed_at=NOW)


UNSCHEDULABLE = [
    {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }
]
PREEMPTED = [
    {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "PreemptionByScheduler",
        "message": "Preempted in order to admit critical pod",
    }
]
SUCCESS_RESULT = result(
    Reason.SUCCEEDED,
    run_uri=f"{RUN_ROOT}/{RUN}",
    manifest_digest="sha256:" + "a" * 64,
    gate_passed=True,
    metrics={"ROUGEL": "0.4123", "Perplexity": "5.21"},
    step=300,
)


# --- The table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One observed situation and what the status must say."""

    observed: Observed
    stage: JobStage
    succeeded: tuple[ConditionStatus, str]
    says: str = ""
    details: dict[str, ConditionStatus] = field(default_factory=dict)
    spec: FineTuneJobSpec = field(default_factory=lambda: LORA)


T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


def seen(**kwargs: Any) -> Observed:
    return Observed.of(NOW, **kwargs)


CASES: dict[str, Case] = {
    "no-job-yet": Case(seen(), JobStage.PENDING, (U, "Pending"), "Creating the Job of run"),
    "job-pending-unschedulable": Case(
        seen(job=job(), pods=[pod("p0", "Pending", start=None, conditions=UNSCHEDULABLE)]),
        JobStage.PENDING,
        (U, "Pending"),
        "Insufficient nvidia.com/gpu",
        {"DataPrepared": U},
    ),
    "image-pulling": Case(
        seen(job=job(), pods=[pod("p0", "Pending", waiting=("ImagePullBackOff", "back-off"))]),
        JobStage.PENDING,
        (U, "Pending"),
        "waiting: ImagePullBackOff",
    ),
    "running-preparing-data": Case(
        seen(job=job(), pods=[pod("p0", "Running")]),
        JobStage.PREPARING,
        (U, "Running"),
        f"Preparing run {RUN}",
        {"DataPrepared": U, "Trained": U},
    ),
    "running-with-progress": Case(
        seen(job=job(), pods=[pod("p0", "Running")], progress=sft_progress()),
        JobStage.TRAINING,
        (U, "Running"),
        f"Training run {RUN}",
        {"DataPrepared": T, "Trained": U, "GatePassed": U},
    ),
    "running-past-the-last-step": Case(
        seen(job=job(), pods=[pod("p0", "Running")], progress=sft_progress(100, 100)),
        JobStage.EVALUATING,
        (U, "Running"),
        details={"DataPrepared": T, "Trained": T, "Evaluated": U},
    ),
    "succeeded-with-result": Case(
        seen(
            job=job(
                condition=("Complete", "CompletionsReached"), completion="2025-03-01T11:45:00Z"
            ),
            pods=[pod("p0", "Succeeded", exit_code=0, message=SUCCESS_RESULT)],
        ),
        JobStage.SUCCEEDED,
        (T, "Succeeded"),
        f"{RUN_ROOT}/{RUN}",
        dict.fromkeys(CONDITION_TYPES[1:], T),
    ),
    "gate-failed": Case(
        seen(
            job=job(condition=("Complete", "CompletionsReached")),
            pods=[
                pod(
                    "p0",
                    "Succeeded",
                    exit_code=0,
                    message=result(
                        Reason.EVALUATION_GATE_FAILED,
                        "ROUGEL 0.012 is below Base + 0.02 (0.031)",
                        run_uri=f"{RUN_ROOT}/{RUN}",
                        manifest_digest="sha256:" + "b" * 64,
                        gate_passed=False,
                        metrics={"ROUGEL": "0.012"},
                    ),
                )
            ],
        ),
        JobStage.FAILED,
        (F, "EvaluationGateFailed"),
        "ROUGEL 0.012 is below Base",
        {"DataPrepared": T, "Trained": T, "Evaluated": T, "Exported": T, "GatePassed": F},
    ),
    "user-error-fails-fast": Case(
        seen(
            job=job(condition=("Failed", "PodFailurePolicy"), failed=1),
            pods=[
                pod(
                    "p0",
                    "Failed",
                    exit_code=exit_code_for(Reason.DATASET_INVALID),
                    message=result(
                        Reason.DATASET_INVALID,
                        "s3://ml-data/support/tickets-1.jsonl line 17: no assistant turn",
                    ),
                )
            ],
        ),
        JobStage.FAILED,
        (F, "DatasetInvalid"),
        "line 17: no assistant turn",
        {"DataPrepared": F, "Trained": F, "GatePassed": F},
    ),
    "out-of-memory-with-advice": Case(
        seen(
            job=job(condition=("Failed", "PodFailurePolicy"), failed=1),
            pods=[
                pod(
                    "p0",
                    "Failed",
                    exit_code=30,
                    message=result(Reason.OUT_OF_MEMORY, OOM_ADVICE, step=12),
                )
            ],
        ),
        JobStage.FAILED,
        (F, "OutOfMemory"),
        "Lower training.batchSize to 4",
        {"DataPrepared": T, "Trained": F, "Evaluated": F},
    ),
    "out-of-memory-from-the-exit-code-alone": Case(
        seen(
            job=job(condition=("Failed", "PodFailurePolicy"), failed=1),
            pods=[pod("p0", "Failed", exit_code=30, message='{"schemaVersion":1,"reas')],
        ),
        JobStage.FAILED,
        (F, "OutOfMemory"),
        "exited with code 30",
    ),
    "deadline-exceeded": Case(
        seen(
            job=job(
                edited(LORA, activeDeadlineSeconds=3600), condition=("Failed", "DeadlineExceeded")
            ),
            pods=[pod("p0", "Failed", exit_code=143)],
        ),
        JobStage.FAILED,
        (F, "DeadlineExceeded"),
        "activeDeadlineSeconds (3600s)",
        spec=edited(LORA, activeDeadlineSeconds=3600),
    ),
    "backoff-exceeded-after-retries": Case(
        seen(
            job=job(condition=("Failed", "BackoffLimitExceeded"), failed=4),
            pods=[
                pod(
                    f"p{i}",
                    "Failed",
                    created=f"2025-03-01T1{i}:00:00Z",
                    start=f"2025-03-01T1{i}:00:10Z",
                    finished=f"2025-03-01T1{i}:30:00Z",
                    exit_code=42,
                    message=result(
                        Reason.INFRASTRUCTURE_ERROR,
                        f"NCCL error on attempt {i}",
                        resumed_from_step=100 * i,
                        step=100 * i + 50,
                    ),
                )
                for i in range(4)
            ],
        ),
        JobStage.FAILED,
        (F, "BackoffLimitExceeded"),
        "failed 4 times (backoffLimit 3); last error InfrastructureError: NCCL error on attempt 3",
        {"DataPrepared": T, "Trained": F, "GatePassed": F},
    ),
    "retrying-after-an-infrastructure-error": Case(
        seen(
            job=job(failed=1),
            pods=[
                pod("p0", "Failed", exit_code=42, message=result(Reason.INFRASTRUCTURE_ERROR, "x")),
                pod("p1", "Running", created="2025-03-01T11:00:00Z", start="2025-03-01T11:00:05Z"),
            ],
            progress=sft_progress(250, 300),
        ),
        JobStage.TRAINING,
        (U, "Running"),
        "(attempt 2 of 4)",
    ),
    "preempted-and-waiting-for-a-node": Case(
        seen(
            job=job(),
            pods=[
                pod("p0", "Failed", exit_code=43, conditions=PREEMPTED),
                pod(
                    "p1",
                    "Pending",
                    created="2025-03-01T11:00:00Z",
                    start=None,
                    conditions=UNSCHEDULABLE,
                ),
            ],
        ),
        JobStage.PENDING,
        (U, "Preempted"),
        "Preempted in order to admit critical pod",
    ),
    "suspended": Case(
        seen(job=job(edited(LORA, suspend=True), suspend=True)),
        JobStage.SUSPENDED,
        (U, "Suspended"),
        "spec.suspend",
        spec=edited(LORA, suspend=True),
    ),
    "suspended-before-any-job": Case(
        seen(), JobStage.SUSPENDED, (U, "Suspended"), spec=edited(LORA, suspend=True)
    ),
    "queued-in-kueue": Case(
        seen(job=job(edited(LORA, queueName="team-a"), suspend=True)),
        JobStage.PENDING,
        (U, "Queued"),
        "waiting for Kueue admission in queue team-a",
        spec=edited(LORA, queueName="team-a"),
    ),
    "refused-insufficient-gpu-memory": Case(
        seen(
            refusal=Refusal(
                Reason.INSUFFICIENT_GPU_MEMORY,
                "spec.resources.gpus: needs 2 GPUs of class h100-80gb; set gpus: 2",
            )
        ),
        JobStage.FAILED,
        (F, "InsufficientGPUMemory"),
        "set gpus: 2",
        {"DataPrepared": F, "GatePassed": F},
    ),
    "refused-local-uri": Case(
        seen(
            refusal=Refusal(
                Reason.LOCAL_URI_IN_CLUSTER,
                "spec.model.uri: ./models/llama is a local path; use hf://, s3:// or pvc://",
            )
        ),
        JobStage.FAILED,
        (F, "LocalURIInCluster"),
        "local path",
    ),
    "refused-secret-not-found-waits": Case(
        seen(refusal=Refusal(Reason.SECRET_NOT_FOUND, "Secret hf-token not found: create it")),
        JobStage.PENDING,
        (U, "SecretNotFound"),
        "create it",
        {"DataPrepared": U},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_status_of_each_situation(case: Case) -> None:
    status = compute_status(case.spec, 7, None, case.observed)
    assert status.stage == case.stage
    conditions = {c.type: c for c in status.conditions or ()}
    assert set(conditions) == set(CONDITION_TYPES)
    succeeded = conditions["Succeeded"]
    assert (succeeded.status, succeeded.reason) == case.succeeded
    assert case.says in succeeded.message
    for type_, expected in case.details.items():
        assert conditions[type_].status == expected, type_
    assert all(c.observed_generation == 7 for c in conditions.values())
    assert all(c.last_transition_time == "2025-03-01T12:00:00Z" for c in conditions.values())
    assert status.observed_generation == 7
    assert status.run_id == run_id_for(case.spec)
    assert status.lineage is not None
    assert status.lineage.spec_hash is not None
    # Everything written must be accepted back by the API model (length limits included).
    assert FineTuneJobStatus.model_validate(dump_status(status)) == status


def status_of(name: str, previous: FineTuneJobStatus | None = None) -> FineTuneJobStatus:
    case = CASES[name]
    return compute_status(case.spec, 7, previous, case.observed)


def test_running_status_fills_the_printer_columns() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    columns = {
        c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    obj = {"status": dump_status(status_of("running-with-progress"))}

    def read(path: str) -> Any:
        # The two JSONPath forms the columns use: .a.b and .a.list[?(@.type=="X")].b
        node: Any = obj
        for part in re.findall(r'[A-Za-z]+(?:\[\?\(@\.type=="[A-Za-z]+"\)\])?', path):
            name, _, wanted = part.partition('[?(@.type=="')
            node = node[name]
            if wanted:
                node = next(c for c in node if c["type"] == wanted[: -len('")]')])
        return node

    shown = {
        name: read(columns[name]) for name in ("Stage", "Progress", "Loss", "ETA", "Succeeded")
    }
    assert shown == {
        "Stage": "Training",
        "Progress": "40%",
        "Loss": "1.2346",
        "ETA": "12m",
        "Succeeded": "Unknown",
    }
    assert read(columns["Run"]) == RUN


def test_running_status_details() -> None:
    status = status_of("running-with-progress")
    assert status.progress is not None
    assert (status.progress.step, status.progress.total_steps) == (40, 100)
    assert status.progress.tokens_per_second == "1234.5"
    assert status.progress.learning_rate == "2.00e-04"
    assert status.stages is not None
    assert [(s.name, s.state, s.step, s.total_steps) for s in status.stages] == [
        ("0-sft", StageState.RUNNING, 40, 100)
    ]
    assert status.stages[0].metrics == {"loss": "1.2346"}
    assert status.start_time == STARTED
    assert status.completion_time is None
    # One GPU for two hours so far.
    assert status.gpu_hours == "2.00"
    assert status.runs is not None
    assert [(r.run_id, r.state) for r in status.runs] == [(RUN, RunState.RUNNING)]


def test_succeeded_status_lists_artifacts_metrics_and_the_run() -> None:
    status = status_of("succeeded-with-result")
    run_uri = f"{RUN_ROOT}/{RUN}"
    assert status.artifacts is not None
    assert status.artifacts.model_dump(exclude_none=True) == {
        "run_uri": run_uri,
        "manifest_digest": "sha256:" + "a" * 64,
        "adapter": f"{run_uri}/adapter/",
        "merged": f"{run_uri}/merged/",
        "quantized": {"W4A16": f"{run_uri}/quantized/W4A16/", "FP8": f"{run_uri}/quantized/FP8/"},
        "report": f"{run_uri}/eval/report.html",
    }
    assert status.metrics == {"ROUGEL": "0.4123", "Perplexity": "5.21"}
    assert status.completion_time == "2025-03-01T11:45:00Z"
    assert status.progress is None  # never scraped: nothing invented
    assert status.runs is not None
    record = status.runs[0]
    assert (record.state, record.gate_passed, record.run_uri) == (RunState.SUCCEEDED, True, run_uri)
    assert status.lineage is not None
    assert status.lineage.model_uri == LORA.model.uri
    assert status.lineage.model_revision == LORA.model.revision


def test_gate_failure_still_lists_the_artifacts() -> None:
    status = status_of("gate-failed")
    assert status.artifacts is not None
    assert status.artifacts.manifest_digest == "sha256:" + "b" * 64
    assert status.runs is not None
    assert (status.runs[0].state, status.runs[0].gate_passed) == (RunState.FAILED, False)
    gate = next(c for c in status.conditions or () if c.type == "GatePassed")
    assert (gate.reason, gate.message) == (
        "EvaluationGateFailed",
        "ROUGEL 0.012 is below Base + 0.02 (0.031)",
    )


def test_backoff_failure_reports_resumed_step_and_gpu_hours() -> None:
    status = status_of("backoff-exceeded-after-retries")
    assert status.resumed_from_step == 300  # the last attempt resumed from step 300
    # Four attempts of one GPU, each 29m50s.
    assert status.gpu_hours == f"{4 * (29 * 60 + 50) / 3600:.2f}"
    assert status.completion_time == "2025-03-01T11:30:00Z"


def test_oom_marks_the_stage_that_failed() -> None:
    status = status_of("out-of-memory-with-advice")
    assert status.stages is not None
    assert status.stages[0].state == StageState.FAILED
    trained = next(c for c in status.conditions or () if c.type == "Trained")
    assert (trained.reason, trained.message) == ("OutOfMemory", OOM_ADVICE)


def test_chained_stages_are_named_like_the_trainers_folders() -> None:
    sft = StageSample(stage="SFT", step=200, total_steps=200, loss=1.1)
    dpo = StageSample(stage="DPO", step=5, total_steps=50, loss=0.69)
    observed = seen(
        job=job(DPO),
        pods=[pod("p0", "Running", run_id=run_id_for(DPO))],
        progress=Scrape((sft, dpo), observed_at=NOW),
    )
    status = compute_status(DPO, 1, None, observed)
    assert status.stages is not None
    assert [(s.name, s.state, s.step) for s in status.stages] == [
        ("0-sft", StageState.SUCCEEDED, 200),
        ("1-dpo", StageState.RUNNING, 5),
    ]
    assert status.progress is not None
    assert status.progress.percent == "10%"
    # A restarted pod's endpoint knows only the stage it runs: what was done stays done.
    restarted = seen(
        job=job(DPO),
        pods=[pod("p1", "Running", run_id=run_id_for(DPO))],
        progress=Scrape((replace(dpo, step=7),), observed_at=NOW),
    )
    again = compute_status(DPO, 1, status, restarted)
    assert again.stages is not None
    assert [(s.state, s.step) for s in again.stages] == [
        (StageState.SUCCEEDED, 200),
        (StageState.RUNNING, 7),
    ]


def test_progress_survives_a_missed_scrape_and_completes_on_success() -> None:
    running = status_of("running-with-progress")
    missed = compute_status(LORA, 7, running, seen(job=job(), pods=[pod("p0", "Running")]))
    assert missed.progress == running.progress
    assert missed.stage == JobStage.TRAINING  # what was reached stays reached
    done = compute_status(LORA, 7, missed, CASES["succeeded-with-result"].observed)
    assert done.progress is not None
    assert (done.progress.step, done.progress.percent, done.progress.eta) == (100, "100%", None)


def test_last_transition_time_changes_only_when_the_status_flips() -> None:
    first = status_of("running-preparing-data")
    later = replace(CASES["running-with-progress"].observed, now=NOW + timedelta(minutes=5))
    second = compute_status(LORA, 7, first, later)
    before = {c.type: c for c in first.conditions or ()}
    after = {c.type: c for c in second.conditions or ()}
    assert after["DataPrepared"].status == "True"
    assert after["DataPrepared"].last_transition_time == "2025-03-01T12:05:00Z"
    for type_ in ("Succeeded", "Trained", "Evaluated", "Exported", "GatePassed"):
        assert after[type_].last_transition_time == before[type_].last_transition_time, type_
    # The same observation later: nothing moves.
    third = compute_status(LORA, 8, second, replace(later, now=NOW + timedelta(hours=1)))
    assert [c.last_transition_time for c in third.conditions or ()] == [
        c.last_transition_time for c in second.conditions or ()
    ]
    assert all(c.observed_generation == 8 for c in third.conditions or ())


def test_status_patch_is_none_when_nothing_changed() -> None:
    status = status_of("running-with-progress")
    stored = dump_status(status)
    assert status_patch(stored, status) is None
    # A new poll with the same numbers only moves updateTime: not worth a write.
    later = replace(
        CASES["running-with-progress"].observed,
        progress=replace(sft_progress(), observed_at=NOW + timedelta(seconds=30)),
    )
    again = compute_status(LORA, 7, status, later)
    assert again.progress is not None
    assert again.progress.update_time == "2025-03-01T12:00:30Z"
    assert status_patch(stored, again) is None


def test_status_patch_carries_changes_and_removals_only() -> None:
    running = status_of("running-with-progress")
    stored = dump_status(running)
    stored["kopf"] = {"progress": {}}  # another writer's key: left alone
    advanced = compute_status(
        LORA,
        7,
        running,
        replace(CASES["running-with-progress"].observed, progress=sft_progress(60)),
    )
    patch = status_patch(stored, advanced)
    assert patch is not None
    assert set(patch) == {"progress", "stages"}
    assert patch["progress"] == {"step": 60, "percent": "60%"}
    assert "kopf" not in patch
    done = compute_status(LORA, 7, advanced, CASES["succeeded-with-result"].observed)
    patch = status_patch(dump_status(advanced), done)
    assert patch is not None
    assert patch["progress"]["eta"] is None  # a merge patch removes the stale ETA
    assert patch["stage"] == "Succeeded"


def test_events_on_transitions_only() -> None:
    pending = status_of("job-pending-unschedulable")
    first = events_for(None, pending)
    assert [(e.type, e.reason) for e in first] == [("Normal", "Pending")]
    assert events_for(pending, pending) == []
    running = compute_status(LORA, 7, pending, CASES["running-with-progress"].observed)
    events = events_for(pending, running)
    assert ("Normal", "Training", "Stage Pending → Training") in [
        (e.type, e.reason, e.message) for e in events
    ]
    assert (
        "Normal",
        "Succeeded",
        "DataPrepared is True: The training and validation data are prepared",
    ) in [(e.type, e.reason, e.message) for e in events]
    # Progress alone is no event.
    advanced = compute_status(
        LORA,
        7,
        running,
        replace(CASES["running-with-progress"].observed, progress=sft_progress(60)),
    )
    assert events_for(running, advanced) == []
    failed = compute_status(LORA, 7, advanced, CASES["out-of-memory-with-advice"].observed)
    # One failure, told once: the stage and the Succeeded summary (the detail conditions
    # that fail with it are folded in).
    events = events_for(advanced, failed)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "Failed"),
        ("Warning", "OutOfMemory"),
    ]
    assert OOM_ADVICE in events[1].message


def test_a_preemption_is_a_warning_event() -> None:
    running = status_of("running-with-progress")
    preempted = compute_status(LORA, 7, running, CASES["preempted-and-waiting-for-a-node"].observed)
    events = events_for(running, preempted)
    assert ("Warning", "Preempted") in [(e.type, e.reason) for e in events]


def test_a_finished_run_keeps_its_status_after_the_ttl_removed_the_job() -> None:
    done = status_of("succeeded-with-result")
    later = compute_status(LORA, 9, done, Observed(NOW + timedelta(days=2)))
    assert later.stage == JobStage.SUCCEEDED
    assert later.artifacts == done.artifacts
    assert later.observed_generation == 9
    assert [c.last_transition_time for c in later.conditions or ()] == [
        c.last_transition_time for c in done.conditions or ()
    ]
    assert status_patch(dump_status(done), later) is not None  # only the generations moved


def test_a_spec_change_ignores_the_old_runs_job_and_supersedes_its_run() -> None:
    running = status_of("running-with-progress")
    changed = edited(LORA, lora={"rank": 32, "alpha": 64})
    status = compute_status(changed, 8, running, CASES["running-with-progress"].observed)
    assert status.run_id == run_id_for(changed) != RUN
    assert status.stage == JobStage.PENDING
    assert status.progress is None  # the old run's progress is not this run's
    assert status.runs is not None
    assert [(r.run_id, r.state) for r in status.runs] == [(RUN, RunState.SUPERSEDED)]
    assert status.runs[0].completion_time == "2025-03-01T12:00:00Z"


def test_runs_history_grows_newest_first_and_stays_at_ten() -> None:
    old = [RunRecord(run_id=f"old{i:02d}", state=RunState.SUCCEEDED) for i in range(10)]
    previous = FineTuneJobStatus(run_id="old00", runs=old)
    status = compute_status(LORA, 3, previous, CASES["running-with-progress"].observed)
    assert status.runs is not None
    assert len(status.runs) == 10
    assert status.runs[0].run_id == RUN
    assert status.runs[-1].run_id == "old08"


# --- Termination messages, GPU-hours, secrets ----------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (result(Reason.SUCCEEDED, run_uri="s3://b/p/ns/j/r"), Reason.SUCCEEDED),
        (result(Reason.OUT_OF_MEMORY, OOM_ADVICE)[:40], None),
        ("Traceback (most recent call last):\n  File ...", None),
        ("", None),
        ("[1, 2, 3]", None),
        ('{"schemaVersion": 1, "reason": "NoSuchReason"}', None),
        (
            '{"schemaVersion": 1, "reason": "Preempted", "fromTheFuture": {"x": 1}}',
            Reason.PREEMPTED,
        ),
        (
            "loading model…\nsaving\n" + result(Reason.DATASET_EMPTY, "no rows"),
            Reason.DATASET_EMPTY,
        ),
        ("\x00\xff garbage \ud800", None),
    ],
    ids=[
        "valid",
        "truncated",
        "traceback",
        "empty",
        "not-an-object",
        "unknown-reason",
        "newer-trainer-field",
        "log-lines-first",
        "binary",
    ],
)
def test_parse_termination_message(message: str, reason: Reason | None) -> None:
    parsed = parse_termination_message(pod("p", "Failed", exit_code=1, message=message))
    assert (parsed.reason if parsed else None) == reason


def test_parse_termination_message_without_container_statuses() -> None:
    assert parse_termination_message({}) is None
    assert parse_termination_message({"status": {"containerStatuses": [{"state": None}]}}) is None


def test_latest_result_is_the_last_pod_to_finish() -> None:
    first = pod(
        "a",
        "Failed",
        exit_code=42,
        finished="2025-03-01T10:30:00Z",
        message=result(Reason.INFRASTRUCTURE_ERROR, "first"),
    )
    second = pod(
        "b",
        "Failed",
        exit_code=42,
        finished="2025-03-01T11:30:00Z",
        message=result(Reason.INFRASTRUCTURE_ERROR, "second"),
    )
    found = latest_result([second, first])
    assert found is not None
    assert found.message == "second"


def test_gpu_hours_over_finished_and_running_pods() -> None:
    finished = pod(
        "a",
        "Failed",
        exit_code=42,
        gpus=2,
        start="2025-03-01T09:00:00Z",
        finished="2025-03-01T10:00:00Z",
    )
    running = pod("b", "Running", gpus=4, start="2025-03-01T11:30:00Z")
    never_started = pod("c", "Pending", gpus=8, start=None)
    assert gpu_hours([finished, running, never_started], NOW) == pytest.approx(2 * 1 + 4 * 0.5)
    assert gpu_hours([], NOW) == 0


SECRETS = [
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
    ("using AKIAIOSFODNN7EXAMPLE for s3://b", "AKIAIOSFODNN7EXAMPLE"),
    ("hub said 401 for token hf_abcdefghijklmnopqrstuvwx", "hf_abcdefghijklmnopqrstuvwx"),
    ("judge: Authorization: Bearer sk-live-abcdef0123456789abcdef", "sk-live-abcdef0123456789"),
    ("GET https://user:hunter2@data.example.com/x.jsonl failed", "hunter2"),
    ("presigned ?X-Amz-Signature=deadbeefcafe&X-Amz-Date=1", "deadbeefcafe"),
    ('{"api_key": "k-123456"} was refused', "k-123456"),
]


@pytest.mark.parametrize(("text", "secret"), SECRETS, ids=[s[1][:8] for s in SECRETS])
def test_clean_message_masks_credentials(text: str, secret: str) -> None:
    cleaned = clean_message(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_clean_message_keeps_ordinary_text_and_caps_length() -> None:
    text = "Could not read Secret s3-credentials: not found. Create it in namespace ml-team."
    assert clean_message(text) == text
    assert clean_message("line one\nline two\t end") == "line one line two end"
    capped = clean_message("x" * 10_000)
    assert len(capped) == MESSAGE_LIMIT
    assert capped.endswith("…")


def test_no_secret_reaches_status_or_events() -> None:
    leaked = "S3 refused: aws_secret_access_key=wJalrXUtnFEMI/K7MDENG in s3://b"
    observed = seen(
        job=job(condition=("Failed", "PodFailurePolicy"), failed=1),
        pods=[
            pod("p0", "Failed", exit_code=14, message=result(Reason.SOURCE_UNAUTHORIZED, leaked))
        ],
    )
    status = compute_status(LORA, 1, None, observed)
    text = str(dump_status(status)) + str(events_for(None, status))
    assert "wJalrXUtnFEMI" not in text
    assert "SourceUnauthorized" in text


def test_long_kubernetes_messages_are_capped() -> None:
    observed = seen(
        job=job(),
        pods=[
            pod(
                "p0",
                "Pending",
                start=None,
                conditions=[{**UNSCHEDULABLE[0], "message": "no " * 5000}],
            )
        ],
    )
    status = compute_status(LORA, 1, None, observed)
    assert all(len(c.message) <= MESSAGE_LIMIT for c in status.conditions or ())


# --- Refusals and stored status ------------------------------------------------------


class _BuilderError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            _BuilderError(Reason.INSUFFICIENT_GPU_MEMORY, "needs 2 GPUs"),
            Reason.INSUFFICIENT_GPU_MEMORY,
        ),
        (ValueError("bad"), Reason.INVALID_SPEC),
    ],
    ids=["with-reason", "without"],
)
def test_refusal_from_a_builder_error(error: Exception, reason: Reason) -> None:
    refusal = Refusal.from_error(error)
    assert refusal.reason == reason
    assert refusal.message == str(error)


def test_load_status_tolerates_foreign_keys_and_garbage() -> None:
    stored = dump_status(status_of("running-with-progress"))
    assert load_status({**stored, "kopf": {"x": 1}}) == FineTuneJobStatus.model_validate(stored)
    assert load_status(None) is None
    assert load_status({"stage": "NotAStage"}) is None


def test_a_gate_failure_is_one_warning_event() -> None:
    running = status_of("running-with-progress")
    failed = compute_status(LORA, 7, running, CASES["gate-failed"].observed)
    warnings = [(e.reason, e.message) for e in events_for(running, failed) if e.type == "Warning"]
    assert [reason for reason, _ in warnings] == ["Failed", "EvaluationGateFailed"]
    assert "gatePassed: false" in warnings[1][1]


def test_a_completed_job_whose_pods_are_gone_keeps_what_its_result_said() -> None:
    done = status_of("succeeded-with-result")
    complete = replace(CASES["succeeded-with-result"].observed, pods=(), result=None)
    again = compute_status(LORA, 7, done, complete)
    assert again.stage == JobStage.SUCCEEDED
    assert again.artifacts == done.artifacts
    assert again.metrics == done.metrics
    assert again.runs is not None
    assert again.runs[0].gate_passed is True
    assert again.gpu_hours == done.gpu_hours


@pytest.mark.parametrize(
    ("phase", "stage"),
    [
        (JobStage.EVALUATING, JobStage.EVALUATING),
        (JobStage.EXPORTING, JobStage.EXPORTING),
        (JobStage.PUBLISHING, JobStage.PUBLISHING),
    ],
    ids=lambda v: v.value,
)
def test_the_trainers_phase_sets_the_stage_when_exported(phase: JobStage, stage: JobStage) -> None:
    scrape = replace(sft_progress(100, 100), phase=phase)
    observed = seen(job=job(), pods=[pod("p0", "Running")], progress=scrape)
    status = compute_status(LORA, 1, None, observed)
    assert status.stage == stage
    assert status.progress is not None
    assert (status.progress.percent, status.progress.eta) == ("100%", None)


@pytest.mark.parametrize("trusted", [False, True])
def test_remote_code_and_pickle_choices_are_visible_in_the_lineage(trusted: bool) -> None:
    model = {**LORA.model.model_dump(mode="json", by_alias=True, exclude_none=True)}
    model.update(trustRemoteCode=trusted, allowPickle=trusted)
    status = compute_status(edited(LORA, model=model), 1, None, Observed(now=NOW))
    assert status.lineage is not None
    assert status.lineage.trust_remote_code is trusted
    assert status.lineage.allow_pickle is trusted
    wire = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire["lineage"]["trustRemoteCode"] is trusted


@pytest.mark.parametrize(
    ("reason", "retried"),
    [
        (Reason.INFRASTRUCTURE_ERROR, True),
        (Reason.DATASET_INVALID, False),
        (Reason.OUT_OF_MEMORY, False),
    ],
)
def test_a_failed_pod_is_called_retried_only_when_the_job_retries_it(
    reason: Reason, retried: bool
) -> None:
    failed = pod(
        "p0",
        "Failed",
        exit_code=exit_code_for(reason),
        message=result(reason, "what went wrong"),
    )
    status = compute_status(LORA, 1, None, seen(job=job(failed=1), pods=[failed]))
    ready = next(c for c in status.conditions or [] if c.type == "Succeeded")
    assert ready.reason == reason.value
    assert ("Retrying from the last checkpoint" in ready.message) is retried
    assert ("Not retried" in ready.message) is not retried
