"""The operator's own Prometheus metrics: how reconciles go, and what the jobs cost.

The metrics live in a dedicated registry (not prometheus_client's global one), so a test or
a second operator in the same process never sees another's numbers, and the endpoint shows
only what the operator means to export. The handlers call the small API below; `start_server`
serves `/metrics`. Label values are bounded (kinds, results, reasons, stages and
namespaces), never per object, so the series count stays small.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from threading import Thread
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.api.v1alpha1.status import JobStage

T = TypeVar("T")

RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Reconcile latency buckets in seconds: most reconciles take milliseconds; API retries and
slow scrapes take seconds."""


class OperatorMetrics:
    """The operator's metrics, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconciles = Counter(
            "kubetune_operator_reconciles",
            "Reconciles by kind (FineTuneJob, ModelDeployment) and result (success, "
            "retry, permanent_error, error)",
            ("kind", "result"),
            registry=self.registry,
        )
        self.errors = Counter(
            "kubetune_operator_errors",
            "Reconcile errors by CamelCase reason",
            ("reason",),
            registry=self.registry,
        )
        self.jobs = Gauge(
            "kubetune_operator_finetunejobs",
            "FineTuneJobs by stage",
            ("stage",),
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubetune_operator_reconcile_duration_seconds",
            "Time spent in one reconcile",
            ("kind",),
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.gpu_hours = Gauge(
            "kubetune_operator_gpu_hours",
            "GPU-hours used by the current runs of the FineTuneJobs of a namespace",
            ("namespace",),
            registry=self.registry,
        )
        self.deployments = Gauge(
            "kubetune_operator_modeldeployments",
            "ModelDeployments by the status of their Ready condition",
            ("ready",),
            registry=self.registry,
        )
        self._namespaces: set[str] = set()

    def observe_reconcile(self, kind: str, seconds: float, result: str) -> None:
        """Count one reconcile of `kind` with its `result` and record how long it took."""
        self.reconciles.labels(kind, result).inc()
        self.latency.labels(kind).observe(max(0.0, seconds))

    async def timed(self, kind: str, reconcile: Awaitable[T]) -> T:
        """Await one reconcile of `kind`, counting it (ok or error) and its latency."""
        started = time.monotonic()
        result = "error"
        try:
            value = await reconcile
            result = "ok"
            return value
        finally:
            self.observe_reconcile(kind, time.monotonic() - started, result)

    def record_error(self, reason: str) -> None:
        """Count one error by its CamelCase reason (e.g. SecretNotFound)."""
        self.errors.labels(reason).inc()

    def set_jobs_by_state(self, counts: Mapping[str, int]) -> None:
        """Set the FineTuneJob count of every stage; stages not in `counts` read 0."""
        for stage in JobStage:
            self.jobs.labels(stage.value).set(counts.get(stage.value, 0))
        known = {stage.value for stage in JobStage}
        for name, count in counts.items():
            if name not in known:
                self.jobs.labels(name).set(count)

    def set_deployments_by_readiness(self, counts: Mapping[str, int]) -> None:
        """Set the ModelDeployment count per Ready status (True, False, Unknown)."""
        for ready in ("True", "False", "Unknown"):
            self.deployments.labels(ready).set(counts.get(ready, 0))

    def set_gpu_hours(self, hours_by_namespace: Mapping[str, float]) -> None:
        """Set the GPU-hours of each namespace; a namespace that disappeared is removed."""
        for namespace in self._namespaces - set(hours_by_namespace):
            self.gpu_hours.remove(namespace)
        for namespace, hours in hours_by_namespace.items():
            self.gpu_hours.labels(namespace).set(hours)
        self._namespaces = set(hours_by_namespace)

    def start_server(self, port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, Thread]:
        """Serve `/metrics` on `port` in a daemon thread; returns the server (call
        `shutdown()` and `server_close()` to stop it) and its thread."""
        return start_http_server(port, addr=addr, registry=self.registry)


METRICS = OperatorMetrics()
"""The operator process's metrics."""


def observe_reconcile(kind: str, seconds: float, result: str) -> None:
    """`OperatorMetrics.observe_reconcile` on the process's metrics."""
    METRICS.observe_reconcile(kind, seconds, result)


def record_error(reason: str) -> None:
    """`OperatorMetrics.record_error` on the process's metrics."""
    METRICS.record_error(reason)


def set_jobs_by_state(counts: Mapping[str, int]) -> None:
    """`OperatorMetrics.set_jobs_by_state` on the process's metrics."""
    METRICS.set_jobs_by_state(counts)


def set_gpu_hours(hours_by_namespace: Mapping[str, float]) -> None:
    """`OperatorMetrics.set_gpu_hours` on the process's metrics."""
    METRICS.set_gpu_hours(hours_by_namespace)


def start_server(port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, Thread]:
    """Serve the process's metrics on `port`."""
    return METRICS.start_server(port, addr)
