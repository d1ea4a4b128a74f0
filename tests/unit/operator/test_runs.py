"""Run identity and spec changes: which edits retrain, which apply in place (DESIGN §8)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.status import FineTuneJobStatus, JobStage, RunRecord, RunState
from kubetune.operator import names
from kubetune.operator.runs import (
    IN_PLACE_FIELDS,
    JOB_MUTABLE_FIELDS,
    MAX_RUNS,
    SPEC_FIELDS,
    Action,
    decide,
    record_run,
    select_job,
    supersede_runs,
)
from kubetune.storage.layout import TRAINING_FIELDS, run_id_for, spec_hash

EXAMPLES = Path(__file__).parents[3] / "examples"


def example(name: str) -> FineTuneJob:
    return FineTuneJob.model_validate(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))


def edited(spec: FineTuneJobSpec, change: Callable[[dict[str, Any]], None]) -> FineTuneJobSpec:
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    change(wire)
    return FineTuneJobSpec.model_validate(wire)


def job_for(
    spec: FineTuneJobSpec,
    *,
    run_id: str | None = None,
    finished: str | None = None,
    deleting: bool = False,
    **job_spec: Any,
) -> dict[str, Any]:
    """A Job as the builders make it for `spec` (or for another run)."""
    run = run_id or run_id_for(spec)
    metadata: dict[str, Any] = {
        "name": names.job_name("support-bot-lora", run),
        "labels": names.labels("support-bot-lora", run),
        "annotations": {names.ANNOTATION_SPEC_HASH: names.spec_hash(spec)},
        "creationTimestamp": "2025-01-01T00:00:00Z",
    }
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-01T01:00:00Z"
    body: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "suspend": True if spec.queue_name else spec.suspend,
    }
    if spec.active_deadline_seconds is not None:
        body["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        body["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    body.update(job_spec)
    status: dict[str, Any] = {}
    if finished:
        status["conditions"] = [{"type": finished, "status": "True"}]
    return {"metadata": metadata, "spec": body, "status": status}


@pytest.fixture
def lora() -> FineTuneJobSpec:
    return example("finetunejob-lora").spec


def test_in_place_fields_are_exactly_the_fields_outside_the_hash() -> None:
    assert set(IN_PLACE_FIELDS) | set(TRAINING_FIELDS) == set(SPEC_FIELDS)
    assert not set(IN_PLACE_FIELDS) & set(TRAINING_FIELDS)
    assert set(IN_PLACE_FIELDS) == {
        "output",
        "resources",
        "tracking",
        "suspend",
        "queueName",
        "activeDeadlineSeconds",
        "backoffLimit",
        "ttlSecondsAfterFinished",
    }
    assert set(JOB_MUTABLE_FIELDS) <= set(IN_PLACE_FIELDS)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(wire: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = wire
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return change


IN_PLACE_CHANGES = {
    "tolerations": _set(
        "resources.tolerations", [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    ),
    "gpu-class": _set("resources.gpuClass", "a100-40gb"),
    "ttl": _set("ttlSecondsAfterFinished", 60),
    "deadline": _set("activeDeadlineSeconds", 7200),
    "backoff-limit": _set("backoffLimit", 5),
    "queue": _set("queueName", "team-a"),
    "tracking": _set("tracking.tensorBoard.enabled", False),
    "output-secret": _set("output.credentialsSecretRef.name", "rotated"),
    "model-secret": _set("model.credentialsSecretRef.name", "hf-token-2"),
    "checkpoint-cadence": _set("training.checkpoint", {"everySteps": 50}),
}


@pytest.mark.parametrize("change", IN_PLACE_CHANGES.values(), ids=IN_PLACE_CHANGES.keys())
def test_non_training_changes_keep_the_run(
    lora: FineTuneJobSpec, change: Callable[[dict[str, Any]], None]
) -> None:
    changed = edited(lora, change)
    assert run_id_for(changed) == run_id_for(lora)
    decision = decide(changed, None, job_for(lora))
    assert decision.action in (Action.KEEP, Action.UPDATE)
    assert decision.run_id == run_id_for(lora)
    assert decision.delete_job is None


@pytest.mark.parametrize(
    ("change", "patch"),
    [
        (_set("ttlSecondsAfterFinished", 60), {"ttlSecondsAfterFinished": 60}),
        (_set("activeDeadlineSeconds", 7200), {"activeDeadlineSeconds": 7200}),
        (_set("backoffLimit", 5), {"backoffLimit": 5}),
        (_set("suspend", True), {"suspend": True}),
    ],
    ids=["ttl", "deadline", "backoff-limit", "suspend"],
)
def test_job_fields_are_patched_in_place(
    lora: FineTuneJobSpec, change: Callable[[dict[str, Any]], None], patch: dict[str, Any]
) -> None:
    decision = decide(edited(lora, change), None, job_for(lora))
    assert decision.action == Action.UPDATE
    assert dict(decision.job_patch) == patch


def test_removing_a_deadline_patches_it_away(lora: FineTuneJobSpec) -> None:
    job = job_for(lora, activeDeadlineSeconds=3600)
    decision = decide(lora, None, job)
    assert dict(decision.job_patch) == {"activeDeadlineSeconds": None}


def test_pod_only_changes_are_reported_as_outdated_not_patched(lora: FineTuneJobSpec) -> None:
    changed = edited(lora, IN_PLACE_CHANGES["tolerations"])
    decision = decide(changed, None, job_for(lora))
    assert decision.action == Action.KEEP
    assert decision.outdated
    assert "next Job" in decision.message
    assert not decide(lora, None, job_for(lora)).outdated


TRAINING_CHANGES = {
    "lora-rank": _set("lora.rank", 32),
    "learning-rate": _set("training.learningRate", "1e-4"),
    "model": _set("model.uri", "hf://Qwen/Qwen2.5-7B-Instruct"),
    "dataset": _set("dataset.uri", "s3://ml-data/support/v2.jsonl"),
    "gate": _set("evaluation.gate", [{"metric": "Perplexity", "operator": "<=", "value": "7"}]),
    "export": _set("export.quantize", ["W8A8"]),
    "stages": _set("stages", [{"type": "SFT", "training": {"epochs": 1}}]),
}


@pytest.mark.parametrize("change", TRAINING_CHANGES.values(), ids=TRAINING_CHANGES.keys())
def test_training_change_while_running_stops_the_old_job_and_starts_a_new_run(
    lora: FineTuneJobSpec, change: Callable[[dict[str, Any]], None]
) -> None:
    changed = edited(lora, change)
    old_run = run_id_for(lora)
    assert run_id_for(changed) != old_run
    decision = decide(changed, None, job_for(lora))
    assert decision.action == Action.REPLACE
    assert decision.delete_job == names.job_name("support-bot-lora", old_run)
    assert decision.superseded_run_id == old_run
    assert decision.run_id == run_id_for(changed)
    assert decision.spec_hash == spec_hash(changed)
    assert "checkpoints are kept" in decision.message


def test_training_change_after_a_finished_run_creates_the_new_run(lora: FineTuneJobSpec) -> None:
    changed = edited(lora, TRAINING_CHANGES["lora-rank"])
    decision = decide(changed, None, job_for(lora, finished="Complete"))
    assert decision.action == Action.CREATE
    assert decision.delete_job is None
    assert decision.superseded_run_id is None


def test_training_change_while_suspended_stops_without_starting(lora: FineTuneJobSpec) -> None:
    changed = edited(edited(lora, TRAINING_CHANGES["lora-rank"]), _set("suspend", True))
    decision = decide(changed, None, job_for(lora))
    assert decision.action == Action.STOP
    assert decision.superseded_run_id == run_id_for(lora)


def _finished_status(spec: FineTuneJobSpec, state: RunState) -> FineTuneJobStatus:
    return FineTuneJobStatus(
        run_id=run_id_for(spec), runs=[RunRecord(run_id=run_id_for(spec), state=state)]
    )


@pytest.mark.parametrize(
    ("status", "suspend", "action"),
    [
        (None, False, Action.CREATE),
        ("Succeeded", False, Action.KEEP),
        ("Failed", False, Action.KEEP),
        ("Running", False, Action.CREATE),
        (None, True, Action.KEEP),
    ],
    ids=[
        "first-reconcile",
        "succeeded-and-ttl-removed-job",
        "failed-and-ttl-removed-job",
        "job-deleted-mid-run-resumes",
        "suspended-before-start",
    ],
)
def test_without_a_job(
    lora: FineTuneJobSpec, status: str | None, suspend: bool, action: Action
) -> None:
    spec = edited(lora, _set("suspend", suspend))
    previous = _finished_status(spec, RunState(status)) if status else None
    assert decide(spec, previous, None).action == action


def test_a_refused_spec_is_tried_again_not_treated_as_finished(lora: FineTuneJobSpec) -> None:
    # A refusal writes stage Failed but records no run: fixing the cluster side (a GPU
    # class, a Secret) must let the same spec start.
    refused = FineTuneJobStatus(run_id=run_id_for(lora), stage=JobStage.FAILED)
    assert decide(lora, refused, None).action == Action.CREATE


def test_kueue_owns_the_suspend_field(lora: FineTuneJobSpec) -> None:
    queued = edited(lora, _set("queueName", "team-a"))
    # Kueue admitted the Job (suspend false): the operator must not suspend it again.
    admitted = job_for(queued, suspend=False)
    assert decide(queued, None, admitted).action == Action.KEEP
    # spec.suspend under Kueue: stop the workload by deleting the Job, not by fighting.
    suspended = edited(queued, _set("suspend", True))
    decision = decide(suspended, None, admitted)
    assert decision.action == Action.STOP
    assert decision.delete_job == admitted["metadata"]["name"]
    assert decision.superseded_run_id is None


def test_a_job_being_deleted_is_waited_for(lora: FineTuneJobSpec) -> None:
    assert decide(lora, None, job_for(lora, deleting=True)).action == Action.WAIT


def test_a_finished_job_only_takes_a_new_ttl(lora: FineTuneJobSpec) -> None:
    changed = edited(edited(lora, _set("ttlSecondsAfterFinished", 60)), _set("backoffLimit", 9))
    decision = decide(changed, None, job_for(lora, finished="Failed"))
    assert dict(decision.job_patch) == {"ttlSecondsAfterFinished": 60}


def test_desired_job_from_the_builders_wins(lora: FineTuneJobSpec) -> None:
    built = job_for(lora, backoffLimit=8)
    assert dict(decide(lora, None, job_for(lora), desired_job=built).job_patch) == {
        "backoffLimit": 8
    }


def test_select_job_prefers_the_current_run_then_the_newest(lora: FineTuneJobSpec) -> None:
    current = job_for(lora)
    old = job_for(lora, run_id="0123456789ab")
    newer = job_for(lora, run_id="ba9876543210")
    newer["metadata"]["creationTimestamp"] = "2025-02-01T00:00:00Z"
    assert select_job([old, current, newer], run_id_for(lora)) is current
    assert select_job([old, newer], run_id_for(lora)) is newer
    # An earlier run still active is found before a newer finished one: it must be stopped.
    finished = job_for(lora, run_id="ba9876543210", finished="Complete")
    finished["metadata"]["creationTimestamp"] = "2025-02-01T00:00:00Z"
    assert select_job([old, finished], run_id_for(lora)) is old
    assert select_job([], run_id_for(lora)) is None


def _record(i: int, state: RunState = RunState.SUCCEEDED) -> RunRecord:
    return RunRecord(run_id=f"run{i:02d}", state=state, start_time=f"2025-01-{i + 1:02d}T00:00:00Z")


def test_record_run_keeps_the_ten_newest_first() -> None:
    runs: list[RunRecord] = []
    for i in range(13):
        runs = record_run(runs, _record(i))
    assert len(runs) == MAX_RUNS
    assert [r.run_id for r in runs] == [f"run{i:02d}" for i in range(12, 2, -1)]


def test_record_run_replaces_the_same_run_and_supersedes_the_active_one() -> None:
    runs = record_run([], _record(0))
    runs = record_run(runs, _record(1, RunState.RUNNING))
    runs = record_run(runs, _record(1, RunState.RUNNING))
    assert [r.run_id for r in runs] == ["run01", "run00"]
    runs = record_run(runs, _record(2, RunState.RUNNING))
    assert [(r.run_id, r.state) for r in runs] == [
        ("run02", RunState.RUNNING),
        ("run01", RunState.SUPERSEDED),
        ("run00", RunState.SUCCEEDED),
    ]
    # The superseded run ended when the new one started.
    assert runs[1].completion_time == runs[0].start_time


def test_supersede_runs_leaves_the_current_and_finished_runs() -> None:
    runs = [_record(1, RunState.RUNNING), _record(0, RunState.FAILED)]
    assert [r.state for r in supersede_runs(runs, "run01")] == [RunState.RUNNING, RunState.FAILED]
    assert supersede_runs(runs, "run09", "2025-03-01T00:00:00Z")[0].state == RunState.SUPERSEDED


@pytest.mark.parametrize(
    "name", ["finetunejob-lora", "finetunejob-dpo", "finetunejob-smoke", "quickstart"]
)
def test_every_example_gets_a_stable_run_and_a_create(name: str) -> None:
    spec = example(name).spec
    decision = decide(spec, None, None)
    assert decision.action == Action.CREATE
    assert decision.run_id == run_id_for(spec) == decide(spec, None, None).run_id
    assert len(decision.run_id) == 12
