"""Running a bad-input case through each surface a user sees, with the real code paths.

- `kubetune run` / `kubetune prepare`: `kubetune.cli.main` in-process (the same function
  the console script calls), or the real process for a subset.
- The trainer: `python -m kubetune.trainer`'s `main` in-process, reading the result file
  it writes (the termination message).
- The FineTuneJob status: the trainer's result and exit code in a terminated pod, the Job
  failed (or retrying) as the podFailurePolicy built from the exit-code table decides,
  through `operator.status.compute_status`. Operator refusals (a missing Secret, a local
  URI, a job no GPU class fits) come from `build_children` and the reconciler's Secret
  check, exactly as a reconcile pass gets them.
- The ModelDeployment status: `serving_resolve.resolve` over the FineTuneJob the operator
  would show, `plan_serving`, then `compute_serving_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import yaml

from kubetune.api.contract import (
    FailureClass,
    Reason,
    TrainerResult,
    classify_exit,
    exit_code_for,
)
from kubetune.api.meta import Condition
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment
from kubetune.storage.layout import run_id_for

from .cases import (
    SERVED_JOB,
    Case,
    JobInput,
    OperatorInput,
    ServingInput,
    Surface,
)
from .workspace import Workspace

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
NAMESPACE = "ml"
UID = "6f1c2a9e-0000-4000-8000-000000000001"
STARTED = "2026-03-01T11:00:00Z"
FINISHED = "2026-03-01T11:05:00Z"


@dataclass(frozen=True)
class Seen:
    """What one surface showed for a case."""

    surface: Surface
    reason: str
    message: str
    exit_code: int | None = None
    condition_status: str | None = None


# --- Inputs as files ----------------------------------------------------------------------


def manifest(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": dict(spec),
    }


def valid_spec(spec: Mapping[str, Any]) -> FineTuneJobSpec | None:
    """The spec, when the API would accept it."""
    try:
        return FineTuneJobSpec.model_validate(dict(spec))
    except ValueError:
        return None


def write_job(case: Case, job: JobInput, ws: Workspace) -> Path:
    path = ws.root / "job.yaml"
    text = job.job_text if job.job_text is not None else yaml.safe_dump(manifest(case.id, job.spec))
    path.write_text(text, encoding="utf-8")
    return path


def write_config(case: Case, job: JobInput, ws: Workspace) -> Path:
    """The TrainerConfig the operator renders (the run the command line makes, so both
    write to the same run folder), or the case's own text."""
    path = ws.root / "trainer-config.yaml"
    if job.config_text is not None:
        path.write_text(job.config_text, encoding="utf-8")
        return path
    spec = valid_spec(job.spec)
    config = {
        "schemaVersion": 1,
        "run": {
            "namespace": "local",
            "jobName": case.id,
            "runId": run_id_for(spec) if spec is not None else "invalid-spec",
            "outputUri": job.spec.get("output", {}).get("uri", str(ws.output)),
        },
        "spec": job.spec,
        "metricsPort": 0,
        "allowBuiltinRandom": job.allow_random,
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@contextlib.contextmanager
def s3_checks_credentials(endpoint: str, on: bool) -> Iterator[None]:
    """moto accepts any credentials unless told to authenticate every request (then the
    catalog's fake keys are refused with 403); restored afterwards, since the setting is
    global to the process."""
    if not on:
        yield
        return

    def set_count(value: bytes) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=value,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    set_count(b"0")
    try:
        yield
    finally:
        set_count(b"inf")


# --- The command line ---------------------------------------------------------------------


def _cli_reason(code: int) -> str:
    return Reason.SUCCEEDED.value if code == 0 else classify_exit(code).reason.value


def run_cli(case: Case, job: JobInput, ws: Workspace) -> Seen:
    """`kubetune <run|prepare> job.yaml` in-process: exit code and stderr."""
    from kubetune.cli import main

    path = write_job(case, job, ws)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([case.cli, str(path)])
    return Seen(Surface.CLI, _cli_reason(code), err.getvalue(), code)


def run_cli_process(case: Case, job: JobInput, ws: Workspace) -> Seen:
    """`python -m kubetune <run|prepare> job.yaml` as a real process."""
    path = write_job(case, job, ws)
    env = {**os.environ, **job.env}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", case.cli, str(path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=ws.root,
    )  # fmt: skip
    return Seen(Surface.CLI, _cli_reason(proc.returncode), proc.stderr, proc.returncode)


# --- The trainer --------------------------------------------------------------------------


def _trainer_args(case: Case, job: JobInput, ws: Workspace) -> list[str]:
    config = write_config(case, job, ws)
    result = ws.root / "termination-log"
    result.unlink(missing_ok=True)
    return ["--config", str(config), "--result-file", str(result), "--work-dir", str(ws.work)]


def _result_seen(ws: Workspace, code: int) -> tuple[Seen, str]:
    text = (ws.root / "termination-log").read_text(encoding="utf-8")
    assert len(text.encode()) <= 4096, "the termination message is over the kubelet's limit"
    result = TrainerResult.model_validate_json(text)
    return Seen(Surface.RESULT, result.reason.value, result.message, code), text


def run_trainer(case: Case, job: JobInput, ws: Workspace) -> tuple[Seen, str]:
    """`python -m kubetune.trainer` in-process; returns what the result file says and its
    text (the termination message the operator reads)."""
    from kubetune.trainer.__main__ import main

    code = main(_trainer_args(case, job, ws))
    return _result_seen(ws, code)


def run_trainer_process(case: Case, job: JobInput, ws: Workspace) -> tuple[Seen, str]:
    """`python -m kubetune.trainer` as the pod runs it."""
    env = {**os.environ, **job.env}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", *_trainer_args(case, job, ws)],
        capture_output=True, text=True, env=env, timeout=300, cwd=ws.root,
    )  # fmt: skip
    return _result_seen(ws, proc.returncode)


# --- The FineTuneJob status ---------------------------------------------------------------


def _fails_job(code: int) -> bool:
    """Whether the podFailurePolicy fails the Job at once for this exit code."""
    from kubetune.operator.children import pod_failure_policy

    return any(
        rule["action"] == "FailJob" and code in rule["onExitCodes"]["values"]
        for rule in pod_failure_policy()["rules"]
        if "onExitCodes" in rule
    )


def _job_and_pod(
    name: str, spec: FineTuneJobSpec, code: int, message: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The child Job and its terminated pod as the API server returns them."""
    from kubetune.operator import names
    from kubetune.operator.pod import CONTAINER_NAME

    run = run_id_for(spec)
    status: dict[str, Any] = {"startTime": STARTED}
    if code == 0:
        status.update(succeeded=1, completionTime=FINISHED)
        status["conditions"] = [_job_condition("Complete", "CompletionsReached")]
    else:
        status["failed"] = 1
        if _fails_job(code):
            status["conditions"] = [_job_condition("Failed", "PodFailurePolicy")]
    job = {
        "metadata": {
            "name": names.job_name(name, run),
            "labels": names.labels(name, run),
            "annotations": {names.ANNOTATION_SPEC_HASH: names.spec_hash(spec)},
        },
        "spec": {"backoffLimit": spec.backoff_limit},
        "status": status,
    }
    terminated = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "message": message,
        "startedAt": STARTED,
        "finishedAt": FINISHED,
    }
    pod = {
        "metadata": {
            "name": f"{names.job_name(name, run)}-x7k2p",
            "creationTimestamp": STARTED,
            "labels": names.labels(name, run),
        },
        "spec": {"containers": [{"name": CONTAINER_NAME}]},
        "status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "startTime": STARTED,
            "containerStatuses": [{"name": CONTAINER_NAME, "state": {"terminated": terminated}}],
        },
    }
    return job, pod


def _job_condition(kind: str, reason: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": f"Job has reached {reason}",
        "lastTransitionTime": FINISHED,
    }


def _succeeded(conditions: list[Condition] | None) -> Condition:
    return next(c for c in conditions or () if c.type == "Succeeded")


def status_after_pod(case: Case, job: JobInput, code: int, termination_message: str) -> Seen:
    """The FineTuneJob status once the trainer's pod ended with this code and message."""
    from kubetune.operator.status import Observed, compute_status

    spec = valid_spec(job.spec)
    assert spec is not None, "only a spec the API accepts reaches a pod"
    job_obj, pod = _job_and_pod(case.id, spec, code, termination_message)
    status = compute_status(spec, 1, None, Observed.of(NOW, job_obj, [pod]))
    succeeded = _succeeded(status.conditions)
    return Seen(Surface.STATUS, succeeded.reason, succeeded.message, None, succeeded.status.value)


class _Namespace:
    """The one API call the Secret check makes, answered from the case's Secrets."""

    def __init__(self, secrets: Mapping[str, frozenset[str]]) -> None:
        self.secrets = secrets

    async def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        keys = self.secrets.get(name)
        return set(keys) if keys is not None else None


def _finetunejob(name: str, spec: Mapping[str, Any], status: Any = None) -> FineTuneJob:
    body: dict[str, Any] = {
        **manifest(name, spec),
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": UID},
    }
    if status is not None:
        body["status"] = status
    return FineTuneJob.model_validate(body)


def operator_status(case: Case, given: OperatorInput) -> Seen:
    """What a reconcile pass writes for a job it refuses: the builders' refusal, else the
    Secret check's (`Reconciler._missing_secrets`), through `compute_status`."""
    from kubetune.operator.children import build_children
    from kubetune.operator.pod import SpecError
    from kubetune.operator.reconcile import Reconciler
    from kubetune.operator.settings import OperatorSettings
    from kubetune.operator.sizing import SizingError
    from kubetune.operator.status import Observed, Refusal, compute_status

    ftj = _finetunejob(case.id, given.spec)
    settings = OperatorSettings.model_validate(dict(given.settings))
    refusal: Refusal | None = None
    try:
        build_children(ftj, settings, run_id_for(ftj.spec))
    except (SpecError, SizingError) as error:
        refusal = Refusal.from_error(error)
    if refusal is None:
        reconciler = Reconciler(
            cache=cast(Any, None),
            kube=cast(Any, _Namespace(given.secrets)),
            settings=settings,
            metrics=cast(Any, None),
        )
        refusal = asyncio.run(reconciler._missing_secrets((NAMESPACE, case.id), ftj))
    assert refusal is not None, "the operator accepted the job"
    status = compute_status(ftj.spec, 1, None, Observed.of(NOW, refusal=refusal))
    succeeded = _succeeded(status.conditions)
    return Seen(Surface.STATUS, succeeded.reason, succeeded.message, None, succeeded.status.value)


# --- The ModelDeployment status -------------------------------------------------------------


def _served_job_status(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The status the operator shows for a job whose run succeeded (computed, not written by
    hand): the trainer's success result through `compute_status`."""
    from kubetune.operator.status import Observed, compute_status, dump_status

    run = run_id_for(spec)
    result = TrainerResult(
        reason=Reason.SUCCEEDED,
        run_uri=f"s3://ml-artifacts/kubetune/{NAMESPACE}/{SERVED_JOB}/{run}",
        manifest_digest="sha256:" + "a" * 64,
    )
    job, pod = _job_and_pod(SERVED_JOB, spec, 0, result.to_termination_message())
    return dump_status(compute_status(spec, 1, None, Observed.of(NOW, job, [pod])))


def serving_status(case: Case, given: ServingInput) -> Seen:
    """The Ready condition of a ModelDeployment the operator refuses."""
    from kubetune.operator.serving import ServingError, plan_serving
    from kubetune.operator.serving_checks import ClusterFeatures
    from kubetune.operator.serving_resolve import resolve
    from kubetune.operator.serving_status import compute_serving_status
    from kubetune.operator.settings import OperatorSettings

    job_spec = FineTuneJobSpec.model_validate(given.job)
    ftj = _finetunejob(SERVED_JOB, given.job, _served_job_status(job_spec))
    md = ModelDeployment.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": case.id, "namespace": NAMESPACE, "uid": UID},
            "spec": given.spec,
        }
    )
    body = ftj.model_dump(mode="json", by_alias=True, exclude_none=True)
    resolution = resolve(md, {(NAMESPACE, SERVED_JOB): body})
    try:
        plan_serving(md, resolution, OperatorSettings(), ClusterFeatures())
    except ServingError as error:
        outcome = error
    else:
        raise AssertionError("the operator planned to serve it")
    status = compute_serving_status(md, 1, None, None, [], outcome, NOW)
    ready = next(c for c in status.conditions or () if c.type == "Ready")
    return Seen(Surface.SERVING, ready.reason, ready.message, None, ready.status.value)


# --- What a failure leaves behind -----------------------------------------------------------


def expected_condition(reason: Reason) -> str:
    """The `Succeeded` (or `Ready`) status a failure with this reason must show: Unknown
    while the operator waits for a Secret or retries an infrastructure error, else False."""
    from kubetune.operator.status import WAITING_REASONS

    code = exit_code_for(reason)
    infrastructure = classify_exit(code).failure_class == FailureClass.INFRASTRUCTURE
    return "Unknown" if reason in WAITING_REASONS or (code != 1 and infrastructure) else "False"


def leftovers(ws: Workspace) -> list[str]:
    """Files a failed run left in its local artifact root (run-relative paths)."""
    if not ws.output.is_dir():
        return []
    return sorted(p.relative_to(ws.output).as_posix() for p in ws.output.rglob("*") if p.is_file())


def data_report(ws: Workspace) -> dict[str, Any]:
    """The data report `kubetune prepare` wrote (the case's only run)."""
    (report,) = ws.output.rglob("data/report.json")
    return cast(dict[str, Any], json.loads(report.read_text(encoding="utf-8")))
