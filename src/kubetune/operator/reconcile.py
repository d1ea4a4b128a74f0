"""Reconcile one FineTuneJob: make its children match its spec, then write its status.

Level-based: every pass starts from what the watch cache holds (the FineTuneJob, its Jobs
and Pods), never from what the last pass did, so a restarted operator converges to the
same place and never creates a second Job (children have deterministic names; creating
one that exists is a no-op). A pass:

1. A FineTuneJob being deleted: with `output.deletePolicy: Delete`, stop its Jobs and wait
   for their trainer pods to end, then run the cleanup pod (the job's storage credentials,
   nothing else) and release the finalizer when it succeeds. Children go with the
   FineTuneJob by garbage collection.
2. Otherwise build the children the spec asks for (`children.build_children`; a spec the
   builders refuse — a local URI, no GPU class that fits — becomes the status), and act on
   `runs.decide`: create the run's ConfigMap and Job, patch in-place fields, or stop the
   Job of a superseded run (its checkpoints stay).
3. Read progress from the running trainer's metrics endpoint, compute the status
   (`status.compute_status`), write it only when it changed, and record an Event for
   every transition.

Costs per new FineTuneJob: a Secret read per referenced Secret, the ConfigMap and Job
creates, one status patch and the transition Events.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.finetunejob import DeletePolicy
from kubetune.operator import names
from kubetune.operator.cache import Cache, Key
from kubetune.operator.children import build_children, build_cleanup_pod
from kubetune.operator.kube import FINALIZER, ApiError, Kube
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.pod import METRICS_PORT_NAME, SpecError, secret_uses
from kubetune.operator.pod_state import gpu_hours
from kubetune.operator.progress import Scrape, metrics_url, scrape_async
from kubetune.operator.runs import Action, decide, job_finished, job_run_id, select_job
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.sizing import SizingError
from kubetune.operator.status import (
    WAITING_REASONS,
    Observed,
    Refusal,
    compute_status,
    events_for,
    load_status,
    status_patch,
)
from kubetune.operator.workqueue import backoff
from kubetune.storage.layout import run_id_for

logger = logging.getLogger("kubetune.operator")

Scraper = Callable[[str], Awaitable[Scrape | None]]


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def run_pods(pods: Sequence[Mapping[str, Any]], job: Mapping[str, Any] | None) -> list[Any]:
    """The pods of `job`'s run (trainer pods only; none without a Job)."""
    if job is None:
        return []
    run = job_run_id(job)
    return [
        pod
        for pod in pods
        if (_meta(pod).get("labels") or {}).get(names.LABEL_RUN_ID) == run
        and (_meta(pod).get("labels") or {}).get(names.LABEL_COMPONENT) == names.COMPONENT_TRAINER
    ]


def trainer_metrics_url(pod: Mapping[str, Any]) -> str | None:
    """The metrics URL of a running trainer pod (its `metrics` container port)."""
    if (pod.get("status") or {}).get("phase") != "Running":
        return None
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == METRICS_PORT_NAME:
                return metrics_url(pod, int(port["containerPort"]))
    return None


def wants_cleanup(ftj: FineTuneJob) -> bool:
    """Whether deleting the FineTuneJob also deletes its artifacts."""
    output = ftj.spec.output
    return output is not None and output.delete_policy == DeletePolicy.DELETE


@dataclass
class Reconciler:
    """Reconciles FineTuneJobs by key (the work queue's `process`)."""

    cache: Cache
    kube: Kube
    settings: OperatorSettings
    metrics: OperatorMetrics
    scrape: Scraper = scrape_async
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    secret_ttl_seconds: float = 30.0
    _secrets: dict[tuple[str, str], tuple[float, set[str]]] = field(default_factory=dict)
    _waiting: dict[Key, int] = field(default_factory=dict)
    _stages: dict[Key, str] = field(default_factory=dict)
    _gpu_hours: dict[Key, float] = field(default_factory=dict)
    _stage_counts: Counter[str] = field(default_factory=Counter)
    _namespace_hours: dict[str, float] = field(default_factory=dict)
    _released: dict[Key, str] = field(default_factory=dict)

    async def __call__(self, key: Hashable) -> float | None:
        assert isinstance(key, tuple)
        return await self.metrics.timed("FineTuneJob", self.reconcile(key))

    async def reconcile(self, key: Key) -> float | None:
        """One pass over a FineTuneJob; returns seconds until it needs another look."""
        body = self.cache.finetunejobs.get(key)
        if body is None:
            self._forget(key)
            return None
        try:
            ftj = FineTuneJob.model_validate(body)
        except ValidationError as error:
            self.metrics.record_error(Reason.INVALID_SPEC.value)
            logger.warning("FineTuneJob %s/%s does not validate: %s", *key, error)
            return None
        if _meta(body).get("deletionTimestamp"):
            return await self._finalize(key, ftj, body)
        finalizers = list(_meta(body).get("finalizers") or [])
        if wants_cleanup(ftj) and FINALIZER not in finalizers:
            await self.kube.set_finalizers(
                key[0], key[1], [*finalizers, FINALIZER], str(_meta(body)["resourceVersion"])
            )
            return None  # the update comes back as a watch event
        return await self._reconcile_run(key, ftj, body)

    async def _reconcile_run(
        self, key: Key, ftj: FineTuneJob, body: Mapping[str, Any]
    ) -> float | None:
        spec, now = ftj.spec, self.clock()
        previous = load_status(body.get("status"))
        run_id = run_id_for(spec)
        jobs, pods = self.cache.children(key, str(_meta(body).get("uid") or "") or None)
        job: Mapping[str, Any] | None = select_job(jobs, run_id)
        children, refusal = None, None
        try:
            children = build_children(ftj, self.settings, run_id)
        except (SpecError, SizingError) as error:
            refusal = Refusal.from_error(error)
        decision = decide(spec, previous, job, desired_job=children.job if children else None)
        again: float | None = None
        if decision.action in (Action.REPLACE, Action.STOP) and decision.delete_job:
            await self.kube.delete("Job", key[0], decision.delete_job)
            await self.kube.post_event(body, "Normal", "RunStopped", decision.message)
            job = None
        if decision.action in (Action.CREATE, Action.REPLACE) and children is not None:
            refusal = await self._missing_secrets(key, ftj)
            if refusal is None:
                refusal = await self._create(children.objects)
            if refusal is None:
                job = children.job
                for note in children.notes:  # how the pod was sized, when worth saying
                    await self.kube.post_event(body, "Normal", "Sized", note)
            else:
                again = backoff(self._waiting.get(key, 0) + 1)
                self._waiting[key] = self._waiting.get(key, 0) + 1
        elif decision.action == Action.UPDATE and job is not None:
            await self.kube.patch_job(key[0], _meta(job)["name"], decision.job_patch)
        elif decision.action == Action.WAIT:
            again = 1.0
        if refusal is None or refusal.reason not in WAITING_REASONS:
            self._waiting.pop(key, None)

        mine = run_pods(pods, job)
        progress = await self._progress(job, mine)
        new = compute_status(
            spec,
            int(_meta(body).get("generation") or 0),
            previous,
            Observed.of(now, job, mine, progress, refusal),
        )
        patch = status_patch(body.get("status") or {}, new)
        if patch is not None:
            written = await self.kube.patch_status(key[0], key[1], patch)
            if written is not None:
                # The next pass must start from this status, even when it runs before the
                # watch event of this write (a Job's event often comes first): else it
                # writes the same status and records the same Events again.
                self.cache.observe_finetunejob(written, False)
        for event in events_for(previous, new):
            await self.kube.post_event(body, event.type, event.reason, event.message)
        self._account(key, new.stage.value if new.stage else "Pending", mine, now)
        if job is not None and not job_finished(job) and not spec.suspend:
            poll = float(self.settings.status_poll_interval_seconds)
            again = poll if again is None else min(again, poll)
        return again

    async def _create(self, objects: Sequence[Mapping[str, Any]]) -> Refusal | None:
        """Create the run's children in order; a ResourceQuota or policy refusal becomes
        the status (QuotaExceeded waits and is retried; an admission refusal fails)."""
        for obj in objects:
            try:
                await self.kube.create(obj)
            except ApiError as error:
                if error.status not in (403, 422):
                    raise
                what = f"{obj['kind']} {obj['metadata']['name']}"
                if error.status == 403 and "quota" in error.message.lower():
                    return Refusal(
                        Reason.QUOTA_EXCEEDED,
                        f"the namespace's ResourceQuota refuses {what}: {error.message}; raise "
                        "the quota, wait for other workloads to finish, or lower "
                        "spec.resources (it is retried with backoff)",
                    )
                return Refusal(
                    Reason.INVALID_SPEC,
                    f"the API server refused {what} ({error.status} {error.reason}): "
                    f"{error.message}; an admission policy may forbid it: change the spec "
                    "or the policy",
                )
        return None

    async def _missing_secrets(self, key: Key, ftj: FineTuneJob) -> Refusal | None:
        """SecretNotFound naming the first missing Secret or key, or None when all exist."""
        uses = secret_uses(ftj.spec, self.settings)
        for use in uses:
            keys = await self._secret_keys(key[0], use.secret)
            if keys is None:
                # No `KEY=value` example: status messages mask what follows `..._KEY_ID=`.
                wanted = {u.key for u in uses if u.secret == use.secret and not u.optional}
                required = sorted(wanted or {use.key})
                return Refusal(
                    Reason.SECRET_NOT_FOUND,
                    f"{use.field}: Secret {use.secret!r} does not exist in namespace "
                    f"{key[0]}; create it with the keys {', '.join(required)} (e.g. kubectl "
                    f"create secret generic {use.secret} --from-env-file=FILE) and the job "
                    "starts",
                )
            if use.key not in keys and not use.optional:
                return Refusal(
                    Reason.SECRET_NOT_FOUND,
                    f"{use.field}: Secret {use.secret!r} has no key {use.key!r} (it has: "
                    f"{', '.join(sorted(keys)) or 'none'}); add the key and the job starts",
                )
        return None

    async def _secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """A Secret's keys, remembered briefly when it exists (many jobs share one)."""
        cached = self._secrets.get((namespace, name))
        if cached is not None and time.monotonic() - cached[0] < self.secret_ttl_seconds:
            return cached[1]
        keys = await self.kube.secret_keys(namespace, name)
        if keys is not None:
            self._secrets[(namespace, name)] = (time.monotonic(), keys)
        return keys

    async def _progress(
        self, job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
    ) -> Scrape | None:
        """The latest progress of the running trainer (index 0 of a multi-node job)."""
        if job is None or job_finished(job):
            return None
        for pod in sorted(pods, key=lambda p: str(_meta(p).get("name", ""))):
            url = trainer_metrics_url(pod)
            if url is not None:
                return await self.scrape(url)
        return None

    async def _finalize(self, key: Key, ftj: FineTuneJob, body: Mapping[str, Any]) -> float | None:
        """Delete the artifacts (cleanup pod) before releasing the finalizer."""
        finalizers = list(_meta(body).get("finalizers") or [])
        uid = str(_meta(body).get("uid") or "")
        if FINALIZER not in finalizers:
            self._forget(key)
            return None
        if self._released.get(key) == uid:
            # Released already; the cache lags behind. A new cleanup pod now would outlive
            # its owner and could delete the artifacts of a new FineTuneJob of this name.
            return None
        name = names.cleanup_pod_name(key[1])
        jobs, pods = self.cache.children(key, uid or None)
        pod = next((p for p in pods if _meta(p).get("name") == name), None)
        if pod is None:
            if await self._stop_training(key, jobs, pods):
                return float(self.settings.status_poll_interval_seconds)
            root = f"{ftj.spec.output.uri.rstrip('/')}/{key[0]}/{key[1]}"  # type: ignore[union-attr]
            await self.kube.create(build_cleanup_pod(ftj, self.settings, [root]))
            await self.kube.post_event(
                body, "Normal", "DeletingArtifacts", f"Deleting the artifacts under {root}"
            )
            return None
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Succeeded":
            remaining = [f for f in finalizers if f != FINALIZER]
            await self.kube.set_finalizers(
                key[0], key[1], remaining, str(_meta(body)["resourceVersion"])
            )
            self._released[key] = uid
            return None
        if phase == "Failed":
            attempts = self._waiting.get(key, 0) + 1
            self._waiting[key] = attempts
            await self.kube.post_event(
                body,
                "Warning",
                "ArtifactCleanupFailed",
                f"Pod {name} could not delete the artifacts (attempt {attempts}); retrying. "
                f"To keep them instead, remove the finalizer {FINALIZER}",
            )
            await self.kube.delete("Pod", key[0], name)
            return backoff(attempts)
        return None

    async def _stop_training(
        self, key: Key, jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
    ) -> bool:
        """Delete the FineTuneJob's Jobs before its artifacts: a trainer still running would
        write again (a checkpoint, its SIGTERM checkpoint) after the cleanup. True while a
        trainer pod still runs (its deletion comes back as a watch event)."""
        for job in jobs:
            if not _meta(job).get("deletionTimestamp"):
                await self.kube.delete("Job", key[0], str(_meta(job)["name"]))
        return any(
            (_meta(pod).get("labels") or {}).get(names.LABEL_COMPONENT) == names.COMPONENT_TRAINER
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            for pod in pods
        )

    def _account(
        self, key: Key, stage: str, pods: Sequence[Mapping[str, Any]], now: datetime
    ) -> None:
        """Keep the jobs-by-stage and GPU-hours gauges current, updating only what this
        job changed (a reconcile never walks every job)."""
        previous = self._stages.get(key)
        if previous != stage:
            if previous is not None:
                self._stage_counts[previous] -= 1
            self._stage_counts[stage] += 1
            self._stages[key] = stage
            self.metrics.set_jobs_by_state(self._stage_counts)
        before = self._gpu_hours.get(key, 0.0)
        hours = max(before, gpu_hours(pods, now))
        if hours != before:
            self._gpu_hours[key] = hours
            namespace = key[0]
            self._namespace_hours[namespace] = self._namespace_hours.get(namespace, 0.0) + (
                hours - before
            )
            self.metrics.set_gpu_hours(self._namespace_hours)

    def _forget(self, key: Key) -> None:
        self._waiting.pop(key, None)
        stage = self._stages.pop(key, None)
        if stage is not None:
            self._stage_counts[stage] -= 1
            self.metrics.set_jobs_by_state(self._stage_counts)
        self._released.pop(key, None)
