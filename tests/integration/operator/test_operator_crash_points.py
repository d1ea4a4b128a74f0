"""The operator killed at every point of a FineTuneJob's life, and the API misbehaving.

The operator runs as a process of its own (`operator_process.py`) and is SIGKILLed right after
its k-th applied write (create, patch, Event; the status subresource included) for every k of
two lifecycles (`lifecycles.py`): a run that succeeds, and one whose pod fails with an
infrastructure error, is retried by the Job and then fails with a dataset error. A new
operator starts at once; the lifecycle carries on. Each crash point must end where the
uninterrupted run ends:

- the same status, timestamps aside (conditions with their reasons and messages, stage,
  runs, artifacts, metrics, progress);
- one Job for the run, every ConfigMap, Service and Job controlled by the FineTuneJob,
  every pod by a Job that exists;
- the same Events, less those the interrupted reconcile had still to post (Events are
  posted after the status they tell of: a crash loses them, a restart never repeats one),
  and no other write: the restarted operator writes nothing it had written already.

Then the API's own faults: a 409 on a status write and on a child's create (the object
there, its answer lost; or not there after all), and watch streams dropped between every
step, resumed or answered 410 Gone so that kopf lists again.

`test_soak_*` (`make soak`) kill the operator at random moments, several times, with
several jobs in one namespace, watches dropped and writes refused at random.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from ftj_handle import FTJ, FTJ_API
from lifecycles import (
    LIFECYCLES,
    Outcome,
    Run,
    jobs_per_run,
    orphans,
    settle,
    write_line,
)
from operator_process import CrashAfterWrites, OperatorProcess, operator_process_fixture
from simulate import TrainerEndpoint

from kubetune.operator import names
from support.kubeenv import KubeEnv

pytestmark = pytest.mark.apiserver

operator = operator_process_fixture({"statusPollIntervalSeconds": 1})

CONFIGMAP = "create configmaps"
JOB = "create jobs.batch"
STATUS = "patch finetunejobs.kubetune.io/status"
EVENT = "create events"

REFERENCE_WRITES: dict[str, tuple[str, ...]] = {
    "success": (
        *(CONFIGMAP, JOB, STATUS, EVENT),  # the run's children; Pending (Event: its stage)
        STATUS,  # "Pod … is starting"
        STATUS,  # the Job's startTime
        *(STATUS, EVENT, EVENT),  # the pod runs: Preparing (stage, Succeeded's reason)
        *(STATUS, EVENT, EVENT),  # step 5: Training (stage, DataPrepared)
        *(STATUS, EVENT, EVENT, EVENT, EVENT, EVENT),  # published: stage, 4 conditions
        *(STATUS, EVENT, EVENT),  # the Job completes: Succeeded (stage, Succeeded)
    ),
    "retry-then-fail": (
        *(CONFIGMAP, JOB, STATUS, EVENT),
        STATUS,
        STATUS,
        *(STATUS, EVENT, EVENT),
        *(STATUS, EVENT, EVENT, EVENT),  # InfrastructureError: retrying (DataPrepared too)
        STATUS,  # the Job counts the failure: attempt 2 of 4
        STATUS,  # the replacement pod is starting
        *(STATUS, EVENT, EVENT),  # it runs: Training (stage, Succeeded's reason)
        *(STATUS, EVENT, EVENT),  # DatasetInvalid, before the Job's verdict
        *(STATUS, EVENT, EVENT),  # the Job fails (FailJob): Failed
    ),
}
"""The operator's applied writes in an uninterrupted run, in order: the crash points."""

SHORT = {CONFIGMAP: "configmap", JOB: "job", STATUS: "status", EVENT: "event"}
CRASH_POINTS = [
    pytest.param(lifecycle, k, id=f"{lifecycle}-{k:02d}-{SHORT[write]}")
    for lifecycle, writes in REFERENCE_WRITES.items()
    for k, write in enumerate(writes, start=1)
]
"""(lifecycle, k): kill the operator right after its k-th write, e.g. `success-03-status`."""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def endpoint() -> Iterator[TrainerEndpoint]:
    with TrainerEndpoint() as served:
        yield served


@pytest.fixture
def clean(kube_env: KubeEnv, namespace: str) -> Iterator[str]:
    """The test's namespace; its FineTuneJobs are deleted afterwards (their children go
    with them), so the operator has nothing left to look at."""
    yield namespace
    for ftj in kube_env.list(FTJ_API, FTJ, namespace):
        kube_env.delete(FTJ_API, FTJ, ftj["metadata"]["name"], namespace)


@pytest.fixture(scope="module")
def reference(
    kube_env: KubeEnv, operator: OperatorProcess, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Outcome]]:
    """How each lifecycle ends without faults (run once per module, on first use)."""
    outcomes: dict[str, Outcome] = {}
    suffix = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]

    def get(lifecycle: str) -> Outcome:
        if lifecycle not in outcomes:
            namespace = f"reference-{lifecycle}-{suffix}"
            kube_env.ensure_namespace(namespace)
            with TrainerEndpoint() as endpoint:
                run = Run(kube_env, namespace, endpoint, diagnostics=operator.log_tail)
                LIFECYCLES[lifecycle](run)
                settle(
                    kube_env, namespace, operator.user, expected=len(REFERENCE_WRITES[lifecycle])
                )
                outcomes[lifecycle] = Outcome.of(run, operator.user)
            assert orphans(kube_env, namespace) == []
        return outcomes[lifecycle]

    yield get
    for lifecycle in outcomes:
        kube_env.delete(FTJ_API, FTJ, "crashy", f"reference-{lifecycle}-{suffix}")


def unposted(writes: tuple[str, ...], k: int) -> list[int]:
    """Positions (in `writes`) of the Events a crash right after write `k` leaves unposted:
    the rest of the interrupted reconcile's Events."""
    positions: list[int] = []
    for position in range(k, len(writes)):
        if writes[position] != EVENT:
            break
        positions.append(position)
    return positions


def check_converged(run: Run, expected: Outcome, outcome: Outcome) -> None:
    """One Job for the run and nothing orphaned; the same status and Jobs as the
    uninterrupted run."""
    run_id = expected.status["runId"]
    assert jobs_per_run(run.env, run.namespace, run.name) == {run_id: 1}
    assert orphans(run.env, run.namespace) == []
    assert outcome.status == expected.status
    assert outcome.jobs == expected.jobs, "named as always"
    config_maps = run.env.list(
        "v1", "ConfigMap", run.namespace, f"{names.LABEL_FINETUNEJOB}={run.name}"
    )
    assert [c["metadata"]["name"] for c in config_maps] == [f"{run.name}-{run_id}-config"]


# ------------------------------------------------------------------------- crash points


@pytest.mark.parametrize("lifecycle", list(REFERENCE_WRITES))
def test_uninterrupted_lifecycle_writes(
    lifecycle: str, reference: Callable[[str], Outcome]
) -> None:
    """The crash points are the writes of an uninterrupted run, in this order."""
    expected = reference(lifecycle)
    assert expected.writes == REFERENCE_WRITES[lifecycle]
    assert len(expected.events) == REFERENCE_WRITES[lifecycle].count(EVENT)
    assert (
        expected.status["stage"] == {"success": "Succeeded", "retry-then-fail": "Failed"}[lifecycle]
    )


@pytest.mark.parametrize(("lifecycle", "k"), CRASH_POINTS)
def test_killed_after_write_k_converges(
    lifecycle: str,
    k: int,
    kube_env: KubeEnv,
    clean: str,
    operator: OperatorProcess,
    endpoint: TrainerEndpoint,
    reference: Callable[[str], Outcome],
) -> None:
    """SIGKILL right after the operator's k-th write landed (before it read the answer),
    a new operator at once: the run ends as without the crash, less the Events the killed
    reconcile had still to post, and the new operator repeats no write."""
    expected = reference(lifecycle)
    writes = REFERENCE_WRITES[lifecycle]
    kills = operator.kills
    lost = unposted(writes, k)
    run = Run(kube_env, clean, endpoint, diagnostics=operator.log_tail)
    with CrashAfterWrites(kube_env, operator, clean, at={k}) as crashes:
        LIFECYCLES[lifecycle](run)
        crashes.wait_restarted()
        settle(kube_env, clean, operator.user, expected=len(writes) - len(lost))
    assert [write_line(w) for w in crashes.fired] == [writes[k - 1]], "killed after write k"
    assert operator.kills == kills + 1
    outcome = Outcome.of(run, operator.user)
    check_converged(run, expected, outcome)

    lost_events = {writes[:position].count(EVENT) for position in lost}
    assert outcome.events == tuple(e for i, e in enumerate(expected.events) if i not in lost_events)
    assert outcome.writes == tuple(w for i, w in enumerate(writes) if i not in lost), (
        "after the restart, only what was not written yet"
    )
    assert kube_env.router is not None
    mine = kube_env.router.writes(user=operator.user, namespace=clean)
    refused = {(w.verb, w.status) for w in mine if w.status >= 300}
    assert refused <= {("create", 409)}, "nothing else refused than creates of what exists"


# --------------------------------------------------------------------------- API faults


def test_a_conflict_on_the_first_status_write_is_retried(
    kube_env: KubeEnv,
    clean: str,
    operator: OperatorProcess,
    endpoint: TrainerEndpoint,
    reference: Callable[[str], Outcome],
) -> None:
    """409 Conflict on the first status write: the reconcile fails before its Events, is
    retried after a backoff, and writes the status and the Events once."""
    assert kube_env.router is not None
    expected = reference("success")
    kube_env.router.inject_error("patch", STATUS.split()[-1], status=409, namespace=clean)
    run = Run(kube_env, clean, endpoint, diagnostics=operator.log_tail)
    LIFECYCLES["success"](run)
    settle(kube_env, clean, operator.user, expected=len(expected.writes))
    assert kube_env.router.pending_faults() == 0
    outcome = Outcome.of(run, operator.user)
    check_converged(run, expected, outcome)
    assert outcome.events == expected.events, "nothing lost, nothing twice"
    assert outcome.writes == expected.writes
    refused = [
        str(w)
        for w in kube_env.router.writes(user=operator.user, namespace=clean)
        if w.status >= 300
    ]
    assert refused == [f"patch finetunejobs.kubetune.io/status {clean}/crashy -> 409"]


@pytest.mark.parametrize(
    ("resource", "forward"),
    [
        pytest.param("jobs.batch", True, id="job-created-answer-lost"),
        pytest.param("configmaps", True, id="configmap-created-answer-lost"),
        pytest.param("jobs.batch", False, id="job-not-there-after-all"),
    ],
)
def test_already_exists_on_a_child_create(
    resource: str,
    forward: bool,
    kube_env: KubeEnv,
    clean: str,
    operator: OperatorProcess,
    endpoint: TrainerEndpoint,
    reference: Callable[[str], Outcome],
) -> None:
    """409 AlreadyExists on a child's create. With the object created (the answer lost, as
    when a timed-out create is retried) the operator adopts it; without it (a namesake
    still being deleted) the operator creates it on its next look."""
    assert kube_env.router is not None
    expected = reference("success")
    kube_env.router.inject_error(
        "create", resource, status=409, reason="AlreadyExists", namespace=clean, forward=forward
    )
    run = Run(kube_env, clean, endpoint, diagnostics=operator.log_tail)
    LIFECYCLES["success"](run)
    # A create that landed but was answered 409 is not counted as applied.
    settle(kube_env, clean, operator.user, expected=len(expected.writes) - forward)
    assert kube_env.router.pending_faults() == 0
    outcome = Outcome.of(run, operator.user)
    check_converged(run, expected, outcome)
    assert outcome.events == expected.events
    creates = [
        w.status
        for w in kube_env.router.writes(user=operator.user, namespace=clean)
        if (w.verb, w.resource) == ("create", resource)
    ]
    if forward:
        assert creates == [409], "adopted: the object is there, it is not created again"
    else:
        assert (creates[0], creates[-1]) == (409, 201), "created on a later pass"


@pytest.mark.parametrize("expire", [False, True], ids=["resumed", "gone-relisted"])
def test_watch_streams_dropped_between_every_step(
    expire: bool,
    kube_env: KubeEnv,
    clean: str,
    operator: OperatorProcess,
    endpoint: TrainerEndpoint,
    reference: Callable[[str], Outcome],
) -> None:
    """Every watch stream is cut after each step, before the next cluster write: kopf
    resumes from the last resourceVersion, or (410 Gone) lists again; either way the
    operator sees what happened meanwhile and ends as without faults."""
    router = kube_env.router
    assert router is not None
    expected = reference("retry-then-fail")
    dropped: list[int] = []
    lists = ("list", "finetunejobs.kubetune.io")
    before = kube_env.request_counts(operator.user).get(lists, 0)
    gone_before = router.gone_answers().get(lists[1], 0)
    run = Run(
        kube_env,
        clean,
        endpoint,
        diagnostics=operator.log_tail,
        between_steps=lambda: dropped.append(router.drop_watches(expire=expire)),
    )
    LIFECYCLES["retry-then-fail"](run)
    settle(kube_env, clean, operator.user, expected=len(expected.writes))
    outcome = Outcome.of(run, operator.user)
    check_converged(run, expected, outcome)
    assert outcome.events == expected.events
    assert outcome.writes == expected.writes
    assert all(dropped), f"watch streams dropped at each step: {dropped}"
    relists = kube_env.request_counts(operator.user).get(lists, 0) - before
    gone = router.gone_answers().get(lists[1], 0) - gone_before
    if expire:
        assert gone >= 1, "resumed watches answered 410 Gone"
        # Every 410 is followed by a list (the last one may still be on its way). A drop
        # while kopf is between its list and its watch has no stream of it to cut.
        kube_env.wait_for(
            lambda: kube_env.request_counts(operator.user).get(lists, 0) - before >= gone,
            what=f"kopf to list again after each of {gone} 410 Gone answers",
        )
    else:
        assert (relists, gone) == (0, 0), "resumed from the last resourceVersion, no list"


def test_deleted_while_the_watches_were_gone_then_created_again(
    kube_env: KubeEnv,
    clean: str,
    operator: OperatorProcess,
    endpoint: TrainerEndpoint,
    reference: Callable[[str], Outcome],
) -> None:
    """A FineTuneJob deleted while the operator's watches are down and expired (410 Gone):
    its lists no longer hold the job, its Job and its pod, and kopf reports no deletion
    for what a list lacks. Created again with the same spec, it must get a Job of its own
    and run, not be taken for the Job and pod the operator saw last."""
    router = kube_env.router
    assert router is not None
    run = Run(kube_env, clean, endpoint, diagnostics=operator.log_tail)
    job = run.created()
    run.start_pod(job["metadata"]["name"])
    lists = [("list", r) for r in ("finetunejobs.kubetune.io", "jobs.batch", "pods")]
    before = kube_env.request_counts(operator.user)
    releases = [router.hold(*key, user=operator.user) for key in lists]
    try:
        assert router.drop_watches(expire=True)
        kube_env.wait_for(
            lambda: all(
                kube_env.request_counts(operator.user).get(k, 0) > before.get(k, 0) for k in lists
            ),
            what="kopf to list again after 410 Gone",
        )
        kube_env.delete(FTJ_API, FTJ, run.name, clean)
        kube_env.wait_for(
            lambda: (
                not kube_env.list("batch/v1", "Job", clean)
                and not kube_env.list("v1", "Pod", clean)
            ),
            what="the Job and its pod to be collected",
        )
    finally:
        for release in releases:
            release()

    again = Run(kube_env, clean, endpoint, diagnostics=operator.log_tail)
    LIFECYCLES["success"](again)
    settle(kube_env, clean, operator.user)
    outcome = Outcome.of(again, operator.user)
    check_converged(again, reference("success"), outcome)
    new_job = kube_env.list("batch/v1", "Job", clean)[0]
    assert new_job["metadata"]["uid"] != job["metadata"]["uid"]


# ---------------------------------------------------------------------------------- soak


SOAK_SEEDS = int(os.environ.get("KUBETUNE_SOAK_SEEDS", "8"))


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(SOAK_SEEDS))
def test_soak_random_kills_faults_and_several_jobs(
    seed: int,
    kube_env: KubeEnv,
    clean: str,
    operator: OperatorProcess,
    reference: Callable[[str], Outcome],
) -> None:
    """Three FineTuneJobs of random lifecycles in one namespace, driven at once; the
    operator killed after three random writes of theirs; watches dropped (some with 410)
    and a status write or a child's create refused at random between steps."""
    router = kube_env.router
    assert router is not None
    rng = random.Random(seed)
    lifecycles = [rng.choice(list(REFERENCE_WRITES)) for _ in range(3)]
    kills = 3
    # Applied writes of the three runs, at least: a crash loses at most the Events of one
    # reconcile (5), a create answered 409 after it landed is not counted (one per job).
    total = sum(len(REFERENCE_WRITES[name]) for name in lifecycles) - 5 * kills - len(lifecycles)
    kill_at = set(rng.sample(range(1, total + 1), kills))
    lock = threading.Lock()

    def fault() -> None:
        with lock:
            roll = rng.random()
        if roll < 0.15:
            router.drop_watches(expire=roll < 0.05)
        elif roll < 0.2:
            router.inject_error("patch", STATUS.split()[-1], status=409, namespace=clean)
        elif roll < 0.25:
            router.inject_error(
                "create", "jobs.batch", status=409, reason="AlreadyExists", namespace=clean,
                forward=True,
            )  # fmt: skip

    expected = {name: reference(name) for name in set(lifecycles)}
    errors: list[BaseException] = []
    runs: list[Run] = []
    endpoints = [TrainerEndpoint() for _ in lifecycles]
    try:
        with CrashAfterWrites(kube_env, operator, clean, at=kill_at) as crashes:
            for index, served in enumerate(endpoints):
                runs.append(
                    Run(
                        kube_env,
                        clean,
                        served,
                        name=f"soak-{index}",
                        timeout=60.0,
                        diagnostics=operator.log_tail,
                        between_steps=fault,
                    )
                )

            def drive(run: Run, name: str) -> None:
                try:
                    LIFECYCLES[name](run)
                except BaseException as error:  # reported by the test thread
                    errors.append(error)

            threads = [
                threading.Thread(target=drive, args=(run, name))
                for run, name in zip(runs, lifecycles, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            crashes.wait_restarted()
            settle(kube_env, clean, operator.user, quiet=2.5, timeout=60.0)
    finally:
        for served in endpoints:
            served.__exit__()
    assert len(crashes.fired) == kills, f"killed after {crashes.fired}, not at {sorted(kill_at)}"
    for run, name in zip(runs, lifecycles, strict=True):
        outcome = Outcome.of(run, operator.user)
        want = expected[name]
        assert outcome.status == want.status, run.name
        assert jobs_per_run(kube_env, clean, run.name) == {want.status["runId"]: 1}
        extra = Counter(outcome.events) - Counter(want.events)
        assert not extra, f"{run.name}: Events an uninterrupted run does not post: {extra}"
    assert orphans(kube_env, clean) == []
