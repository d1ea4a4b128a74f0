"""FineTuneJob lifecycles driven one cluster write at a time, and what they end in.

A fault test runs a lifecycle twice, uninterrupted and with something going wrong (the
operator killed, a write refused, watches dropped), and compares how the two end. The
drivers play the kubelet, the Job controller and the trainer (`simulate.py`) and after each
step wait for the status that step leads to, never for a fixed time or a request: the
operator may have died and restarted in between, and a level-based operator gets there
anyway. Each step changes one thing the status shows, so an uninterrupted run makes its
writes in one fixed order and "the operator's k-th write" names the same moment in every
run.

    run = Run(kube_env, namespace, endpoint)
    LIFECYCLES["success"](run)        # create → Job → running → progress → Succeeded
    outcome = Outcome.of(run, "kubetune-operator")   # status, Events, children, writes
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftj_handle import FTJ, FTJ_API, FineTuneJobHandle, success
from operator_process import applied
from simulate import Cluster, TrainerEndpoint

from kubetune.api.contract import Reason, TrainerResult, exit_code_for
from kubetune.operator import names
from support.kubeenv import KubeEnv

Obj = dict[str, Any]

NAME = "crashy"
TIMEOUT = 30.0
"""Seconds a step may take: a crash and restart fit in it many times over."""
TIMESTAMPS = frozenset(
    {"lastTransitionTime", "lastProbeTime", "startTime", "completionTime", "updateTime"}
)
"""Status keys that legitimately differ between two runs of one lifecycle."""
CHILD_KINDS = (("v1", "ConfigMap"), ("v1", "Service"), ("batch/v1", "Job"))
"""What the operator creates for a FineTuneJob (a Service only for multi-node jobs)."""

NCCL_TIMEOUT = TrainerResult(
    reason=Reason.INFRASTRUCTURE_ERROR, message="NCCL timeout on rank 0", step=8
)
BAD_ROW = TrainerResult(
    reason=Reason.DATASET_INVALID,
    message="data/train.jsonl line 7: 'messages' is missing; fix the row or set "
    "dataset.onInvalid: Skip",
    step=0,
)


def summary(status: Mapping[str, Any]) -> str:
    """The Succeeded condition's message ("" before there is one)."""
    found = [c for c in status.get("conditions") or [] if c["type"] == "Succeeded"]
    return str(found[0].get("message") or "") if found else ""


@dataclass
class Run:
    """One FineTuneJob (`name`) in `namespace`, its Job's pods and the trainer's metrics
    endpoint; `diagnostics()` is appended to timeouts (the operator's output)."""

    env: KubeEnv
    namespace: str
    endpoint: TrainerEndpoint
    name: str = NAME
    timeout: float = TIMEOUT
    diagnostics: Callable[[], str] = lambda: ""
    between_steps: Callable[[], None] = lambda: None
    """Called after each step has had its effect (to inject a fault between steps)."""
    ftj: FineTuneJobHandle = field(init=False)
    cluster: Cluster = field(init=False)

    def __post_init__(self) -> None:
        self.ftj = FineTuneJobHandle(self.env, self.namespace, self.name)
        self.cluster = Cluster(self.env, self.namespace, metrics_port=self.endpoint.port)

    def until(self, check: Callable[[dict[str, Any]], object], what: str) -> dict[str, Any]:
        """The status once `check(status)` holds; then `between_steps()`."""
        try:
            status = self.ftj.wait(check, what, self.timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- operator output:\n{self.diagnostics()}") from None
        self.between_steps()
        return status

    def job(self) -> Obj:
        try:
            return self.cluster.wait_job(self.name, timeout=self.timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- operator output:\n{self.diagnostics()}") from None

    def run_uri(self, job: Obj) -> str:
        run_id = job["metadata"]["labels"][names.LABEL_RUN_ID]
        return f"pvc://kubetune-artifacts/runs/{self.namespace}/{self.name}/{run_id}"

    def start_pod(self, job_name: str) -> Obj:
        """The Job's next pod: created, counted by the Job, Running; waits for the
        operator to see each step."""
        pod = self.cluster.add_pod(job_name)
        starting = f"Pod {pod['metadata']['name']} is starting"
        self.until(lambda s: starting in summary(s), "the pod to be seen")
        self.cluster.count_active(job_name)
        self.until(lambda s: s.get("startTime"), "the Job's start time")
        running = self.cluster.run_pod(pod)
        self.until(lambda s: s.get("stage") == "Preparing", "stage Preparing")
        return running

    def created(self) -> Obj:
        """Create the FineTuneJob; its Job once the operator waits for the pod."""
        self.ftj.create()
        job = self.job()
        self.until(
            lambda s: summary(s).startswith("Waiting for the pod"), "the Job to be waited on"
        )
        return job


def succeed(run: Run) -> None:
    """create → Job → pod Running → progress at step 5 → the trainer publishes → the Job
    completes: Succeeded with artifacts."""
    job = run.created()
    job_name = job["metadata"]["name"]
    pod = run.start_pod(job_name)
    run.endpoint.report("SFT", step=5, total_steps=20, loss=1.25, eta_seconds=60)
    run.until(lambda s: (s.get("progress") or {}).get("step") == 5, "progress at step 5")
    ended = run.cluster.terminate_pod(pod, success(run.run_uri(job)), exit_code=0)
    run.until(lambda s: s.get("stage") == "Publishing", "stage Publishing")
    run.cluster.pod_ended(ended)
    run.until(lambda s: s.get("stage") == "Succeeded", "stage Succeeded")


def retry_then_fail(run: Run) -> None:
    """create → Job → pod Running → an infrastructure error (retried by the Job) → the
    replacement pod Running → a dataset error (FailJob): Failed with the trainer's reason."""
    job = run.created()
    job_name = job["metadata"]["name"]
    first = run.start_pod(job_name)
    ended = run.cluster.terminate_pod(
        first, NCCL_TIMEOUT, exit_code_for(Reason.INFRASTRUCTURE_ERROR)
    )
    run.until(lambda s: "after InfrastructureError" in summary(s), "the retry to be announced")
    run.cluster.pod_ended(ended, replace=False)
    run.until(lambda s: "(attempt 2 of 4)" in summary(s), "attempt 2")
    # The Job controller makes a replacement pod after a backoff of 10 s or more, so two pods
    # of a Job never finish in the same second (the resolution of `finishedAt`, by which
    # the latest result is found): start the replacement in the next second at least.
    time.sleep(1.0 - time.time() % 1.0)
    second = run.cluster.add_pod(job_name)
    starting = f"Pod {second['metadata']['name']} is starting"
    run.until(lambda s: starting in summary(s), "the replacement pod to be seen")
    run.cluster.count_active(job_name)
    second = run.cluster.run_pod(second)
    # The data were prepared in the first attempt: the replacement is Training at once.
    running = f"Training run {job['metadata']['labels'][names.LABEL_RUN_ID]} (attempt 2 of 4)"
    run.until(lambda s: summary(s) == running, "attempt 2 running")
    ended = run.cluster.terminate_pod(second, BAD_ROW, exit_code_for(Reason.DATASET_INVALID))
    run.until(lambda s: "DatasetInvalid: " in summary(s), "the dataset error to be seen")
    assert run.cluster.pod_ended(ended) is None, "DatasetInvalid is a FailJob exit code"
    run.until(lambda s: s.get("stage") == "Failed", "stage Failed")


LIFECYCLES: dict[str, Callable[[Run], None]] = {
    "success": succeed,
    "retry-then-fail": retry_then_fail,
}


# --------------------------------------------------------------------------- outcomes


def normalize(value: Any, replacements: Mapping[str, str]) -> Any:
    """`value` without TIMESTAMPS keys, with every string's `replacements` applied."""
    if isinstance(value, Mapping):
        return {k: normalize(v, replacements) for k, v in value.items() if k not in TIMESTAMPS}
    if isinstance(value, list):
        return [normalize(v, replacements) for v in value]
    if isinstance(value, str) and replacements:
        pattern = re.compile("|".join(re.escape(k) for k in sorted(replacements, key=len)[::-1]))
        return pattern.sub(lambda m: replacements[m.group(0)], value)
    return value


def write_line(write: Any) -> str:
    """`verb resource` of a recorded write, e.g. `patch finetunejobs.kubetune.io/status`."""
    return f"{write.verb} {write.resource}"


@dataclass(frozen=True)
class Outcome:
    """How a run ended, comparable between runs: pod names, the namespace and the
    FineTuneJob's name in URIs replaced by placeholders, timestamps left out."""

    status: dict[str, Any]
    events: tuple[tuple[str, str, str], ...]
    writes: tuple[str, ...]
    """The operator's applied writes in the namespace, in order (`write_line`)."""
    jobs: tuple[str, ...]

    @classmethod
    def of(cls, run: Run, user: str) -> Outcome:
        pods = run.env.list("v1", "Pod", run.namespace, f"{names.LABEL_FINETUNEJOB}={run.name}")
        # By creation: POD-1 is the first pod in every run of the lifecycle.
        by_creation = sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])
        replacements = {run.namespace: "NAMESPACE", f"/{run.name}/": "/NAME/"}
        replacements.update(
            {pod["metadata"]["name"]: f"POD-{i + 1}" for i, pod in enumerate(by_creation)}
        )
        assert run.env.router is not None
        writes = run.env.router.writes(user=user, namespace=run.namespace)
        return cls(
            status=normalize(run.ftj.status(), replacements),
            events=tuple(tuple(normalize(list(e), replacements)) for e in run.ftj.events()),
            writes=tuple(write_line(w) for w in writes if applied(w)),
            jobs=tuple(j["metadata"]["name"] for j in run.cluster.jobs(run.name)),
        )


def settle(
    env: KubeEnv,
    namespace: str,
    user: str,
    quiet: float = 0.5,
    timeout: float = 15.0,
    expected: int | None = None,
) -> None:
    """Wait until `user` has made `expected` applied writes in `namespace` (when given; a
    lifecycle's last Events follow the status the driver waits for), then until it writes
    nothing more for `quiet` seconds."""
    assert env.router is not None
    router = env.router
    deadline = time.monotonic() + timeout

    def count() -> int:
        return sum(1 for w in router.writes(user=user, namespace=namespace) if applied(w))

    while expected is not None and count() < expected and time.monotonic() < deadline:
        time.sleep(0.05)  # fewer writes than expected: the caller's assertions tell which
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(router.writes(user=user, namespace=namespace))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    raise AssertionError(f"{user} kept writing in {namespace} for {timeout}s")


def orphans(env: KubeEnv, namespace: str) -> list[str]:
    """What in `namespace` no existing object controls: ConfigMaps, Services and Jobs not
    controlled by the FineTuneJob their label names (as it exists now), pods not controlled
    by a Job that exists. Empty when all is well."""
    ftjs = env.list(FTJ_API, FTJ, namespace)
    owners = {f["metadata"]["name"]: f["metadata"]["uid"] for f in ftjs}
    found: list[str] = []
    jobs: set[str] = set()
    for api_version, kind in CHILD_KINDS:
        for obj in env.list(api_version, kind, namespace):
            meta = obj["metadata"]
            if kind == "Job":
                jobs.add(meta["uid"])
            label = (meta.get("labels") or {}).get(names.LABEL_FINETUNEJOB)
            controllers = [
                (r["kind"], r["name"], r["uid"])
                for r in meta.get("ownerReferences") or []
                if r.get("controller")
            ]
            if controllers != [(FTJ, label, owners.get(str(label)))]:
                found.append(f"{kind} {meta['name']} controlled by {controllers or 'nobody'}")
    for pod in env.list("v1", "Pod", namespace):
        meta = pod["metadata"]
        uids = [r["uid"] for r in meta.get("ownerReferences") or [] if r.get("controller")]
        if len(uids) != 1 or uids[0] not in jobs:
            found.append(f"Pod {meta['name']} controlled by no Job of the namespace")
    return found


def jobs_per_run(env: KubeEnv, namespace: str, name: str) -> Counter[str]:
    """How many Jobs each run of the FineTuneJob has (by the run-id label)."""
    jobs = env.list("batch/v1", "Job", namespace, f"{names.LABEL_FINETUNEJOB}={name}")
    return Counter(j["metadata"]["labels"][names.LABEL_RUN_ID] for j in jobs)
