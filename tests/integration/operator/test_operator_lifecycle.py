"""The real operator against the local Kubernetes API, through a FineTuneJob's life.

One operator runs for the whole module (`operator_runner.operator_fixture`); each test has
its own namespace. The tests play the kubelet, the Job controller and the trainer's metrics
endpoint (`simulate.py`) and check what a user sees: the children, `status`, Events and how
many requests the operator makes.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ftj_handle import FTJ, FTJ_API, FineTuneJobHandle, condition, manifest, succeeded, success
from operator_runner import RunningOperator, operator_fixture
from simulate import Cluster, TrainerEndpoint

from kubetune.api.contract import Reason, TrainerResult, exit_code_for
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import names
from kubetune.operator.children import build_children
from kubetune.operator.settings import OperatorSettings
from kubetune.storage.layout import run_id_for
from support.kubeenv import KubeEnv

pytestmark = pytest.mark.apiserver

MANAGER = names.MANAGER

operator = operator_fixture({"statusPollIntervalSeconds": 1})


# ------------------------------------------------------------------------------ helpers


def printed_columns(env: KubeEnv, namespace: str, name: str) -> dict[str, str]:
    """The FineTuneJob as `kubectl get` prints it: the real CRD server renders the printer
    columns when asked for a Table."""
    assert env.router is not None
    assert env.router.port is not None
    connection = http.client.HTTPConnection("127.0.0.1", env.router.port, timeout=10)
    try:
        connection.request(
            "GET",
            env.path_for(FTJ_API, FTJ, name, namespace),
            headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        )
        table = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    columns = [c["name"] for c in table["columnDefinitions"]]
    (row,) = table["rows"]
    return {k: str(v) for k, v in zip(columns, row["cells"], strict=True)}


def delta(env: KubeEnv, before: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """Requests at the API since `before` (`env.request_counts()`), by (verb, resource)."""
    now = env.request_counts()
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


@pytest.fixture
def env(kube_env: KubeEnv, operator: RunningOperator, namespace: str) -> Iterator[KubeEnv]:
    """The local API, with the operator running; the test's FineTuneJobs are deleted
    afterwards, so the operator has nothing left to poll."""
    operator.start()
    yield kube_env
    for ftj in kube_env.list(FTJ_API, FTJ, namespace):
        kube_env.delete(FTJ_API, FTJ, ftj["metadata"]["name"], namespace)


@pytest.fixture
def endpoint() -> Iterator[TrainerEndpoint]:
    with TrainerEndpoint() as served:
        yield served


@pytest.fixture
def cluster(env: KubeEnv, namespace: str, endpoint: TrainerEndpoint) -> Cluster:
    return Cluster(env, namespace, metrics_port=endpoint.port)


# -------------------------------------------------------------------------------- tests


def test_create_progress_and_success(
    env: KubeEnv, namespace: str, cluster: Cluster, endpoint: TrainerEndpoint
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "support-bot")
    uid = ftj.create()["metadata"]["uid"]

    trainer_job = cluster.wait_job(ftj.name)
    run_id = trainer_job["metadata"]["labels"][names.LABEL_RUN_ID]
    config_map = env.get("v1", "ConfigMap", f"{ftj.name}-{run_id}-config", namespace)
    assert config_map is not None
    for child in (trainer_job, config_map):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (FTJ, ftj.name, uid)
        assert owner["controller"] is True
        labels = child["metadata"]["labels"]
        assert labels[names.LABEL_FINETUNEJOB] == ftj.name
        assert labels[names.LABEL_MANAGED_BY] == MANAGER
        assert labels[names.LABEL_RUN_ID] == run_id
        assert labels["team"] == "support", "the FineTuneJob's labels reach its children"
    pending = ftj.wait_stage("Pending")
    assert pending["runId"] == run_id
    assert pending["observedGeneration"] == 1

    pod = cluster.start_pod(trainer_job["metadata"]["name"])
    endpoint.report(
        "SFT", step=5, total_steps=20, loss=1.234567, tokens_per_second=1234.56, eta_seconds=90
    )
    training = ftj.wait(lambda s: (s.get("progress") or {}).get("step") == 5, "progress at step 5")
    assert training["stage"] == "Training"
    progress = training["progress"]
    assert progress["totalSteps"] == 20
    assert progress["percent"] == "25%"
    assert progress["loss"] == "1.2346"
    assert progress["tokensPerSecond"] == "1234.6"
    assert (progress["eta"], progress["etaSeconds"]) == ("1m", 90)
    assert succeeded(training) == ("Unknown", "Running")
    assert condition(training, "DataPrepared")["status"] == "True"
    # What `kubectl get ftj` prints (the CRD's printer columns).
    table = printed_columns(env, namespace, ftj.name)
    assert table["Stage"] == "Training"
    assert (table["Progress"], table["Loss"], table["ETA"]) == ("25%", "1.2346", "1m")
    assert table["Succeeded"] == "Unknown"

    endpoint.report("SFT", step=15, total_steps=20, loss=0.9, eta_seconds=30)
    ftj.wait(lambda s: s["progress"]["step"] == 15, "progress at step 15", timeout=5)

    run_uri = f"pvc://kubetune-artifacts/runs/{namespace}/{ftj.name}/{run_id}"
    cluster.finish_pod(pod, success(run_uri), exit_code=0)
    done = ftj.wait_stage("Succeeded")
    assert succeeded(done) == ("True", "Succeeded")
    assert done["artifacts"]["runUri"] == run_uri
    assert done["artifacts"]["adapter"] == f"{run_uri}/adapter/"
    assert done["artifacts"]["merged"].startswith(f"{run_uri}/merged")
    assert done["metrics"] == {"Perplexity": "12.5", "EvalLoss": "2.526"}
    assert condition(done, "GatePassed")["status"] == "True"
    assert all(condition(done, t)["status"] == "True" for t in ("Trained", "Evaluated", "Exported"))
    assert done["progress"]["step"] == 20
    assert "eta" not in done["progress"]
    assert done["completionTime"]
    (record,) = done["runs"]
    assert (record["runId"], record["state"], record["runUri"]) == (run_id, "Succeeded", run_uri)

    ftj.wait_event("Succeeded", "Succeeded is True")
    events = ftj.events()
    stages = [reason for _, reason, message in events if message.startswith("Stage")]
    # The pod ends before the Job controller marks the Job complete: the stage may show
    # Publishing (the trainer's last step) in between.
    assert stages in (
        ["Pending", "Training", "Succeeded"],
        ["Pending", "Training", "Publishing", "Succeeded"],
    )
    assert f"Succeeded is True: Run {run_id} succeeded: {run_uri}" in {m for _, _, m in events}
    assert all(kind == "Normal" for kind, _, _ in events)


def test_infrastructure_failure_is_retried_and_resumes(
    env: KubeEnv, namespace: str, cluster: Cluster, endpoint: TrainerEndpoint
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "flaky-node")
    ftj.create()
    trainer_job = cluster.wait_job(ftj.name)
    job_name = trainer_job["metadata"]["name"]
    first = cluster.start_pod(job_name)
    endpoint.report("SFT", step=8, total_steps=20, loss=1.5)
    ftj.wait(lambda s: (s.get("progress") or {}).get("step") == 8, "progress at step 8")

    nccl = TrainerResult(
        reason=Reason.INFRASTRUCTURE_ERROR, message="NCCL timeout on rank 0", step=8
    )
    replacement = cluster.finish_pod(first, nccl, exit_code_for(Reason.INFRASTRUCTURE_ERROR))
    assert replacement is not None, "an infrastructure error counts against backoffLimit"
    expected = (
        "Retrying from the last checkpoint (attempt 2 of 4) after InfrastructureError: NCCL "
        f"timeout on rank 0. Pod {replacement['metadata']['name']} is starting"
    )
    retrying = ftj.wait(lambda s: condition(s, "Succeeded")["message"] == expected, expected)
    assert retrying["stage"] == "Pending"
    assert succeeded(retrying) == ("Unknown", "InfrastructureError")
    assert not any(
        c["type"] == "Failed" for c in cluster.job(job_name)["status"].get("conditions") or []
    )

    second = cluster.run_pod(replacement)
    endpoint.report("SFT", step=12, total_steps=20, loss=1.1)
    ftj.wait(lambda s: s["stage"] == "Training" and s["progress"]["step"] == 12, "step 12")
    run_uri = f"pvc://kubetune-artifacts/runs/{namespace}/{ftj.name}/{retrying['runId']}"
    cluster.finish_pod(second, success(run_uri, resumed_from_step=8), exit_code=0)
    done = ftj.wait_stage("Succeeded")
    assert done["resumedFromStep"] == 8
    assert len(cluster.jobs(ftj.name)) == 1, "retried within the same Job"
    assert len(cluster.pods(job_name)) == 2
    assert ("Warning", "InfrastructureError") not in {(k, r) for k, r, _ in ftj.events()}


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        pytest.param(
            Reason.DATASET_INVALID,
            "data/train.jsonl line 7: 'messages' is missing; fix the row or set "
            "dataset.onInvalid: Skip",
            id="user-error",
        ),
        pytest.param(
            Reason.OUT_OF_MEMORY,
            "CUDA out of memory at step 3 (needs ~42 GiB, the GPU has 22.5 GiB): use method "
            "QLoRA or lower training.batchSize to 2",
            id="out-of-memory",
        ),
    ],
)
def test_fail_fast_with_the_trainers_reason(
    env: KubeEnv, namespace: str, cluster: Cluster, reason: Reason, message: str
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "fails")
    ftj.create()
    job_name = cluster.wait_job(ftj.name)["metadata"]["name"]
    pod = cluster.start_pod(job_name)
    ftj.wait_stage("Preparing")  # running; no progress exported yet

    result = TrainerResult(reason=reason, message=message, step=3)
    assert cluster.finish_pod(pod, result, exit_code_for(reason)) is None, "FailJob: no retry"
    failed = ftj.wait_stage("Failed")
    assert succeeded(failed) == ("False", reason.value)
    assert condition(failed, "Succeeded")["message"] == message
    assert failed["completionTime"]
    assert failed["runs"][0]["state"] == "Failed"
    event = ftj.wait_event(reason.value, "Succeeded is False")
    assert event == ("Warning", reason.value, f"Succeeded is False: {message}")
    assert len(cluster.pods(job_name)) == 1


def test_suspend_and_resume(
    env: KubeEnv, namespace: str, cluster: Cluster, endpoint: TrainerEndpoint
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "paused")
    ftj.create()
    job_name = cluster.wait_job(ftj.name)["metadata"]["name"]
    cluster.start_pod(job_name)
    endpoint.report("SFT", step=4, total_steps=20, loss=1.4)
    ftj.wait(lambda s: (s.get("progress") or {}).get("step") == 4, "progress at step 4")

    ftj.patch_spec({"suspend": True})
    env.wait_for(lambda: cluster.job(job_name)["spec"].get("suspend"), what="Job suspended")
    cluster.sync_suspend(job_name)
    suspended = ftj.wait_stage("Suspended")
    assert succeeded(suspended) == ("Unknown", "Suspended")
    assert suspended["observedGeneration"] == 2
    assert cluster.pods(job_name) == [], "the Job controller deleted the running pod"

    ftj.patch_spec({"suspend": False})
    env.wait_for(lambda: not cluster.job(job_name)["spec"]["suspend"], what="Job resumed")
    resumed = cluster.sync_suspend(job_name)
    assert resumed is not None
    cluster.run_pod(resumed)
    endpoint.report("SFT", step=6, total_steps=20, loss=1.3)
    running = ftj.wait(lambda s: s["stage"] == "Training" and s["progress"]["step"] == 6, "step 6")
    assert running["observedGeneration"] == 3
    assert len(cluster.jobs(ftj.name)) == 1, "suspending keeps the Job"

    def stage_events() -> list[str] | None:
        found = [m for _, _, m in ftj.events() if m.startswith("Stage")]
        return found if found[-1].endswith("→ Training") else None

    stages = env.wait_for(stage_events, what="the Event of the resumed training")
    assert "Stage Training → Suspended" in stages
    assert stages[-1] in ("Stage Suspended → Training", "Stage Pending → Training")


def test_kueue_owns_the_jobs_suspend_field(
    env: KubeEnv, namespace: str, cluster: Cluster, endpoint: TrainerEndpoint
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "queued")
    ftj.create(queueName="team-a")
    created = cluster.wait_job(ftj.name)
    job_name = created["metadata"]["name"]
    assert created["spec"]["suspend"] is True, "created suspended: Kueue admits it"
    assert created["metadata"]["labels"][names.LABEL_KUEUE_QUEUE] == "team-a"
    queued = ftj.wait(lambda s: succeeded(s) == ("Unknown", "Queued"), "Queued")
    assert queued["stage"] == "Pending"
    message = condition(queued, "Succeeded")["message"]
    assert message == "waiting for Kueue admission in queue team-a"

    before = env.request_counts().get(("patch", "jobs.batch"), 0)
    env.patch("batch/v1", "Job", job_name, {"spec": {"suspend": False}}, namespace)  # admitted
    cluster.run_pod(cluster.create_pod(job_name))
    endpoint.report("SFT", step=2, total_steps=20, loss=1.9)
    ftj.wait(lambda s: s["stage"] == "Training", "Training")
    time.sleep(1.5)  # a status poll or two: the operator must leave the Job's suspend alone
    admitted = cluster.job(job_name)
    assert admitted["spec"]["suspend"] is False
    assert admitted["metadata"]["generation"] == 2, "only Kueue changed the Job's spec"
    assert env.request_counts().get(("patch", "jobs.batch"), 0) - before == 1

    # spec.suspend with Kueue: the Job is deleted (checkpoints stay), not suspended.
    ftj.patch_spec({"suspend": True})
    env.wait_for(lambda: cluster.jobs(ftj.name) == [], what="the Job to be deleted")
    suspended = ftj.wait_stage("Suspended")
    assert succeeded(suspended) == ("Unknown", "Suspended")
    kind, _, message = ftj.wait_event("RunStopped")
    assert kind == "Normal"
    assert message.startswith(f"Deleting Job {job_name}: suspended while queued in team-a")
    assert env.request_counts().get(("patch", "jobs.batch"), 0) - before == 1

    ftj.patch_spec({"suspend": False})
    again = cluster.wait_job(ftj.name)
    assert again["metadata"]["name"] == job_name, "the same run: it resumes from checkpoints"
    assert again["spec"]["suspend"] is True
    ftj.wait(lambda s: succeeded(s) == ("Unknown", "Queued"), "Queued again")


def test_training_edit_after_success_starts_a_new_run_and_tolerations_do_not(
    env: KubeEnv, namespace: str, cluster: Cluster
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "gitops")
    ftj.create()
    first_job = cluster.wait_job(ftj.name)
    first_run = first_job["metadata"]["labels"][names.LABEL_RUN_ID]
    pod = cluster.start_pod(first_job["metadata"]["name"])
    first_uri = f"pvc://kubetune-artifacts/runs/{namespace}/{ftj.name}/{first_run}"
    cluster.finish_pod(pod, success(first_uri), exit_code=0)
    ftj.wait_stage("Succeeded")

    ftj.patch_spec({"training": {"maxSteps": 40}})
    second_job = cluster.wait_job(ftj.name, count=2)
    second_run = second_job["metadata"]["labels"][names.LABEL_RUN_ID]
    assert second_run != first_run
    assert env.get("v1", "ConfigMap", f"{ftj.name}-{second_run}-config", namespace) is not None
    pending = ftj.wait(lambda s: s.get("runId") == second_run, "the new run in the status")
    assert pending["stage"] == "Pending"
    assert pending["observedGeneration"] == 2
    runs = [(r["runId"], r["state"]) for r in pending["runs"]]
    assert runs == [(second_run, "Running"), (first_run, "Succeeded")]
    assert pending["runs"][1]["runUri"] == first_uri

    ftj.patch_spec(
        {
            "resources": {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ]
            }
        }
    )
    edited = ftj.wait(lambda s: s["observedGeneration"] == 3, "generation 3 observed")
    time.sleep(1.5)  # a status poll or two
    assert [j["metadata"]["name"] for j in cluster.jobs(ftj.name)] == [
        first_job["metadata"]["name"],
        second_job["metadata"]["name"],
    ], "tolerations do not retrain"
    assert edited["runId"] == second_run
    assert len(ftj.status()["runs"]) == 2


def test_training_edit_while_running_replaces_the_run(
    env: KubeEnv, namespace: str, cluster: Cluster
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "moving-target")
    ftj.create()
    first_job = cluster.wait_job(ftj.name)
    first_name = first_job["metadata"]["name"]
    first_run = first_job["metadata"]["labels"][names.LABEL_RUN_ID]
    cluster.start_pod(first_name)
    ftj.wait_stage("Preparing")

    ftj.patch_spec({"training": {"learningRate": "1e-4"}})
    second_job = env.wait_for(
        lambda: next(
            (j for j in cluster.jobs(ftj.name) if j["metadata"]["name"] != first_name), None
        ),
        what="the Job of the new run",
    )
    assert env.get("batch/v1", "Job", first_name, namespace) is None, "the old run is stopped"
    second_run = second_job["metadata"]["labels"][names.LABEL_RUN_ID]
    kind, _, message = ftj.wait_event("RunStopped")
    assert kind == "Normal"
    assert message.startswith(f"Stopping Job {first_name} of run {first_run}")
    status = ftj.wait(lambda s: s.get("runId") == second_run, "the new run in the status")
    runs = [(r["runId"], r["state"]) for r in status["runs"]]
    assert runs == [(second_run, "Running"), (first_run, "Superseded")]


def s3_output(secret: str, **extra: Any) -> dict[str, Any]:
    return {"uri": "s3://models/runs", "credentialsSecretRef": {"name": secret}, **extra}


def secret(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    }


AWS_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example"}


def test_missing_secret_waits_with_backoff_until_it_exists(
    env: KubeEnv, namespace: str, cluster: Cluster
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "needs-creds")
    reads_before = env.request_counts().get(("get", "secrets"), 0)
    ftj.create(output=s3_output("s3-creds"))
    waiting = ftj.wait(lambda s: succeeded(s)[1] == "SecretNotFound", "SecretNotFound")
    assert waiting["stage"] == "Pending"
    assert succeeded(waiting) == ("Unknown", "SecretNotFound")
    assert condition(waiting, "Succeeded")["message"] == (
        f"spec.output.credentialsSecretRef: Secret 's3-creds' does not exist in namespace "
        f"{namespace}; create it with the keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (e.g. "
        "kubectl create secret generic s3-creds --from-env-file=FILE) and the job starts"
    )

    time.sleep(2.5)
    reads = env.request_counts().get(("get", "secrets"), 0) - reads_before
    assert 2 <= reads <= 4, f"{reads} Secret reads in 2.5 s: retried with backoff, no hot loop"
    assert cluster.jobs(ftj.name) == []
    assert env.list("v1", "ConfigMap", namespace) == [], "nothing is created before"
    assert [r for _, r, _ in ftj.events()] == ["Pending"]

    env.create(secret("s3-creds", namespace, **AWS_KEYS))
    created = cluster.wait_job(ftj.name, timeout=10)
    container = created["spec"]["template"]["spec"]["containers"][0]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs["AWS_ACCESS_KEY_ID"] == refs["AWS_SECRET_ACCESS_KEY"] == "s3-creds"
    started = ftj.wait(lambda s: succeeded(s)[1] == "Pending", "the Job to be waited on")
    assert "Waiting for the pod" in condition(started, "Succeeded")["message"]


def test_a_quota_refusal_waits_with_backoff_then_the_job_starts(
    env: KubeEnv, namespace: str, cluster: Cluster
) -> None:
    assert env.fake is not None
    refusal = (
        'jobs.batch "quota-job" is forbidden: exceeded quota: team-gpus, requested: '
        "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: "
        "requests.nvidia.com/gpu=8"
    )
    env.fake.inject_error("create", "jobs.batch", status=403, message=refusal, times=2)
    ftj = FineTuneJobHandle(env, namespace, "quota-job")
    ftj.create()
    waiting = ftj.wait(lambda s: succeeded(s)[1] == "QuotaExceeded", "QuotaExceeded")
    assert waiting["stage"] == "Pending"
    message = condition(waiting, "Succeeded")["message"]
    assert message.startswith("the namespace's ResourceQuota refuses Job quota-job-")
    assert "exceeded quota: team-gpus" in message
    assert "raise the quota" in message
    # Retried with backoff (1 s, then 2 s): the third attempt creates the Job.
    cluster.wait_job(ftj.name, timeout=10)
    started = ftj.wait(lambda s: succeeded(s)[1] == "Pending", "the Job to be waited on")
    assert "Waiting for the pod" in condition(started, "Succeeded")["message"]
    assert len(cluster.jobs(ftj.name)) == 1


def test_restart_between_the_writes_and_while_the_job_runs(
    env: KubeEnv,
    namespace: str,
    operator: RunningOperator,
    cluster: Cluster,
    endpoint: TrainerEndpoint,
) -> None:
    operator.stop()
    ftj = FineTuneJobHandle(env, namespace, "restarted")
    body = ftj.create()
    # What the operator wrote before it died: the ConfigMap, not yet the Job.
    model = FineTuneJob.model_validate(body)
    run_id = run_id_for(model.spec)
    settings = OperatorSettings(status_poll_interval_seconds=1)
    env.create(build_children(model, settings, run_id).config_map)
    before = env.request_counts()

    operator.start()
    trainer_job = cluster.wait_job(ftj.name)
    job_name = trainer_job["metadata"]["name"]
    ftj.wait_stage("Pending")
    pod = cluster.start_pod(job_name)
    endpoint.report("SFT", step=5, total_steps=20, loss=1.4)
    ftj.wait(lambda s: (s.get("progress") or {}).get("step") == 5, "progress at step 5")
    created = delta(env, before)
    assert created[("create", "jobs.batch")] == 1
    assert created[("create", "configmaps")] == 1, "one attempt, answered 409 AlreadyExists"

    operator.stop()
    endpoint.report("SFT", step=9, total_steps=20, loss=1.2)
    before = env.request_counts()
    operator.start()
    ftj.wait(lambda s: s["progress"]["step"] == 9, "progress at step 9 after the restart")
    run_uri = f"pvc://kubetune-artifacts/runs/{namespace}/{ftj.name}/{run_id}"
    cluster.finish_pod(pod, success(run_uri), exit_code=0)
    done = ftj.wait_stage("Succeeded")
    assert done["runs"][0]["state"] == "Succeeded"
    after_restart = delta(env, before)
    assert after_restart.get(("create", "jobs.batch"), 0) == 0, "no second Job"
    assert after_restart.get(("create", "configmaps"), 0) == 0
    assert [j["metadata"]["name"] for j in cluster.jobs(ftj.name)] == [job_name]
    assert len(env.list("v1", "ConfigMap", namespace)) == 1
    assert len(cluster.pods(job_name)) == 1
    ftj.wait_event("Succeeded", "Succeeded is True")
    stages = [m for _, _, m in ftj.events() if m.startswith("Stage")]
    assert stages.count("Stage Pending") == 1, "a restart repeats no Event"


def test_delete_with_retain_leaves_the_artifacts(
    env: KubeEnv, namespace: str, cluster: Cluster
) -> None:
    ftj = FineTuneJobHandle(env, namespace, "retained")
    ftj.create()
    job_name = cluster.wait_job(ftj.name)["metadata"]["name"]
    cluster.start_pod(job_name)
    ftj.wait_stage("Preparing")
    assert not (ftj.get() or {})["metadata"].get("finalizers"), "Retain needs no finalizer"

    before = env.request_counts()
    env.delete(FTJ_API, FTJ, ftj.name, namespace)
    env.wait_for(lambda: ftj.get() is None, what="the FineTuneJob to go")
    # Garbage collection: everything the FineTuneJob (or its Job) owned goes with it.
    env.wait_for(
        lambda: (
            not env.list("v1", "Pod", namespace)
            and not env.list("batch/v1", "Job", namespace)
            and not env.list("v1", "ConfigMap", namespace)
        ),
        what="the children to be collected",
    )
    time.sleep(0.5)
    assert delta(env, before).get(("create", "pods"), 0) == 0, "no cleanup pod"
    assert env.get("v1", "Pod", names.cleanup_pod_name(ftj.name), namespace) is None
    assert "DeletingArtifacts" not in {r for _, r, _ in ftj.events()}


def test_delete_with_delete_policy_runs_the_cleanup_pod(
    env: KubeEnv, namespace: str, cluster: Cluster
) -> None:
    env.create(secret("s3-creds", namespace, **AWS_KEYS))
    env.create(secret("hf-token", namespace, HF_TOKEN="hf_example"))
    ftj = FineTuneJobHandle(env, namespace, "ephemeral")
    ftj.create(
        dataset={"uri": "hf://acme/support-chats", "credentialsSecretRef": {"name": "hf-token"}},
        output=s3_output(
            "s3-creds", endpoint="http://minio:9000", region="eu-west-1", deletePolicy="Delete"
        ),
    )
    env.wait_for(
        lambda: "kubetune.io/artifacts" in ((ftj.get() or {})["metadata"].get("finalizers") or []),
        what="the artifacts finalizer",
    )
    job_name = cluster.wait_job(ftj.name)["metadata"]["name"]
    trainer_env = cluster.job(job_name)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "HF_TOKEN" in {e["name"] for e in trainer_env}
    cluster.start_pod(job_name)
    ftj.wait_stage("Preparing")

    deleting = env.delete(FTJ_API, FTJ, ftj.name, namespace)
    assert deleting is not None
    assert deleting["metadata"]["deletionTimestamp"], "held by the artifacts finalizer"
    cleanup_name = names.cleanup_pod_name(ftj.name)
    cleanup = env.wait_for_object("v1", "Pod", cleanup_name, namespace)
    # The trainer is stopped first: it must not write after the cleanup.
    assert cluster.jobs(ftj.name) == []
    assert [p["metadata"]["name"] for p in env.list("v1", "Pod", namespace)] == [cleanup_name]
    root = f"s3://models/runs/{namespace}/{ftj.name}"
    (container,) = cleanup["spec"]["containers"]
    assert container["command"] == ["python"]
    assert container["args"] == [
        "-m",
        "kubetune.storage.delete",
        root,
        "--endpoint-url",
        "http://minio:9000",
        "--region",
        "eu-west-1",
    ]
    credentials = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert set(credentials.values()) == {"s3-creds"}, "the output's credentials only"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(credentials)
    assert "HF_TOKEN" not in credentials
    assert cleanup["metadata"]["labels"][names.LABEL_COMPONENT] == "cleanup"
    assert ftj.wait_event("DeletingArtifacts")[2] == f"Deleting the artifacts under {root}"

    cluster.set_pod_phase(cleanup_name, "Failed")
    kind, _, message = ftj.wait_event("ArtifactCleanupFailed")
    assert kind == "Warning"
    assert message.startswith(f"Pod {cleanup_name} could not delete the artifacts (attempt 1)")
    assert "remove the finalizer kubetune.io/artifacts" in message
    retried = env.wait_for_object(
        "v1",
        "Pod",
        cleanup_name,
        namespace,
        lambda p: p["metadata"]["uid"] != cleanup["metadata"]["uid"],
    )
    assert ftj.get() is not None, "held until the artifacts are gone"

    cluster.set_pod_phase(retried["metadata"]["name"], "Succeeded")
    env.wait_for(lambda: ftj.get() is None, what="the finalizer to be released")
    env.wait_for(
        lambda: not env.list("v1", "Pod", namespace) and not env.list("v1", "ConfigMap", namespace),
        what="the ConfigMap and the cleanup pod to be collected",
    )


def test_requests_per_created_job(env: KubeEnv, namespace: str) -> None:
    """A new FineTuneJob costs the operator a handful of requests: the ConfigMap and Job
    creates, one status patch and the Pending Event; no reads (the watch cache serves)."""
    assert env.fake is not None
    fake, count = env.fake, 3
    before = env.request_counts()
    for index in range(count):
        env.create(manifest(f"counted-{index}", namespace))
    # Wait without requests through the router, so that only the operator's are counted.
    env.wait_for(
        lambda: len(fake.objects("events", namespace)) >= count, what="the operator's Events"
    )
    time.sleep(1.5)  # the follow-up reconciles (Job created, status written, a poll)
    counts = delta(env, before)
    ours = {("create", "finetunejobs.kubetune.io"): count}
    operator_requests = {
        key: value - ours.get(key, 0)
        for key, value in counts.items()
        if key[0] != "watch" and value - ours.get(key, 0)
    }
    assert operator_requests == {
        ("create", "configmaps"): count,
        ("create", "jobs.batch"): count,
        ("patch", "finetunejobs.kubetune.io/status"): count,
        ("create", "events"): count,
    }
    assert sum(operator_requests.values()) <= 6 * count


def test_how_the_pod_was_sized_is_an_event(env: KubeEnv, namespace: str, cluster: Cluster) -> None:
    """A sizing note (here: `resources.gpus: Auto` with no GPU classes in the settings)
    reaches the user as a Normal Event when the Job is created."""
    ftj = FineTuneJobHandle(env, namespace, "sized")
    ftj.create(resources={"gpus": "Auto"})
    cluster.wait_job(ftj.name)
    _, reason, message = ftj.wait_event("Sized", "resources.gpus Auto")
    assert reason == "Sized"
    assert message.startswith(
        "resources.gpus Auto: the operator settings declare no GPU classes, so the GPU memory "
        "is unknown; the pod gets 1 GPU"
    )
