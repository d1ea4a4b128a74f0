"""The Argo CD health checks (charts/kubetune/argocd/*.lua), run in Lua 5.1 (Argo CD runs
them in gopher-lua, a Lua 5.1) on statuses the operator's own status code computes.

Like Argo CD, the scripts get the object as the global `obj` and only the base library:
no os, io, require or loading of code.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lupa.lua51
import pytest
import yaml
from chart_tools import CHART_DIR, REPO_ROOT

from kubetune.api.contract import Reason, TrainerResult
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, Variant
from kubetune.api.v1alpha1.status import JobStage
from kubetune.operator import names
from kubetune.operator.progress import Scrape, StageSample
from kubetune.operator.serving import (
    LABEL_MODELDEPLOYMENT,
    ClusterFeatures,
    Resolution,
    ServingError,
    ServingPlan,
    ServingProblem,
    plan_serving,
)
from kubetune.operator.serving_sources import ResolvedArtifact, missing_finetunejob
from kubetune.operator.serving_status import compute_serving_status
from kubetune.operator.settings import OperatorSettings, parse_settings
from kubetune.operator.status import Observed, Refusal, compute_status, dump_status
from kubetune.storage.layout import run_id_for

SCRIPTS = CHART_DIR / "argocd"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
STARTED = "2025-03-01T10:00:00Z"


def run_health(script: Path, obj: dict[str, Any]) -> dict[str, str]:
    """Run a health script on `obj` the way Argo CD does; returns {status, message}."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    lua.execute(
        "os, io, require, dofile, loadfile, loadstring, load, module, package, debug ="
        " nil, nil, nil, nil, nil, nil, nil, nil, nil, nil"
    )
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script.read_text())
    health = dict(result)
    assert set(health) <= {"status", "message"}, health
    assert health["status"] in {
        "Healthy",
        "Progressing",
        "Degraded",
        "Suspended",
        "Missing",
        "Unknown",
    }
    return {"status": str(health["status"]), "message": str(health.get("message") or "")}


# --- FineTuneJob statuses, from compute_status --------------------------------------------


def smoke(**spec_changes: Any) -> FineTuneJob:
    data = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-smoke.yaml").read_text())
    data["metadata"].update(namespace="ml-team", generation=1)
    data["spec"].update(spec_changes)
    return FineTuneJob.model_validate(data)


def job(
    ftj: FineTuneJob,
    *,
    condition: tuple[str, str] | None = None,
    suspend: bool = False,
    failed: int = 0,
) -> dict[str, Any]:
    run = run_id_for(ftj.spec)
    status: dict[str, Any] = {} if suspend else {"startTime": STARTED}
    if failed:
        status["failed"] = failed
    if condition is not None:
        status["conditions"] = [
            {
                "type": condition[0],
                "status": "True",
                "reason": condition[1],
                "message": f"Job has reached the specified {condition[1]}",
                "lastTransitionTime": "2025-03-01T11:30:00Z",
            }
        ]
    return {
        "metadata": {
            "name": names.job_name(ftj.metadata.name or "", run),
            "labels": names.labels(ftj.metadata.name or "", run),
            "annotations": {names.ANNOTATION_SPEC_HASH: names.spec_hash(ftj.spec)},
        },
        "spec": {"suspend": suspend, "backoffLimit": ftj.spec.backoff_limit},
        "status": status,
    }


def pod(
    ftj: FineTuneJob, phase: str, result: TrainerResult | None = None, exit_code: int = 0
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": STARTED}}
    if result is not None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "startedAt": STARTED,
                "finishedAt": "2025-03-01T11:00:00Z",
                "message": result.to_termination_message(),
            }
        }
    run = run_id_for(ftj.spec)
    return {
        "metadata": {
            "name": f"{names.job_name(ftj.metadata.name or '', run)}-abcde",
            "labels": names.labels(ftj.metadata.name or "", run),
            "creationTimestamp": STARTED,
        },
        "spec": {"containers": [{"name": "trainer", "resources": {"limits": {}}}]},
        "status": {
            "phase": phase,
            "startTime": STARTED,
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def with_status(ftj: FineTuneJob, observed: Observed) -> dict[str, Any]:
    status = compute_status(ftj.spec, 1, None, observed)
    body = ftj.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = dump_status(status)
    return body


def finetunejob_cases() -> list[Any]:
    plain = smoke()
    queued = smoke(queueName="team-a")
    suspended = smoke(suspend=True)
    training = Scrape(
        stages=(StageSample("SFT", step=8, total_steps=20, loss=1.25, eta_seconds=720),),
        phase=JobStage.TRAINING,
        observed_at=NOW,
    )
    succeeded = TrainerResult(
        reason=Reason.SUCCEEDED,
        message="done",
        run_uri="pvc://kubetune-artifacts/runs/ml-team/kubetune-smoke/x",
    )
    gate = TrainerResult(reason=Reason.EVALUATION_GATE_FAILED, message="ROUGEL 0.01 < 0.02")
    stale = with_status(plain, Observed.of(NOW, job(plain), [pod(plain, "Running")], training))
    stale["metadata"]["generation"] = 2
    cases = [
        (
            "no status yet",
            smoke().model_dump(mode="json", by_alias=True, exclude_none=True),
            "Progressing",
            "Waiting for the kubetune operator",
        ),
        ("creating the Job", with_status(plain, Observed.of(NOW)), "Progressing", "Pending"),
        (
            "waiting for a Secret",
            with_status(
                plain,
                Observed.of(
                    NOW,
                    refusal=Refusal(
                        Reason.SECRET_NOT_FOUND,
                        "spec.output.credentialsSecretRef: Secret 's3' does not exist",
                    ),
                ),
            ),
            "Progressing",
            "SecretNotFound",
        ),
        (
            "queued in Kueue",
            with_status(queued, Observed.of(NOW, job(queued, suspend=True))),
            "Progressing",
            "Queued",
        ),
        (
            "pod starting",
            with_status(plain, Observed.of(NOW, job(plain), [pod(plain, "Running")])),
            "Progressing",
            "Preparing",
        ),
        (
            "training",
            with_status(plain, Observed.of(NOW, job(plain), [pod(plain, "Running")], training)),
            "Progressing",
            "Training (40%, step 8/20, loss 1.2500, ETA 12m): Training run ",
        ),
        ("an older generation", stale, "Progressing", "observe generation 2"),
        (
            "succeeded",
            with_status(
                plain,
                Observed.of(
                    NOW,
                    job(plain, condition=("Complete", "Completed")),
                    [pod(plain, "Succeeded", succeeded)],
                ),
            ),
            "Healthy",
            "succeeded",
        ),
        (
            "gate failed",
            with_status(
                plain,
                Observed.of(
                    NOW,
                    job(plain, condition=("Complete", "Completed")),
                    [pod(plain, "Succeeded", gate)],
                ),
            ),
            "Degraded",
            "EvaluationGateFailed: The evaluation gate failed",
        ),
        (
            "out of retries",
            with_status(
                plain,
                Observed.of(
                    NOW,
                    job(plain, condition=("Failed", "BackoffLimitExceeded"), failed=4),
                    [
                        pod(
                            plain,
                            "Failed",
                            TrainerResult(reason=Reason.DOWNLOAD_FAILED, message="s3 timeout"),
                            41,
                        )
                    ],
                ),
            ),
            "Degraded",
            "BackoffLimitExceeded: The trainer failed 4 times",
        ),
        (
            "refused spec",
            with_status(
                plain,
                Observed.of(
                    NOW,
                    refusal=Refusal(
                        Reason.LOCAL_URI_IN_CLUSTER,
                        "spec.dataset.uri: a local path cannot be read in a cluster",
                    ),
                ),
            ),
            "Degraded",
            "LocalURIInCluster: spec.dataset.uri",
        ),
        ("suspended", with_status(suspended, Observed.of(NOW)), "Suspended", "spec.suspend"),
    ]
    return [pytest.param(obj, status, message, id=name) for name, obj, status, message in cases]


@pytest.mark.parametrize(("obj", "status", "message"), finetunejob_cases())
def test_finetunejob_health(obj: dict[str, Any], status: str, message: str) -> None:
    if "status" in obj:
        FineTuneJob.model_validate(obj)  # the status has the CRD's shape
    health = run_health(SCRIPTS / "finetunejob-health.lua", obj)
    assert health["status"] == status, health
    assert message in health["message"], health


def test_every_stage_has_a_health() -> None:
    base = with_status(smoke(), Observed.of(NOW))
    expected = {
        JobStage.SUCCEEDED: "Healthy",
        JobStage.FAILED: "Degraded",
        JobStage.SUSPENDED: "Suspended",
    }
    for stage in JobStage:
        obj = copy.deepcopy(base)
        obj["status"]["stage"] = stage.value
        health = run_health(SCRIPTS / "finetunejob-health.lua", obj)
        assert health["status"] == expected.get(stage, "Progressing"), stage


# --- ModelDeployment statuses, from compute_serving_status ----------------------------------

MD_DIGEST = "sha256:" + "a" * 64


def example_md(**spec_changes: Any) -> ModelDeployment:
    data: dict[str, Any] = yaml.safe_load(
        (REPO_ROOT / "examples" / "modeldeployment-merged.yaml").read_text()
    )
    data["metadata"].update(generation=3, uid="0b7c2d4e-0000-4000-8000-00000000000b")
    data["spec"].update(spec_changes)
    return ModelDeployment.model_validate(data)


def serving_settings() -> OperatorSettings:
    values = yaml.safe_load((Path(__file__).parent / "values" / "gpu-classes.yaml").read_text())
    return parse_settings(values["settings"])


def plan(md: ModelDeployment) -> ServingPlan:
    """The plan for the example: the W4A16 variant of support-bot-lora's run."""
    resolved = ResolvedArtifact(
        run_uri="s3://ml-artifacts/kubetune/ml-team/support-bot-lora/4f702c671992",
        manifest_digest=MD_DIGEST,
        variant=Variant.W4A16,
        variants=frozenset({Variant.ADAPTER, Variant.MERGED, Variant.W4A16}),
        lineage={
            "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
            "runId": "4f702c671992",
            "method": "LoRA",
            "gatePassed": True,
        },
        gate_passed=True,
        fine_tune_job="support-bot-lora",
    )
    return plan_serving(md, Resolution(model=resolved), serving_settings(), ClusterFeatures())


def vllm_deployment(
    *, ready: int = 2, replicas: int = 2, generation: int = 2, observed: int = 2
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "support-bot", "namespace": "ml-team", "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True" if ready else "False", "reason": "R"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        },
    }


def vllm_pod(container_status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "support-bot-6d5f8-abcde",
            "namespace": "ml-team",
            "labels": {LABEL_MODELDEPLOYMENT: "support-bot"},
        },
        "status": {"phase": "Running", "containerStatuses": [{"name": "vllm", **container_status}]},
    }


CRASHING = {
    "ready": False,
    "restartCount": 5,
    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "no adapter"}},
}
PULL_ERROR = {
    "ready": False,
    "restartCount": 0,
    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
}


def served(
    md: ModelDeployment,
    deployment: dict[str, Any] | None,
    outcome: ServingPlan | ServingError,
    pods: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    status = compute_serving_status(md, 3, None, deployment, list(pods), outcome, NOW)
    body = md.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return body


def modeldeployment_cases() -> list[Any]:
    md = example_md()
    fixed = example_md(autoscaling=None, replicas=0)
    waiting = ServingError(
        [missing_finetunejob("spec.model.fineTuneJobRef", "support-bot-lora", "ml-team")]
    )
    refused = ServingError(
        [
            ServingProblem(
                "spec.model.variant",
                Reason.EVALUATION_GATE_FAILED,
                "run 4f702c671992 failed its evaluation gate; set requireGate: false to serve it",
            )
        ]
    )
    stale = served(md, vllm_deployment(), plan(md))
    stale["metadata"]["generation"] = 4
    bare = md.model_dump(mode="json", by_alias=True, exclude_none=True)
    cases = [
        ("no status yet", bare, "Progressing", "Waiting for the kubetune operator"),
        ("creating", served(md, None, plan(md)), "Progressing", "Deploying"),
        (
            "serving",
            served(md, vllm_deployment(), plan(md)),
            "Healthy",
            "Serving: Serving ",
        ),
        (
            "rolling out",
            served(md, vllm_deployment(generation=3, observed=2), plan(md)),
            "Progressing",
            "Deploying: Deployment support-bot is rolling out generation 3",
        ),
        ("an older generation", stale, "Progressing", "observe generation 4"),
        ("FineTuneJob not created yet", served(md, None, waiting), "Progressing", "SourceNotFound"),
        ("gate failed", served(md, None, refused), "Degraded", "EvaluationGateFailed"),
        (
            "gate failed, old model still served",
            served(md, vllm_deployment(), refused),
            "Degraded",
            "keeps serving what it served before",
        ),
        (
            "crash loop",
            served(md, vllm_deployment(ready=0), plan(md), (vllm_pod(CRASHING),)),
            "Degraded",
            "CrashLooping",
        ),
        (
            "image not found",
            served(md, vllm_deployment(ready=0), plan(md), (vllm_pod(PULL_ERROR),)),
            "Degraded",
            "ImagePullBackOff",
        ),
        (
            "scaled to zero",
            served(fixed, vllm_deployment(ready=0, replicas=0), plan(fixed)),
            "Suspended",
            "ScaledToZero",
        ),
    ]
    return [pytest.param(obj, status, message, id=name) for name, obj, status, message in cases]


@pytest.mark.parametrize(("obj", "status", "message"), modeldeployment_cases())
def test_modeldeployment_health(obj: dict[str, Any], status: str, message: str) -> None:
    if "status" in obj:
        ModelDeployment.model_validate(obj)  # the status has the CRD's shape
    health = run_health(SCRIPTS / "modeldeployment-health.lua", obj)
    assert health["status"] == status, health
    assert message in health["message"], health


# --- the copy for argocd-cm ----------------------------------------------------------------


def test_argocd_cm_snippet_carries_the_scripts() -> None:
    snippet = yaml.safe_load(
        (REPO_ROOT / "deploy" / "argocd" / "argocd-cm-health.yaml").read_text()
    )
    assert snippet["data"] == {
        "resource.customizations.health.kubetune.io_FineTuneJob": (
            SCRIPTS / "finetunejob-health.lua"
        ).read_text(),
        "resource.customizations.health.kubetune.io_ModelDeployment": (
            SCRIPTS / "modeldeployment-health.lua"
        ).read_text(),
    }
