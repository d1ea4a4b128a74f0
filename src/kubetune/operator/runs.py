"""Run identity and spec changes of a FineTuneJob (DESIGN §8, "Spec changes (GitOps)").

A FineTuneJob's desired state is a completed run for its current spec. The run id is the
hash of the training-relevant spec (`kubetune.storage.run_id_for`), so this module only has
to compare the run the spec asks for with the run the observed Job belongs to:

- no Job for the desired run: create one (the same run id resumes from its checkpoints);
- a Job of the desired run: keep it, patching the Job fields that may change in place
  (`suspend`, `activeDeadlineSeconds`, `backoffLimit`, `ttlSecondsAfterFinished`);
- a Job of another run: a training-relevant field changed, so that Job is stopped (its
  checkpoints stay in the artifact store) and the new run starts.

Which spec fields are "in place" is not a second list to keep in sync: it is every spec
field that does not enter the hash (`IN_PLACE_FIELDS`). Fields inside training sections
that the hash ignores (Secret references, checkpoint cadence) are in place too; they reach
the trainer through its ConfigMap with the next Job.

A finished run whose Job was removed by `ttlSecondsAfterFinished` is never started again:
the status remembers it, so a GitOps tool re-applying the same spec is not a retraining
loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.status import FineTuneJobStatus, RunRecord, RunState
from kubetune.operator import names
from kubetune.storage.layout import TRAINING_FIELDS, run_id_for, spec_hash

MAX_RUNS = 10
"""status.runs keeps this many runs, newest first."""

SPEC_FIELDS: tuple[str, ...] = tuple(
    info.alias or name for name, info in FineTuneJobSpec.model_fields.items()
)
"""Every field of FineTuneJob.spec, as written on the wire."""

IN_PLACE_FIELDS: tuple[str, ...] = tuple(f for f in SPEC_FIELDS if f not in TRAINING_FIELDS)
"""Spec fields that do not enter the run id: changing them never retrains."""

JOB_MUTABLE_FIELDS: tuple[str, ...] = (
    "suspend",
    "activeDeadlineSeconds",
    "backoffLimit",
    "ttlSecondsAfterFinished",
)
"""In-place fields that a live Job accepts as an update; they share the spec's names. The
others (resources, tracking, output, queueName) shape the pod, which a started Job cannot
change: they apply to the next Job of the run."""

_FINISHED_JOB_CONDITIONS = ("Complete", "Failed")
_FINISHED_RUNS = (RunState.SUCCEEDED, RunState.FAILED)


class Action(str, Enum):
    """What the reconciler does about the child Job."""

    CREATE = "Create"
    """No Job for the desired run: create it. A finished Job of an earlier run stays until
    its TTL (Jobs are named per run, so the two never collide)."""

    KEEP = "Keep"
    """Nothing to change."""

    UPDATE = "Update"
    """Patch `job_patch` into the Job's spec (in-place fields only)."""

    REPLACE = "Replace"
    """A training-relevant change while a run is active: delete `delete_job` (its
    checkpoints stay), then create the Job of the new run."""

    STOP = "Stop"
    """Delete `delete_job` and create nothing (suspended under Kueue, or suspended while
    the spec moved to a new run)."""

    WAIT = "Wait"
    """The observed Job is being deleted: reconcile again once it is gone."""


@dataclass(frozen=True)
class Decision:
    """The outcome of `decide`.

    Attributes:
        action: what to do.
        run_id: the run the spec asks for.
        spec_hash: the full hash of the training-relevant spec (for the Job annotation and
            the lineage).
        message: a Kubernetes-style sentence for the event and the log.
        job_patch: for UPDATE, the Job `spec` fields to merge-patch.
        delete_job: the name of the Job to delete (REPLACE, STOP).
        superseded_run_id: the run a spec change stopped while it was active.
        outdated: the Job of this run was built from an older spec (its
            `kubetune.io/spec-hash` differs): fields that only shape the pod (resources,
            tracking, output, queueName) reach the next Job of the run, not this one.
    """

    action: Action
    run_id: str
    spec_hash: str
    message: str
    job_patch: Mapping[str, Any] = field(default_factory=dict)
    delete_job: str | None = None
    superseded_run_id: str | None = None
    outdated: bool = False


def job_labels(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    """The labels of a Kubernetes object given as a dict (empty when absent)."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return labels if isinstance(labels, Mapping) else {}


def job_run_id(job: Mapping[str, Any] | None) -> str | None:
    """The run a Job (or pod) belongs to, from its `kubetune.io/run-id` label."""
    value = job_labels(job).get(names.LABEL_RUN_ID)
    return value if isinstance(value, str) else None


def job_spec_hash(job: Mapping[str, Any] | None) -> str | None:
    """The hash of the whole spec a Job was built from (`kubetune.io/spec-hash`)."""
    annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
    value = (
        annotations.get(names.ANNOTATION_SPEC_HASH) if isinstance(annotations, Mapping) else None
    )
    return value if isinstance(value, str) else None


def belongs_to_run(job: Mapping[str, Any] | None, run_id: str) -> bool:
    """Whether a Job (or pod) carries this run's `kubetune.io/run-id` label."""
    return job is not None and job_run_id(job) == run_id


def job_finished(job: Mapping[str, Any]) -> bool:
    """Whether a Job reached Complete or Failed (its pods will not run again)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in _FINISHED_JOB_CONDITIONS and condition.get("status") == "True":
            return True
    return False


def _job_name(job: Mapping[str, Any]) -> str:
    return str((job.get("metadata") or {}).get("name") or "")


def _creation(obj: Mapping[str, Any]) -> datetime:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            pass
    return datetime.min.replace(tzinfo=timezone.utc)


def select_job(jobs: Sequence[Mapping[str, Any]], run_id: str) -> Mapping[str, Any] | None:
    """The Job to reconcile against among a FineTuneJob's Jobs: the one of `run_id` if
    any, else a still active Job of an earlier run (to be stopped), else the newest."""
    if not jobs:
        return None
    mine = [j for j in jobs if job_run_id(j) == run_id]
    return max(mine or jobs, key=lambda j: (not job_finished(j), _creation(j)))


def desired_job_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The in-place Job fields a spec asks for. With `queueName`, Kueue owns
    `Job.spec.suspend`, so it is left out."""
    wire = spec.model_dump(mode="json", by_alias=True)
    wanted = {name: wire.get(name) for name in JOB_MUTABLE_FIELDS}
    if spec.queue_name:
        wanted.pop("suspend")
    return wanted


def job_patch(
    spec: FineTuneJobSpec,
    job: Mapping[str, Any],
    desired_job: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Job `spec` fields that differ from what the spec asks for (a merge patch; None
    removes a field).

    Args:
        spec: the FineTuneJob's spec.
        job: the observed Job.
        desired_job: the Job the builders would create now; when given, its values win
            (the builders may derive a field rather than copy it).
    """
    wanted = desired_job_fields(spec)
    if desired_job is not None:
        built = desired_job.get("spec") or {}
        wanted = {name: built.get(name) for name in wanted}
        if "suspend" in wanted:
            wanted["suspend"] = bool(wanted["suspend"])
    observed = job.get("spec") or {}
    if job_finished(job):
        # Only the TTL still means something once the pods are done.
        wanted = {k: v for k, v in wanted.items() if k == "ttlSecondsAfterFinished"}
    current = dict(observed)
    current["suspend"] = bool(observed.get("suspend"))  # absent means false
    return {name: value for name, value in wanted.items() if current.get(name) != value}


def run_finished(status: FineTuneJobStatus | None, run_id: str) -> bool:
    """Whether status.runs records `run_id` as Succeeded or Failed (a refused spec never
    ran, so it is not finished and is tried again)."""
    return status is not None and any(
        run.run_id == run_id and run.state in _FINISHED_RUNS for run in status.runs or ()
    )


def decide(
    spec: FineTuneJobSpec,
    status: FineTuneJobStatus | None,
    observed_job: Mapping[str, Any] | None,
    *,
    desired_job: Mapping[str, Any] | None = None,
) -> Decision:
    """What to do about the child Job, given the spec, the last status and the Job seen.

    Args:
        spec: the FineTuneJob's spec.
        status: its last written status (None before the first reconcile).
        observed_job: the Job found for this FineTuneJob (`select_job`), or None.
        desired_job: the Job the builders would create now, to read the in-place fields
            from (default: copied from the spec).
    """
    digest = spec_hash(spec)
    run_id = run_id_for(spec)

    def decision(action: Action, message: str, **extra: Any) -> Decision:
        return Decision(action, run_id, digest, message, **extra)

    if observed_job is None:
        if run_finished(status, run_id):
            return decision(Action.KEEP, f"Run {run_id} already finished")
        if spec.suspend:
            return decision(Action.KEEP, f"Run {run_id} is suspended")
        return decision(Action.CREATE, f"Creating the Job of run {run_id}")

    name = _job_name(observed_job)
    if (observed_job.get("metadata") or {}).get("deletionTimestamp"):
        return decision(Action.WAIT, f"Waiting for Job {name} to be deleted")

    if not belongs_to_run(observed_job, run_id):
        old_run = job_run_id(observed_job) or "unknown"
        if job_finished(observed_job):
            if spec.suspend:
                return decision(Action.KEEP, f"Run {run_id} is suspended")
            return decision(
                Action.CREATE, f"Run {old_run} finished; starting run {run_id} for the new spec"
            )
        if spec.suspend:
            return decision(
                Action.STOP,
                f"Deleting Job {name} of run {old_run}: the spec changed while suspended "
                "(its checkpoints are kept)",
                delete_job=name,
                superseded_run_id=old_run,
            )
        return decision(
            Action.REPLACE,
            f"Stopping Job {name} of run {old_run} (training-relevant spec change; its "
            f"checkpoints are kept) and starting run {run_id}",
            delete_job=name,
            superseded_run_id=old_run,
        )

    outdated = job_spec_hash(observed_job) not in (None, names.spec_hash(spec))
    if spec.suspend and spec.queue_name and not job_finished(observed_job):
        return decision(
            Action.STOP,
            f"Deleting Job {name}: suspended while queued in {spec.queue_name} (Kueue owns "
            "the Job's suspend field; checkpoints are kept)",
            delete_job=name,
        )
    patch = job_patch(spec, observed_job, desired_job)
    if patch:
        return decision(
            Action.UPDATE,
            f"Updating Job {name}: {', '.join(sorted(patch))}",
            job_patch=patch,
            outdated=outdated,
        )
    if outdated:
        return decision(
            Action.KEEP,
            f"Job {name} keeps running; pod settings changed in the spec apply to the next "
            "Job of the run",
            outdated=True,
        )
    return decision(Action.KEEP, f"Job {name} is up to date")


def supersede_runs(
    runs: Sequence[RunRecord] | None, run_id: str, ended: str | None = None
) -> list[RunRecord]:
    """status.runs where every run other than `run_id` still marked Running becomes
    Superseded (a spec change stopped it), ending at `ended` unless it has an end."""
    updated: list[RunRecord] = []
    for run in runs or ():
        if run.run_id != run_id and run.state == RunState.RUNNING:
            run = run.model_copy(
                update={
                    "state": RunState.SUPERSEDED,
                    "completion_time": run.completion_time or ended,
                }
            )
        updated.append(run)
    return updated


def record_run(runs: Sequence[RunRecord] | None, record: RunRecord) -> list[RunRecord]:
    """status.runs with `record` first: an older entry of the same run is replaced, other
    runs still marked Running become Superseded (ended when `record` started), and only the
    newest `MAX_RUNS` stay."""
    others = [
        run
        for run in supersede_runs(runs, record.run_id, record.start_time)
        if run.run_id != record.run_id
    ]
    return [record, *others][:MAX_RUNS]
