"""The status of a FineTuneJob, computed from what the operator observes (DESIGN §8).

Level-based: every reconcile hands `compute_status` the spec, the last status and what it
sees now (the child Job, its pods, the trainer's result and live progress, or why the
builders refused to create anything) and gets the whole new status back. Nothing here
talks to the API server, and the clock is injected, so every situation is a table test.

The last status is read for three things only: condition transition times (kept unless the
value flips), what the current run already achieved (a restarted pod must not move the job
back to "Preparing" in `status.stages`), and the history in `status.runs`. A finished run
whose Job was removed by `ttlSecondsAfterFinished` keeps its final status.

`status_patch` writes the status once per change, and `events_for` turns each transition
into a Kubernetes Event. Messages come from the trainer's termination message and from
Kubernetes; they are cleaned of anything that looks like a credential and capped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.api.contract import (
    EXIT_CODES,
    FailureClass,
    Reason,
    TrainerResult,
    classify_exit,
)
from kubetune.api.meta import Condition, ConditionStatus
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import Method
from kubetune.api.v1alpha1.status import (
    Artifacts,
    FineTuneJobStatus,
    JobStage,
    Lineage,
    Progress,
    RunRecord,
    RunState,
    StageState,
    StageStatus,
)
from kubetune.operator import status_io
from kubetune.operator.pod_state import (
    clean_message,
    created_at,
    disruption,
    exit_code,
    finished_at,
    gpu_hours,
    job_condition,
    latest_result,
    object_name,
    object_status,
    pending_detail,
    pod_phase,
    text_or_none,
)
from kubetune.operator.progress import Scrape, StageSample, format_decimal, rfc3339
from kubetune.operator.runs import (
    belongs_to_run,
    job_run_id,
    record_run,
    run_finished,
    supersede_runs,
)
from kubetune.storage.errors import InvalidKey
from kubetune.storage.layout import RunLayout, parse_run_uri, run_id_for, spec_hash

SUCCEEDED = "Succeeded"
DATA_PREPARED = "DataPrepared"
TRAINED = "Trained"
EVALUATED = "Evaluated"
EXPORTED = "Exported"
GATE_PASSED = "GatePassed"
MILESTONES = (DATA_PREPARED, TRAINED, EVALUATED, EXPORTED)
"""Detail conditions in pipeline order; each becomes True when its step is done."""
CONDITION_TYPES = (SUCCEEDED, *MILESTONES, GATE_PASSED)


WAITING_REASONS = frozenset({Reason.SECRET_NOT_FOUND, Reason.QUOTA_EXCEEDED})
"""Refusals the user fixes by creating or freeing something (a Secret, quota): the job waits
(Succeeded=Unknown) and is retried with backoff instead of failing."""

_RUNNING_STAGES = (
    JobStage.PREPARING,
    JobStage.TRAINING,
    JobStage.EVALUATING,
    JobStage.EXPORTING,
    JobStage.PUBLISHING,
)
"""The stage of a running pod, indexed by the number of milestones reached."""
_PHASE_MILESTONES = {stage: index for index, stage in enumerate(_RUNNING_STAGES)}
_DONE_MESSAGES = {
    DATA_PREPARED: "The training and validation data are prepared",
    TRAINED: "Every training stage finished",
    EVALUATED: "The evaluation finished",
    EXPORTED: "The artifacts are published",
}
_STEP_NAMES = {
    DATA_PREPARED: "data preparation",
    TRAINED: "training",
    EVALUATED: "evaluation",
    EXPORTED: "export",
}
_BACKOFF_REASONS = ("BackoffLimitExceeded", "MaxFailedIndexesExceeded", "FailedIndexes")

# Credentials that must never reach a status, an event or a log line.


@dataclass(frozen=True)
class Refusal:
    """Why the builders would not create the Job (e.g. a local model URI, a missing
    Secret, a model that fits no GPU)."""

    reason: Reason
    message: str

    @classmethod
    def from_error(cls, error: BaseException) -> Refusal:
        """From an exception carrying a `reason` (a Reason or its string); others are
        InvalidSpec."""
        raw = getattr(error, "reason", Reason.INVALID_SPEC)
        try:
            reason = Reason(raw)
        except ValueError:
            reason = Reason.INVALID_SPEC
        return cls(reason, str(error))


@dataclass(frozen=True)
class Observed:
    """What the operator sees of a FineTuneJob's children at one moment."""

    now: datetime
    """The time of the observation (timezone-aware)."""

    job: Mapping[str, Any] | None = None
    """The child Job, as a dict (None before it is created or after its TTL)."""

    pods: Sequence[Mapping[str, Any]] = ()
    """The Job's pods, as dicts."""

    result: TrainerResult | None = None
    """The trainer's result from the latest terminated pod (`latest_result`)."""

    progress: Scrape | None = None
    """The latest poll of the running pod's metrics endpoint."""

    refusal: Refusal | None = None
    """Why the builders refused to create the Job, if they did."""

    @classmethod
    def of(
        cls,
        now: datetime,
        job: Mapping[str, Any] | None = None,
        pods: Sequence[Mapping[str, Any]] = (),
        progress: Scrape | None = None,
        refusal: Refusal | None = None,
    ) -> Observed:
        """An observation with the result read from the pods' termination messages."""
        return cls(now, job, tuple(pods), latest_result(pods), progress, refusal)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to record on the FineTuneJob."""

    type: str
    """Normal or Warning."""

    reason: str
    """CamelCase reason."""

    message: str
    """What happened."""


@dataclass(frozen=True)
class _Verdict:
    """The headline of a status: stage and the Succeeded condition."""

    stage: JobStage
    status: ConditionStatus
    reason: Reason
    message: str

    @property
    def failed(self) -> bool:
        return self.status == ConditionStatus.FALSE


# --- Reading pods and Jobs -------------------------------------------------------------


# --- Verdicts --------------------------------------------------------------------------


def _refusal_verdict(refusal: Refusal) -> _Verdict:
    if refusal.reason in WAITING_REASONS:
        return _Verdict(JobStage.PENDING, ConditionStatus.UNKNOWN, refusal.reason, refusal.message)
    return _Verdict(JobStage.FAILED, ConditionStatus.FALSE, refusal.reason, refusal.message)


def _success_verdict(result: TrainerResult | None, run_id: str) -> _Verdict:
    if result is None:
        return _Verdict(
            JobStage.SUCCEEDED,
            ConditionStatus.TRUE,
            Reason.SUCCEEDED,
            f"Run {run_id} succeeded (its result could not be read; see the run's manifest)",
        )
    if result.reason == Reason.SUCCEEDED:
        where = f": {result.run_uri}" if result.run_uri else ""
        return _Verdict(
            JobStage.SUCCEEDED,
            ConditionStatus.TRUE,
            Reason.SUCCEEDED,
            f"Run {run_id} succeeded{where}",
        )
    message = result.message
    if result.reason == Reason.EVALUATION_GATE_FAILED:
        message = (
            f"The evaluation gate failed ({message or 'see eval/metrics.json'}); the artifacts "
            "are published with gatePassed: false"
        )
    return _Verdict(JobStage.FAILED, ConditionStatus.FALSE, result.reason, message)


def _last_error(
    pods: Sequence[Mapping[str, Any]], result: TrainerResult | None
) -> tuple[Reason, str] | None:
    """The most recent failure: the trainer's own word, else a disruption, else the exit
    code of the latest failed pod."""
    if result is not None and result.reason not in (Reason.SUCCEEDED,):
        return result.reason, result.message or result.reason.value
    failed = [p for p in pods if pod_phase(p) == "Failed" or disruption(p)]
    if not failed:
        return None
    pod = max(failed, key=lambda p: finished_at(p) or created_at(p))
    disrupted = disruption(pod)
    if disrupted:
        return Reason.PREEMPTED, disrupted
    code = exit_code(pod)
    if code is not None:
        row = classify_exit(code)
        return row.reason, f"the trainer exited with code {code} ({row.meaning})"
    why = object_status(pod).get("message") or object_status(pod).get("reason") or "the pod failed"
    return Reason.INFRASTRUCTURE_ERROR, f"Pod {object_name(pod)}: {why}"


def _failure_verdict(
    spec: FineTuneJobSpec,
    condition: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    result: TrainerResult | None,
    failures: int,
) -> _Verdict:
    job_reason = condition.get("reason")
    last = _last_error(pods, result)

    def failed(reason: Reason, message: str) -> _Verdict:
        return _Verdict(JobStage.FAILED, ConditionStatus.FALSE, reason, message)

    if job_reason == "DeadlineExceeded":
        return failed(
            Reason.DEADLINE_EXCEEDED,
            f"The run exceeded activeDeadlineSeconds ({spec.active_deadline_seconds}s) and was "
            "stopped; its checkpoints are kept. Raise spec.activeDeadlineSeconds to let it "
            "finish.",
        )
    if job_reason in _BACKOFF_REASONS:
        tail = f"; last error {last[0].value}: {last[1]}" if last else ""
        return failed(
            Reason.BACKOFF_LIMIT_EXCEEDED,
            f"The trainer failed {failures} times (backoffLimit {spec.backoff_limit}){tail}",
        )
    if last is not None:
        return failed(*last)
    message = condition.get("message") or f"The Job failed ({job_reason or 'no reason given'})"
    return failed(Reason.INFRASTRUCTURE_ERROR, str(message))


def _active_verdict(
    spec: FineTuneJobSpec,
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    result: TrainerResult | None,
    reached: int,
    run_id: str,
) -> _Verdict:
    failures = int(object_status(job).get("failed") or 0)
    attempt = f" (attempt {failures + 1} of {spec.backoff_limit + 1})" if failures else ""
    if (job.get("spec") or {}).get("suspend"):
        if spec.suspend:
            return _Verdict(
                JobStage.SUSPENDED,
                ConditionStatus.UNKNOWN,
                Reason.SUSPENDED,
                "Suspended (spec.suspend is true); the checkpoints are kept. Set spec.suspend "
                "to false to resume.",
            )
        if spec.queue_name:
            return _Verdict(
                JobStage.PENDING,
                ConditionStatus.UNKNOWN,
                Reason.QUEUED,
                f"waiting for Kueue admission in queue {spec.queue_name}",
            )
        return _Verdict(
            JobStage.PENDING,
            ConditionStatus.UNKNOWN,
            Reason.PENDING,
            f"Resuming Job {object_name(job)}",
        )
    if any(pod_phase(p) in ("Running", "Succeeded") for p in pods):
        stage = _RUNNING_STAGES[min(reached, len(_RUNNING_STAGES) - 1)]
        return _Verdict(
            stage, ConditionStatus.UNKNOWN, Reason.RUNNING, f"{stage.value} run {run_id}{attempt}"
        )
    # Creation times have one-second resolution: of two pods created in the same second (a
    # pod that failed at once and its replacement), the one still to run is the newer.
    newest = max(pods, key=lambda p: (created_at(p), pod_phase(p) == "Pending")) if pods else None
    if newest is not None and pod_phase(newest) == "Pending" and not disruption(newest):
        # The first pod, or the replacement of a failed or preempted one, waiting to run.
        last = _last_error([p for p in pods if p is not newest], result)
        waiting = pending_detail(newest)
    else:
        # No pod yet, or the last one ended and the Job has not made the next.
        last = _last_error(pods, result)
        waiting = f"Waiting for the pod of run {run_id}"
    if last is None:
        return _Verdict(JobStage.PENDING, ConditionStatus.UNKNOWN, Reason.PENDING, waiting)
    reason, why = last
    if not _retried(reason):
        # The Job's podFailurePolicy is failing it; say so until the Job reports it.
        return _Verdict(
            JobStage.PENDING,
            ConditionStatus.UNKNOWN,
            reason,
            f"{reason.value}: {why}. Not retried: the Job is failing",
        )
    return _Verdict(
        JobStage.PENDING,
        ConditionStatus.UNKNOWN,
        reason,
        f"Retrying from the last checkpoint{attempt} after {reason.value}: {why}. {waiting}",
    )


def _retried(reason: Reason) -> bool:
    """Whether the Job retries a pod that failed with this reason (the exit-code table:
    user errors and out-of-memory fail fast)."""
    classes = {code.reason: code.failure_class for code in EXIT_CODES}
    return classes.get(reason) not in (FailureClass.USER, FailureClass.OUT_OF_MEMORY)


def _job_verdict(
    spec: FineTuneJobSpec,
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    result: TrainerResult | None,
    reached: int,
    run_id: str,
) -> _Verdict:
    if job_condition(job, "Complete", "SuccessCriteriaMet"):
        return _success_verdict(result, run_id)
    failure = job_condition(job, "Failed", "FailureTarget")
    if failure is not None:
        failures = int(object_status(job).get("failed") or 0)
        return _failure_verdict(spec, failure, pods, result, failures)
    return _active_verdict(spec, job, pods, result, reached, run_id)


# --- Milestones, stages, progress ------------------------------------------------------


def _reached(
    spec: FineTuneJobSpec,
    same_run: FineTuneJobStatus | None,
    scrape: Scrape | None,
    result: TrainerResult | None,
    completed: bool,
) -> int:
    """How many milestones (MILESTONES) the current run has reached."""
    reached = 0
    if same_run is not None:
        previous = {c.type: c.status for c in same_run.conditions or ()}
        while reached < len(MILESTONES) and previous.get(MILESTONES[reached]) == "True":
            reached += 1
    if scrape is not None:
        samples = [scrape.sample(s.type.value) for s in spec.stages]
        if any(samples):
            reached = max(reached, 1)
        if samples[-1] is not None and samples[-1].finished:
            reached = max(reached, 2)
        if scrape.phase is not None:
            reached = max(reached, _PHASE_MILESTONES[scrape.phase])
    if result is not None and (
        result.reason == Reason.OUT_OF_MEMORY or result.step or result.resumed_from_step
    ):
        # Training had begun (steps were made, or out of memory on the GPU), so the data
        # were prepared: they are prepared before anything loads on a GPU.
        reached = max(reached, 1)
    if completed or (
        result is not None
        and result.reason in (Reason.SUCCEEDED, Reason.EVALUATION_GATE_FAILED)
        and result.manifest_digest is not None
    ):
        reached = len(MILESTONES)
    return reached


def stage_name(index: int, stage_type: str) -> str:
    """`<index>-<type>` in lower case, e.g. `1-dpo` (the trainer's folder names)."""
    return f"{index}-{stage_type.lower()}"


def _stage_metrics(sample: StageSample | None) -> dict[str, str] | None:
    if sample is None:
        return None
    values = {
        "loss": format_decimal(sample.loss, ".4f"),
        "evalLoss": format_decimal(sample.eval_loss, ".4f"),
    }
    kept = {k: v for k, v in values.items() if v is not None}
    return kept or None


def _stage_statuses(
    spec: FineTuneJobSpec,
    same_run: FineTuneJobStatus | None,
    scrape: Scrape | None,
    reached: int,
    verdict: _Verdict,
) -> list[StageStatus]:
    previous = {s.name: s for s in (same_run.stages if same_run else None) or ()}
    types = [s.type.value for s in spec.stages]
    samples = [scrape.sample(t) if scrape is not None else None for t in types]
    started = [i for i, sample in enumerate(samples) if sample is not None]
    current = max(started, default=None)
    names = [stage_name(i, t) for i, t in enumerate(types)]
    done = [
        reached >= 2
        or (current is not None and i < current)
        or (names[i] in previous and previous[names[i]].state == StageState.SUCCEEDED)
        for i in range(len(types))
    ]
    open_index = next((i for i, d in enumerate(done) if not d), None)
    statuses = []
    for i, name in enumerate(names):
        before = previous.get(name)
        sample = samples[i]
        step = before.step if before else None
        total = before.total_steps if before else None
        if sample is not None:
            step = sample.step if sample.step is not None else step
            total = sample.total_steps if sample.total_steps is not None else total
        state = StageState.PENDING
        if done[i]:
            state = StageState.SUCCEEDED
            step = total if total is not None else step
        elif i == open_index and reached >= 1:
            if verdict.failed:
                state = StageState.FAILED
            elif verdict.stage == JobStage.TRAINING:
                state = StageState.RUNNING
        statuses.append(
            StageStatus(
                name=name,
                state=state,
                step=step,
                total_steps=total,
                metrics=_stage_metrics(sample) or (before.metrics if before else None),
            )
        )
    return statuses


def _progress(
    scrape: Scrape | None, same_run: FineTuneJobStatus | None, reached: int, verdict: _Verdict
) -> Progress | None:
    progress = scrape.progress() if scrape is not None else None
    if progress is None and same_run is not None:
        progress = same_run.progress
    if progress is None:
        return None
    update: dict[str, Any] = {}
    if reached >= 2 and progress.total_steps:
        update.update(step=progress.total_steps, percent="100%")
    if reached >= 2 or verdict.stage not in (JobStage.PREPARING, JobStage.TRAINING):
        update.update(eta=None, eta_seconds=None)
    return progress.model_copy(update=update) if update else progress


def artifacts_for(spec: FineTuneJobSpec, run_uri: str, manifest_digest: str | None) -> Artifacts:
    """Where a finished run's artifacts are, from its RUN_URI and the spec: adapter/
    (adapter methods), merged/ (Full, or export.merge), quantized/<scheme>/ per requested
    scheme, eval/report.html. The manifest is the authority on what was produced."""
    try:
        layout = parse_run_uri(run_uri)
    except InvalidKey:
        return Artifacts(run_uri=run_uri, manifest_digest=manifest_digest)
    export = spec.export
    merged = spec.method == Method.FULL or bool(export and export.merge)
    quantized = {
        s.value: layout.uri_for(layout.quantized(s.value))
        for s in (export.quantize if export else [])
    }
    return Artifacts(
        run_uri=run_uri,
        manifest_digest=manifest_digest,
        adapter=layout.uri_for(RunLayout.ADAPTER) if spec.method != Method.FULL else None,
        merged=layout.uri_for(RunLayout.MERGED) if merged else None,
        quantized=quantized or None,
        report=layout.uri_for(RunLayout.EVAL_REPORT),
    )


# --- Conditions ------------------------------------------------------------------------


def _condition(
    type_: str,
    status: ConditionStatus,
    reason: Reason,
    message: str,
    generation: int,
    previous: Mapping[str, Condition],
    now: datetime,
) -> Condition:
    before = previous.get(type_)
    if before is not None and before.status == status:
        since = before.last_transition_time
    else:
        since = rfc3339(now)
    return Condition(
        type=type_,
        status=status,
        reason=reason.value,
        message=clean_message(message),
        observed_generation=generation,
        last_transition_time=since,
    )


def _conditions(
    spec: FineTuneJobSpec,
    verdict: _Verdict,
    reached: int,
    result: TrainerResult | None,
    generation: int,
    previous: Mapping[str, Condition],
    now: datetime,
) -> list[Condition]:
    rows: list[tuple[str, ConditionStatus, Reason, str]] = [
        (SUCCEEDED, verdict.status, verdict.reason, verdict.message)
    ]
    for index, type_ in enumerate(MILESTONES):
        if index < reached:
            rows.append((type_, ConditionStatus.TRUE, Reason.SUCCEEDED, _DONE_MESSAGES[type_]))
        elif verdict.failed and index == reached:
            rows.append((type_, ConditionStatus.FALSE, verdict.reason, verdict.message))
        elif verdict.failed:
            rows.append(
                (
                    type_,
                    ConditionStatus.FALSE,
                    verdict.reason,
                    f"Not reached ({verdict.reason.value})",
                )
            )
        elif index == reached and verdict.reason == Reason.RUNNING:
            rows.append(
                (
                    type_,
                    ConditionStatus.UNKNOWN,
                    Reason.RUNNING,
                    f"{_STEP_NAMES[type_].capitalize()} in progress",
                )
            )
        else:
            rows.append((type_, ConditionStatus.UNKNOWN, Reason.PENDING, "Not reached yet"))
    rows.append(_gate_row(spec, verdict, reached, result))
    return [_condition(*row, generation, previous, now) for row in rows]


def _gate_row(
    spec: FineTuneJobSpec, verdict: _Verdict, reached: int, result: TrainerResult | None
) -> tuple[str, ConditionStatus, Reason, str]:
    gate = spec.evaluation.gate if spec.evaluation else []
    if verdict.reason == Reason.EVALUATION_GATE_FAILED or (result and result.gate_passed is False):
        message = result.message if result and result.message else verdict.message
        return GATE_PASSED, ConditionStatus.FALSE, Reason.EVALUATION_GATE_FAILED, message
    if verdict.status == ConditionStatus.TRUE or (result and result.gate_passed):
        text = f"All {len(gate)} gate rules passed" if gate else "No evaluation gate is set"
        return GATE_PASSED, ConditionStatus.TRUE, Reason.SUCCEEDED, text
    if not gate and reached >= 3:
        return GATE_PASSED, ConditionStatus.TRUE, Reason.SUCCEEDED, "No evaluation gate is set"
    if verdict.failed:
        return (
            GATE_PASSED,
            ConditionStatus.FALSE,
            verdict.reason,
            f"Not evaluated ({verdict.reason.value})",
        )
    return GATE_PASSED, ConditionStatus.UNKNOWN, Reason.PENDING, "Checked after the evaluation"


# --- The status ------------------------------------------------------------------------


def _gpu_hours(
    pods: Sequence[Mapping[str, Any]], now: datetime, same_run: FineTuneJobStatus | None
) -> str | None:
    before = same_run.gpu_hours if same_run else None
    if not pods:
        return before
    hours = gpu_hours(pods, now)
    # Pods of earlier attempts can be gone; never report less than before.
    if before and before.replace(".", "", 1).isdigit():
        hours = max(hours, float(before))
    return f"{hours:.2f}"


def _carry_forward(previous: FineTuneJobStatus, generation: int) -> FineTuneJobStatus:
    conditions = [
        c.model_copy(update={"observed_generation": generation}) for c in previous.conditions or ()
    ]
    return previous.model_copy(
        update={"observed_generation": generation, "conditions": conditions or None}
    )


def compute_status(
    ftj_spec: FineTuneJobSpec,
    generation: int,
    previous_status: FineTuneJobStatus | None,
    observed: Observed,
) -> FineTuneJobStatus:
    """The whole status of a FineTuneJob from its spec and what the operator observes.

    A Job (and pods) of another run than the spec's, e.g. one being replaced after a spec
    change, is not this run's and is ignored. A refusal counts only while this run has no
    Job.

    Args:
        ftj_spec: the FineTuneJob's spec.
        generation: its metadata.generation.
        previous_status: the status written last (None at first).
        observed: the children and results seen now.
    """
    spec = ftj_spec
    digest = spec_hash(spec)
    run_id = run_id_for(spec)
    same_run = previous_status if previous_status and previous_status.run_id == run_id else None
    job = observed.job if belongs_to_run(observed.job, run_id) else None

    if job is None and same_run is not None and run_finished(same_run, run_id):
        return _carry_forward(same_run, generation)

    now = observed.now
    pods = [p for p in observed.pods if job_run_id(p) in (None, run_id)] if job else []
    result = observed.result if job is not None else None
    scrape = observed.progress if job is not None else None
    completed = job is not None and job_condition(job, "Complete", "SuccessCriteriaMet") is not None
    reached = _reached(spec, same_run, scrape, result, completed)

    if job is not None:
        verdict = _job_verdict(spec, job, pods, result, reached, run_id)
    elif observed.refusal is not None:
        verdict = _refusal_verdict(observed.refusal)
    elif spec.suspend:
        verdict = _Verdict(
            JobStage.SUSPENDED,
            ConditionStatus.UNKNOWN,
            Reason.SUSPENDED,
            "Suspended (spec.suspend is true). Set spec.suspend to false to start.",
        )
    else:
        verdict = _Verdict(
            JobStage.PENDING,
            ConditionStatus.UNKNOWN,
            Reason.PENDING,
            f"Creating the Job of run {run_id}",
        )

    previous_conditions = {
        c.type: c for c in (previous_status.conditions if previous_status else None) or ()
    }
    conditions = _conditions(spec, verdict, reached, result, generation, previous_conditions, now)
    terminal = verdict.stage in (JobStage.SUCCEEDED, JobStage.FAILED)

    start_time = same_run.start_time if same_run and same_run.start_time else None
    if start_time is None and job is not None:
        start_time = text_or_none(object_status(job).get("startTime"))
    completion_time = None
    if terminal and job is not None:
        failure = job_condition(job, "Failed", "FailureTarget")
        completion_time = (
            (same_run.completion_time if same_run else None)
            or text_or_none(object_status(job).get("completionTime"))
            or text_or_none((failure or {}).get("lastTransitionTime"))
            or rfc3339(now)
        )

    artifacts = same_run.artifacts if same_run else None
    metrics = same_run.metrics if same_run else None
    if result is not None and result.run_uri:
        artifacts = artifacts_for(spec, result.run_uri, result.manifest_digest)
    if result is not None and result.metrics:
        metrics = dict(result.metrics)
    resumed = (
        result.resumed_from_step
        if result and result.resumed_from_step is not None
        else (same_run.resumed_from_step if same_run else None)
    )

    runs = supersede_runs(previous_status.runs if previous_status else None, run_id, rfc3339(now))
    recorded = next((r for r in runs if r.run_id == run_id), None)
    gate_passed = result.gate_passed if result else None
    if result is None and recorded is not None:
        gate_passed = recorded.gate_passed  # the pods, and their result, can be gone
    if job is not None:
        state = RunState.RUNNING
        if terminal:
            state = RunState.SUCCEEDED if verdict.stage == JobStage.SUCCEEDED else RunState.FAILED
        runs = record_run(
            runs,
            RunRecord(
                run_id=run_id,
                spec_hash=digest,
                state=state,
                start_time=start_time,
                completion_time=completion_time,
                run_uri=artifacts.run_uri if artifacts else None,
                manifest_digest=artifacts.manifest_digest if artifacts else None,
                metrics=metrics,
                gate_passed=gate_passed,
            ),
        )

    return FineTuneJobStatus(
        observed_generation=generation,
        conditions=conditions,
        stage=verdict.stage,
        stages=_stage_statuses(spec, same_run, scrape, reached, verdict),
        progress=_progress(scrape, same_run, reached, verdict),
        run_id=run_id,
        resumed_from_step=resumed,
        runs=runs or None,
        artifacts=artifacts,
        metrics=metrics,
        lineage=Lineage(
            model_uri=spec.model.uri,
            model_revision=spec.model.revision,
            dataset_digest=same_run.lineage.dataset_digest
            if same_run and same_run.lineage
            else None,
            spec_hash=digest,
            trust_remote_code=spec.model.trust_remote_code,
            allow_pickle=spec.model.allow_pickle,
        ),
        gpu_hours=_gpu_hours(pods, now, same_run),
        tracking_urls=same_run.tracking_urls if same_run else None,
        start_time=start_time,
        completion_time=completion_time,
    )


# --- Writing it ------------------------------------------------------------------------


def load_status(raw: Mapping[str, Any] | None) -> FineTuneJobStatus | None:
    """The status as stored on the object (keys this model does not know are ignored);
    None when empty or unreadable."""
    return status_io.load(FineTuneJobStatus, raw)


def dump_status(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as written to the API (camelCase, no nulls)."""
    return status_io.dump(status)


def _without_update_time(status: Mapping[str, Any]) -> dict[str, Any]:
    copy = dict(status)
    progress = copy.get("progress")
    if isinstance(progress, Mapping):
        copy["progress"] = {k: v for k, v in progress.items() if k != "updateTime"}
    return copy


def status_patch(
    previous: Mapping[str, Any] | None, new: FineTuneJobStatus
) -> dict[str, Any] | None:
    """The JSON merge patch that turns the stored status into `new`, or None when nothing
    but `progress.updateTime` would change (so the status is written once per change).
    Keys the status model does not know (another controller's) are left alone."""
    return status_io.patch_for(previous, new, _without_update_time)


_WARNING_REASONS = frozenset({Reason.PREEMPTED.value})


def events_for(
    previous_status: FineTuneJobStatus | None, new_status: FineTuneJobStatus
) -> list[Event]:
    """One Event per transition: a new stage, a condition whose status flips (or first
    appears as True or False), and a new reason on the Succeeded summary (Queued,
    Preempted, …). A status that only moved its progress gives none.

    When Succeeded turns False, the detail conditions that turn False with the same reason
    are that one failure, already told by the Succeeded event: they give no Event of their
    own.
    """
    events: list[Event] = []
    old_stage = previous_status.stage if previous_status else None
    if new_status.stage is not None and new_status.stage != old_stage:
        kind = "Warning" if new_status.stage == JobStage.FAILED else "Normal"
        text = (
            f"Stage {old_stage.value} → {new_status.stage.value}"
            if old_stage
            else f"Stage {new_status.stage.value}"
        )
        events.append(Event(kind, new_status.stage.value, text))
    before = {c.type: c for c in (previous_status.conditions if previous_status else None) or ()}
    failure: str | None = None
    for condition in new_status.conditions or ():
        old = before.get(condition.type)
        if old is None and condition.status == ConditionStatus.UNKNOWN:
            continue
        flipped = old is None or old.status != condition.status
        reworded = (
            condition.type == SUCCEEDED and old is not None and old.reason != condition.reason
        )
        if not (flipped or reworded):
            continue
        is_false = condition.status == ConditionStatus.FALSE
        if condition.type == SUCCEEDED and is_false:
            failure = condition.reason
        elif is_false and condition.reason == failure:
            continue
        warning = is_false or condition.reason in _WARNING_REASONS
        message = f"{condition.type} is {condition.status.value}"
        if condition.message:
            message += f": {condition.message}"
        events.append(
            Event("Warning" if warning else "Normal", condition.reason, clean_message(message))
        )
    return events
