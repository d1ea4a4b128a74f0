"""The real operator against the local Kubernetes API, serving what FineTuneJobs made.

One operator runs for the whole module (`operator_runner.operator_fixture`); each test has
its own namespace. FineTuneJobs run for real through the operator (simulate.py plays the
Job controller and the trainer's exit), so `status.runs` and `status.artifacts` are the
operator's own; simulate_serving.py plays the Deployment controller and the kubelet of the
serving pods. The tests check what a user sees: the Deployment, Service and
PodDisruptionBudget, the ModelDeployment's status and Events, and which writes happen.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_runner import RunningOperator, operator_fixture
from simulate import Cluster
from simulate_serving import ServingCluster

from kubetune.api.contract import Reason, TrainerResult
from kubetune.operator import names
from kubetune.operator.metrics import METRICS
from support.kubeenv import KubeEnv

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).parents[3]
API = "kubetune.io/v1alpha1"
FTJ = "FineTuneJob"
MD = "ModelDeployment"
BASE_MODEL = "builtin://smollm2-135m-instruct"  # what examples/finetunejob-smoke.yaml tunes
L4 = {"nvidia.com/gpu.product": "NVIDIA-L4"}
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
SECRET = "s3-creds"
DIGEST = "kubetune.io/artifact-digest"

operator = operator_fixture(
    {
        "statusPollIntervalSeconds": 1,
        "metricsPort": 0,
        "gpuClasses": [
            {"name": "l4-24gb", "memoryGiB": 24, "nodeSelector": L4, "gpusPerNode": 4},
            {"name": "h100-80gb", "memoryGiB": 80, "nodeSelector": H100},
        ],
    }
)


# ------------------------------------------------------------------------------ helpers


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in (a JSON merge patch: None removes a key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def example(name: str, namespace: str, file: str, spec: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / file).read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"] = merge(body["spec"], spec)
    return body


def finetunejob(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """examples/finetunejob-smoke.yaml (LoRA, merged export) writing to S3."""
    output = {"uri": "s3://models/runs", "credentialsSecretRef": {"name": SECRET}}
    return example(name, namespace, "finetunejob-smoke.yaml", {"output": output, **spec})


def merged_deployment(name: str, namespace: str, job: str, **spec: Any) -> dict[str, Any]:
    """examples/modeldeployment-merged.yaml serving the Merged variant of `job` with one
    fixed replica on an emptyDir model cache."""
    changes = {
        "model": {"fineTuneJobRef": {"name": job}, "variant": "Merged"},
        "autoscaling": None,
        "modelCache": None,
        "credentialsSecretRef": {"name": SECRET},
        **spec,
    }
    return example(name, namespace, "modeldeployment-merged.yaml", changes)


def adapters_deployment(name: str, namespace: str, jobs: list[str]) -> dict[str, Any]:
    """examples/modeldeployment-multilora.yaml: one adapter per FineTuneJob (named after
    it) on the base model the jobs tuned."""
    body = example(
        name,
        namespace,
        "modeldeployment-multilora.yaml",
        {"baseModel": {"uri": BASE_MODEL, "revision": None, "credentialsSecretRef": None}},
    )
    body["spec"]["adapters"] = adapter_entries(jobs)
    body["spec"]["credentialsSecretRef"] = {"name": SECRET}
    return body


def adapter_entries(jobs: list[str]) -> list[dict[str, Any]]:
    return [{"name": job, "fineTuneJobRef": {"name": job}} for job in jobs]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def ready(status: dict[str, Any]) -> tuple[str, str]:
    """(status, reason) of the Ready condition."""
    found = condition(status, "Ready")
    return found["status"], found["reason"]


def template(deployment: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = deployment["spec"]["template"]
    return found


def pinned(deployment: dict[str, Any]) -> str:
    """The artifact digest pinned in the pod template."""
    return str(template(deployment)["metadata"]["annotations"][DIGEST])


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = template(deployment)["spec"]
    found: dict[str, Any] = next(
        c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name
    )
    return found


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values after `flag`, up to the next flag."""
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def delta(env: KubeEnv, before: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """Requests at the API since `before` (`env.request_counts()`), by (verb, resource)."""
    now = env.request_counts()
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


def reconciles() -> float:
    """ModelDeployment reconciles the operator (in this process) has finished."""
    value = METRICS.registry.get_sample_value(
        "kubetune_operator_reconciles_total", {"kind": MD, "result": "ok"}
    )
    return value or 0.0


def settled(env: KubeEnv, since: float, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Wait until a ModelDeployment reconcile finished after the count `since`, and no
    other one for `quiet` seconds: the operator has acted on what the test just did."""
    env.wait_for(lambda: reconciles() > since, timeout, what="a ModelDeployment reconcile")
    last, stable_since = reconciles(), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() - stable_since < quiet:
        assert time.monotonic() < deadline, "the ModelDeployment reconciles never settled"
        time.sleep(0.05)
        if reconciles() != last:
            last, stable_since = reconciles(), time.monotonic()


class ModelDeploymentHandle:
    """One ModelDeployment of a test: its status and Events, read through the API."""

    def __init__(self, env: KubeEnv, namespace: str, name: str) -> None:
        self.env, self.namespace, self.name = env, namespace, name

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.env.create(body)

    def get(self) -> dict[str, Any] | None:
        return self.env.get(API, MD, self.name, self.namespace)

    def patch(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self.env.patch(API, MD, self.name, changes, self.namespace)

    def status(self) -> dict[str, Any]:
        body = self.get()
        assert body is not None
        status: dict[str, Any] = body.get("status") or {}
        return status

    def wait(
        self, check: Callable[[dict[str, Any]], object], what: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The status, once `check(status)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.get("conditions") and check(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} on ModelDeployment "
                    f"{self.namespace}/{self.name}; its status:\n{yaml.safe_dump(status)}"
                )
            time.sleep(0.05)

    def wait_ready(self, state: str, reason: str, message: str = "") -> dict[str, Any]:
        """The status once Ready has this status and reason, and a message starting with
        `message`."""
        return self.wait(
            lambda s: (
                ready(s) == (state, reason) and condition(s, "Ready")["message"].startswith(message)
            ),
            f"Ready {state} {reason} {message!r}",
        )

    def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events on this ModelDeployment, oldest first."""
        found = [
            e
            for e in self.env.list("v1", "Event", self.namespace)
            if e["involvedObject"]["name"] == self.name and e["involvedObject"]["kind"] == MD
        ]
        found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [(e["type"], e["reason"], e["message"]) for e in found]

    def reasons(self) -> list[str]:
        """The reasons of the Events, oldest first; each is a transition of Ready, so no
        reason follows itself."""
        reasons = [reason for _, reason, _ in self.events()]
        repeated = [a for a, b in pairwise(reasons) if a == b]
        assert not repeated, f"Events repeated for one transition: {self.events()}"
        return reasons

    def wait_event(self, reason: str) -> tuple[str, str, str]:
        """The latest Event with this reason (Events follow the status they tell of)."""
        return self.env.wait_for(
            lambda: next((e for e in reversed(self.events()) if e[1] == reason), None),
            what=f"an Event {reason} on {self.name}; seen: {self.events()}",
        )


@dataclass(frozen=True)
class Run:
    """A finished run of a FineTuneJob, as the trainer reported it."""

    run_id: str
    uri: str
    digest: str


class Trainer:
    """Runs FineTuneJobs to their end: the operator makes the Job, `simulate.Cluster`
    plays the Job controller and the trainer's exit, and the operator writes the run into
    the FineTuneJob's status (`runs`, `artifacts`) itself."""

    def __init__(self, env: KubeEnv, namespace: str) -> None:
        self.env, self.namespace = env, namespace
        self.cluster = Cluster(env, namespace)

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        return self.env.create(finetunejob(name, self.namespace, **spec))

    def status(self, name: str) -> dict[str, Any]:
        body = self.env.get(API, FTJ, name, self.namespace)
        assert body is not None, f"FineTuneJob {name} does not exist"
        status: dict[str, Any] = body.get("status") or {}
        return status

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.env.patch(API, FTJ, name, {"spec": spec}, self.namespace)

    def job(self, name: str, runs: int = 1) -> tuple[str, str]:
        """(Job name, run id) of the `runs`-th run, once the operator created its Job."""
        job = self.cluster.wait_job(name, count=runs)
        return job["metadata"]["name"], job["metadata"]["labels"][names.LABEL_RUN_ID]

    def finish(self, name: str, runs: int = 1, gate_passed: bool = True) -> Run:
        """The `runs`-th run of FineTuneJob `name` publishes (its gate passed or failed);
        returns once the operator recorded it."""
        job_name, run_id = self.job(name, runs)
        uri = f"s3://models/runs/{self.namespace}/{name}/{run_id}"
        digest = "sha256:" + hashlib.sha256(uri.encode()).hexdigest()
        reason = Reason.SUCCEEDED if gate_passed else Reason.EVALUATION_GATE_FAILED
        result = TrainerResult(
            reason=reason,
            message="Published" if gate_passed else "Perplexity 9.7 > 8",
            run_uri=uri,
            manifest_digest=digest,
            gate_passed=gate_passed,
            metrics={"Perplexity": "7.5" if gate_passed else "9.7"},
            step=20,
        )
        pod = self.cluster.start_pod(job_name)
        # The trainer exits 0 when the pipeline ran to its end, gate passed or not.
        assert self.cluster.finish_pod(pod, result, exit_code=0) is None
        state = "Succeeded" if gate_passed else "Failed"
        self.env.wait_for(
            lambda: any(
                r["runId"] == run_id and r["state"] == state and r.get("manifestDigest") == digest
                for r in self.status(name).get("runs") or []
            ),
            what=f"run {run_id} of FineTuneJob {name} recorded as {state}",
        )
        return Run(run_id, uri, digest)


@pytest.fixture
def env(kube_env: KubeEnv, operator: RunningOperator, namespace: str) -> Iterator[KubeEnv]:
    """The local API with the operator running and the S3 Secret in the namespace; the
    test's ModelDeployments and FineTuneJobs are deleted afterwards."""
    operator.start()
    kube_env.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": namespace},
            "stringData": {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "x"},
        }
    )
    yield kube_env
    for kind in (MD, FTJ):
        for body in kube_env.list(API, kind, namespace):
            kube_env.delete(API, kind, body["metadata"]["name"], namespace)


@pytest.fixture
def trainer(env: KubeEnv, namespace: str) -> Trainer:
    return Trainer(env, namespace)


@pytest.fixture
def serving(env: KubeEnv, namespace: str) -> ServingCluster:
    return ServingCluster(env, namespace)


def serve(serving: ServingCluster, md: ModelDeploymentHandle) -> dict[str, Any]:
    """Play the rollout of the Deployment's current template to one ready replica; the
    pod."""
    serving.rolling_out(md.name)
    pod = serving.serving(serving.create_pod(md.name))
    serving.report(md.name, ready=1)
    md.wait_ready("True", "Serving")
    env = serving.env
    env.wait_for(lambda: md.reasons()[-1:] == ["Serving"], what=f"the Serving Event of {md.name}")
    return pod


# -------------------------------------------------------------------------------- tests


def test_waits_for_the_run_then_deploys_it_pinned(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    trainer.create("support-bot-lora")
    _, run_id = trainer.job("support-bot-lora")
    env.wait_for(
        lambda: (
            [r["state"] for r in trainer.status("support-bot-lora").get("runs") or []]
            == ["Running"]
        ),
        what="the run in the FineTuneJob's status",
    )
    md = ModelDeploymentHandle(env, namespace, "support-bot")
    uid = md.create(merged_deployment(md.name, namespace, "support-bot-lora"))["metadata"]["uid"]

    waiting = md.wait_ready("False", "ArtifactNotReady")
    assert condition(waiting, "Ready")["message"] == (
        "spec.model.fineTuneJobRef: FineTuneJob support-bot-lora has no servable run: run "
        f"{run_id} is still running (stage Pending); the deployment starts when a run succeeds"
    )
    assert condition(waiting, "Available")["status"] == "Unknown", "waiting, not refused"
    assert "endpoint" not in waiting
    assert serving.deployment(md.name) is None
    assert env.get("v1", "Service", md.name, namespace) is None
    assert md.wait_event("ArtifactNotReady")[0] == "Warning"

    run = trainer.finish("support-bot-lora")
    assert run.run_id == run_id
    deployment = serving.wait_deployment(md.name)
    assert pinned(deployment) == run.digest
    fetch = container(deployment, "fetch-model")
    expected = ["fetch", run.uri, "/models/model", "--variant", "Merged"]
    assert fetch["args"] == [*expected, "--expect-digest", run.digest]
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in fetch["env"] if "valueFrom" in e}
    assert secrets == {SECRET}
    vllm = container(deployment, "vllm")
    assert vllm["args"][:3] == ["/models/model", "--served-model-name", md.name]
    assert not any("valueFrom" in e for e in vllm["env"]), "vLLM gets no credentials"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert template(deployment)["spec"]["nodeSelector"] == L4, "the GPU class's labels"
    annotations = deployment["metadata"]["annotations"]
    assert annotations["kubetune.io/run-id"] == run_id
    assert annotations["kubetune.io/run-uri"] == run.uri
    assert annotations["kubetune.io/finetunejob"] == "support-bot-lora"
    assert annotations["kubetune.io/eval-scores"] == '{"Perplexity":"7.5"}'

    service = env.wait_for_object("v1", "Service", md.name, namespace)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]
    budget = env.wait_for_object("policy/v1", "PodDisruptionBudget", md.name, namespace)
    assert budget["spec"]["maxUnavailable"] == 1, "one replica: a drain may take it"
    for child in (deployment, service, budget):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (MD, md.name, uid)
        assert child["metadata"]["labels"][names.LABEL_MANAGED_BY] == names.MANAGER

    status = md.wait(lambda s: s.get("artifactDigest") == run.digest, "the digest in the status")
    assert status["endpoint"] == f"http://{md.name}.{namespace}.svc:8000/v1"
    (served,) = status["servedModels"]
    assert (served["name"], served["artifactDigest"]) == (md.name, run.digest)
    assert status["lineage"]["runId"] == run_id
    assert status["lineage"]["runUri"] == run.uri
    assert status["lineage"]["fineTuneJob"] == "support-bot-lora"
    assert status["lineage"]["evalScores"] == {"Perplexity": "7.5"}
    assert ready(status) == ("False", "Deploying"), "no replica is ready yet"
    env.wait_for(lambda: md.reasons() == ["ArtifactNotReady", "Deploying"], what="the Events")
    assert [kind for kind, _, _ in md.events()] == ["Warning", "Normal"]


def test_ready_mirrors_the_deployment_and_never_a_crash_loop(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    trainer.create("bot-lora")
    trainer.finish("bot-lora")
    md = ModelDeploymentHandle(env, namespace, "bot")
    md.create(merged_deployment(md.name, namespace, "bot-lora"))
    serving.wait_deployment(md.name)

    # The Deployment controller has not seen the Deployment yet, then rolls it out.
    md.wait_ready("False", "Deploying", f"Deployment {md.name} is rolling out generation 1")
    serving.rolling_out(md.name)
    md.wait_ready("False", "Deploying", f"Waiting for the pods of Deployment {md.name}")
    pod = serving.create_pod(md.name)
    pod_name = pod["metadata"]["name"]
    pod = serving.fetching(pod)
    fetching = f"Pod {pod_name} is fetching the model (init container fetch-model)"
    md.wait_ready("False", "Deploying", fetching)
    pod = serving.loading(pod)
    md.wait_ready("False", "Deploying", f"Pod {pod_name}: vLLM is loading the model")
    # The pod is ready; Ready follows the Deployment, which has not counted it yet.
    pod = serving.serving(pod)
    md.wait_ready("False", "Deploying", f"Waiting for the pods of Deployment {md.name}")

    serving.report(md.name, ready=1)
    live = md.wait_ready("True", "Serving")
    assert condition(live, "Ready")["message"] == (
        f"Serving {md.name} at http://{md.name}.{namespace}.svc:8000/v1 (1 of 1 replicas ready)"
    )
    assert (live["replicas"], live["readyReplicas"]) == (1, 1)
    available = condition(live, "Available")
    assert (available["status"], available["reason"]) == ("True", "MinimumReplicasAvailable")
    assert md.wait_event("Serving")[0] == "Normal"

    # vLLM dies on every start while the Deployment still counts the replica ready.
    last_words = "ValueError: LoRA rank 64 is greater than max_lora_rank 16"
    serving.crash_loop(pod, last_words, exit_code=1, restarts=4)
    looping = md.wait_ready("False", "CrashLooping")
    assert looping["readyReplicas"] == 1, "the Deployment still reports the replica"
    assert condition(looping, "Ready")["message"] == (
        f"Container vllm of pod {pod_name} is crash-looping (4 restarts); last exit code 1 "
        f"(Error): {last_words}"
    )
    assert md.wait_event("CrashLooping")[0] == "Warning"

    # The controller drops the replica, then briefly counts it ready again (the container
    # answered one probe between two crashes): still not Ready.
    serving.report(md.name, ready=0)
    md.wait(lambda s: s["readyReplicas"] == 0, "no ready replica")
    serving.report(md.name, ready=1)
    again = md.wait(lambda s: s["readyReplicas"] == 1, "the replica counted again")
    assert ready(again) == ("False", "CrashLooping")
    reasons = md.reasons()
    assert reasons[reasons.index("CrashLooping") :] == ["CrashLooping"], "never Ready between"

    serving.serving(pod)  # fixed: it answers again
    md.wait_ready("True", "Serving")
    env.wait_for(
        lambda: md.reasons()[-2:] == ["CrashLooping", "Serving"],
        what=f"the Serving Event after CrashLooping; seen: {md.events()}",
    )
    assert md.reasons() == ["Deploying", "Serving", "CrashLooping", "Serving"]
    assert [kind for kind, _, _ in md.events()] == ["Normal", "Normal", "Warning", "Normal"]


def test_same_artifact_changes_nothing(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    trainer.create("steady-lora")
    run = trainer.finish("steady-lora")
    md = ModelDeploymentHandle(env, namespace, "steady")
    md.create(merged_deployment(md.name, namespace, "steady-lora"))
    serving.wait_deployment(md.name)
    serve(serving, md)
    before_status = md.status()
    events_before = md.events()
    version = serving.wait_deployment(md.name)["metadata"]["resourceVersion"]
    counts = env.request_counts()

    def edit_job() -> None:
        trainer.patch_spec("steady-lora", {"ttlSecondsAfterFinished": 600})
        env.wait_for(
            lambda: trainer.status("steady-lora")["observedGeneration"] == 2,
            what="the FineTuneJob's status to follow its edit",
        )

    triggers: list[tuple[str, Callable[[], object]]] = [
        ("an annotation", lambda: md.patch({"metadata": {"annotations": {"team": "search"}}})),
        ("a label", lambda: md.patch({"metadata": {"labels": {"cost-center": "ml-42"}}})),
        ("the FineTuneJob's status (an edit that does not retrain)", edit_job),
    ]
    for what, trigger in triggers:
        since = reconciles()
        trigger()
        settled(env, since)
        deployment = serving.deployment(md.name)
        assert deployment is not None
        assert deployment["metadata"]["resourceVersion"] == version, f"{what} changed it"
    assert pinned(serving.wait_deployment(md.name)) == run.digest
    requests = delta(env, counts)
    serving_kinds = ("deployments.apps", "services", "poddisruptionbudgets.policy", "events")
    changed = {
        (verb, resource): count
        for (verb, resource), count in requests.items()
        if verb in ("update", "patch", "delete") and resource in serving_kinds
    }
    assert changed == {}, requests
    assert ("patch", "modeldeployments.kubetune.io/status") not in requests
    assert md.status() == before_status
    assert md.events() == events_before, "no transition, no Event"


def test_a_new_run_rolls_out_once(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    trainer.create("evolving-lora")
    first = trainer.finish("evolving-lora")
    md = ModelDeploymentHandle(env, namespace, "evolving")
    md.create(merged_deployment(md.name, namespace, "evolving-lora"))
    serving.wait_deployment(md.name)
    serve(serving, md)
    version = serving.wait_deployment(md.name)["metadata"]["resourceVersion"]
    counts = env.request_counts()

    # A label, then a training-relevant edit that starts a second run: the first run
    # keeps being served, untouched.
    since = reconciles()
    md.patch({"metadata": {"labels": {"cost-center": "ml-42"}}})
    trainer.patch_spec("evolving-lora", {"training": {"maxSteps": 40}})
    _, second_id = trainer.job("evolving-lora", runs=2)
    env.wait_for(
        lambda: trainer.status("evolving-lora")["runs"][0]["runId"] == second_id,
        what="the second run in the FineTuneJob's status",
    )
    settled(env, since)
    unchanged = serving.deployment(md.name)
    assert unchanged is not None
    assert unchanged["metadata"]["resourceVersion"] == version, "a run in training changes nothing"
    serving_first = md.status()
    assert ready(serving_first) == ("True", "Serving")
    assert serving_first["lineage"]["evalScores"] == {"Perplexity": "7.5"}, "the first run's"

    second = trainer.finish("evolving-lora", runs=2)
    assert second.digest != first.digest
    rolled = serving.wait_deployment(md.name, lambda d: pinned(d) == second.digest, "rolled")
    assert rolled["metadata"]["generation"] == 2
    assert flag_values(container(rolled, "fetch-model")["args"], "--expect-digest") == [
        second.digest
    ]
    assert rolled["metadata"]["annotations"]["kubetune.io/run-id"] == second.run_id
    assert template(rolled)["metadata"]["labels"]["cost-center"] == "ml-42", "with the rollout"
    rolling = md.wait(lambda s: s.get("artifactDigest") == second.digest, "the new digest")
    assert rolling["lineage"]["runId"] == second.run_id

    # The old replica serves while the new one starts.
    serving.report(md.name, ready=1, updated=0, replicas=2)
    rollout = f"(1 of 1 replicas ready); rolling out {second.digest} (0 of 1 updated)"
    during = md.wait(lambda s: condition(s, "Ready")["message"].endswith(rollout), rollout)
    assert ready(during) == ("True", "Serving")
    serving.serving(serving.create_pod(md.name))
    serving.report(md.name, ready=1)
    md.wait(lambda s: "rolling out" not in condition(s, "Ready")["message"], "rolled out")
    writes = delta(env, counts)
    assert writes.get(("update", "deployments.apps")) == 1, writes
    assert writes.get(("create", "deployments.apps"), 0) == 0
    assert writes.get(("patch", "deployments.apps"), 0) == 0


def test_failed_gate_is_refused_unless_not_required(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    rule = {"metric": "Perplexity", "operator": "<=", "value": "8"}
    gate = {"metrics": ["Perplexity"], "gate": [rule]}
    trainer.create("gated-lora", evaluation=gate)
    run = trainer.finish("gated-lora", gate_passed=False)
    md = ModelDeploymentHandle(env, namespace, "gated")
    md.create(merged_deployment(md.name, namespace, "gated-lora"))

    refused = md.wait_ready("False", "EvaluationGateFailed")
    assert condition(refused, "Ready")["message"] == (
        f"spec.model.fineTuneJobRef: run {run.run_id} of FineTuneJob gated-lora failed its "
        "evaluation gate and no earlier run passed: improve the job (see its GatePassed "
        "condition), or set spec.requireGate: false to serve it anyway"
    )
    available = condition(refused, "Available")
    assert (available["status"], available["reason"]) == ("False", "EvaluationGateFailed")
    kind, _, message = md.wait_event("EvaluationGateFailed")
    assert kind == "Warning"
    assert "spec.requireGate: false" in message
    assert serving.deployment(md.name) is None
    assert env.get("v1", "Service", md.name, namespace) is None

    md.patch({"spec": {"requireGate": False}})
    deployment = serving.wait_deployment(md.name)
    assert pinned(deployment) == run.digest
    status = md.wait(lambda s: s.get("artifactDigest") == run.digest, "the gated run deployed")
    assert ready(status) == ("False", "Deploying")
    assert status["lineage"]["runId"] == run.run_id


def test_adapters_on_one_base_model(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    runs = {}
    for job in ("support", "sql", "billing"):
        trainer.create(job)
        runs[job] = trainer.finish(job)
    trainer.create("dora", lora={"useDoRA": True})
    dora = trainer.finish("dora")
    md = ModelDeploymentHandle(env, namespace, "team-adapters")
    md.create(adapters_deployment(md.name, namespace, ["support", "sql"]))

    deployment = serving.wait_deployment(md.name)
    args = container(deployment, "vllm")["args"]
    assert args[:3] == ["/models/base", "--served-model-name", md.name]
    assert "--enable-lora" in args
    assert flag_values(args, "--lora-modules") == [
        "support=/models/adapters/support",
        "sql=/models/adapters/sql",
    ]
    assert flag_values(args, "--max-lora-rank") == ["32"], "spec.vllm.maxLoraRank"
    assert flag_values(args, "--max-loras") == ["4"]
    init = [c["name"] for c in template(deployment)["spec"]["initContainers"]]
    assert init == ["fetch-base", "fetch-adapter-0", "fetch-adapter-1"]
    base_fetch = container(deployment, "fetch-base")["args"]
    assert base_fetch == ["fetch", BASE_MODEL, "/models/base", "--model"]
    for index, job in enumerate(("support", "sql")):
        fetch = container(deployment, f"fetch-adapter-{index}")["args"]
        assert fetch[1] == runs[job].uri
        assert flag_values(fetch, "--expect-digest") == [runs[job].digest]
    assert template(deployment)["spec"]["nodeSelector"] == H100
    budget = env.wait_for_object("policy/v1", "PodDisruptionBudget", md.name, namespace)
    assert budget["spec"]["minAvailable"] == 1, "two replicas: a drain keeps one"
    status = md.wait(lambda s: len(s.get("servedModels") or []) == 3, "three served names")
    served = {m["name"]: m.get("artifactDigest") for m in status["servedModels"]}
    assert served == {
        md.name: None,
        "support": runs["support"].digest,
        "sql": runs["sql"].digest,
    }

    # A third adapter rolls out.
    md.patch({"spec": {"adapters": adapter_entries(["support", "sql", "billing"])}})
    three = serving.wait_deployment(md.name, lambda d: pinned(d) != pinned(deployment), "rolled")
    assert flag_values(container(three, "vllm")["args"], "--lora-modules")[-1] == (
        "billing=/models/adapters/billing"
    )
    serving.rolling_out(md.name, replicas=2)
    serving.report(md.name, ready=2)
    md.wait_ready("True", "Serving")
    version = serving.wait_deployment(md.name)["metadata"]["resourceVersion"]

    # A DoRA adapter is refused by name; what runs keeps running.
    md.patch({"spec": {"adapters": adapter_entries(["support", "sql", "billing", "dora"])}})
    refused = md.wait_ready("False", "AdapterIncompatible")
    message = condition(refused, "Ready")["message"]
    assert message.startswith(
        f"spec.adapters[3].fineTuneJobRef: the adapter of run {dora.run_id} uses DoRA (useDoRA)"
    )
    assert message.endswith("The Deployment keeps serving what it served before")
    assert refused["artifactDigest"] == pinned(three)
    assert [m["name"] for m in refused["servedModels"]] == [md.name, "support", "sql", "billing"]
    assert md.wait_event("AdapterIncompatible")[0] == "Warning"
    kept = serving.deployment(md.name)
    assert kept is not None
    assert kept["metadata"]["resourceVersion"] == version


def test_deleting_collects_the_children(
    env: KubeEnv, namespace: str, trainer: Trainer, serving: ServingCluster
) -> None:
    trainer.create("gone-lora")
    trainer.finish("gone-lora")
    md = ModelDeploymentHandle(env, namespace, "gone")
    md.create(merged_deployment(md.name, namespace, "gone-lora"))
    serving.wait_deployment(md.name)
    env.wait_for_object("policy/v1", "PodDisruptionBudget", md.name, namespace)
    serve(serving, md)

    since = reconciles()
    env.delete(API, MD, md.name, namespace)
    env.wait_for(lambda: md.get() is None, what="the ModelDeployment to go")
    for api_version, kind in (
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
    ):
        env.wait_for_absent(api_version, kind, md.name, namespace)
    env.wait_for(
        lambda: not env.list("v1", "Pod", namespace, names.LABEL_MODELDEPLOYMENT),
        what="the serving pods to go",
    )
    settled(env, since)
    assert serving.deployment(md.name) is None, "nothing re-created"
