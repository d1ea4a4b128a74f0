"""The kopf operator: watches, the work queue, and the reconciler wired together.

    python -m kubetune.operator                 # reads KUBETUNE_OPERATOR_SETTINGS
    kopf run -m kubetune.operator.handlers -A   # the same handlers under kopf's CLI

kopf keeps the watches (FineTuneJobs, ModelDeployments; Jobs, Deployments and Pods labelled
as ours) alive and delivers their events; every event updates the cache and queues the
object it concerns (a FineTuneJob's change also queues the ModelDeployments serving it). Events
never reconcile directly, so a burst of them costs one reconcile, and the reconciler is
the only writer. kopf's own bookkeeping (finalizers, progress annotations, posting log
lines as Events) is off: nothing is written that the reconciler did not decide.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from kubetune.api import GROUP, VERSION
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment
from kubetune.operator import names
from kubetune.operator.cache import Cache
from kubetune.operator.kube import FINETUNEJOBS, MODELDEPLOYMENTS, Kube
from kubetune.operator.metrics import METRICS
from kubetune.operator.reconcile import Reconciler
from kubetune.operator.serving_checks import ClusterFeatures
from kubetune.operator.serving_reconcile import ServingReconciler
from kubetune.operator.serving_resolve import referenced_jobs
from kubetune.operator.settings import load_settings
from kubetune.operator.workqueue import WorkQueue

logger = logging.getLogger("kubetune.operator")

OURS = {names.LABEL_MANAGED_BY: names.MANAGER}
WORKERS_ENV = "KUBETUNE_OPERATOR_WORKERS"
METRICS_PORT_ENV = "KUBETUNE_OPERATOR_METRICS_PORT"
DEFAULT_WORKERS = 16
SERVING_WORKERS = 4
KEDA_GROUP = "keda.sh"
MONITORING_GROUP = "monitoring.coreos.com"
DEFAULT_METRICS_PORT = 8080


def _load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Load the settings, fill the cache with existing children, start the workers."""
    settings.posting.enabled = False
    settings.persistence.finalizer = "kubetune.io/kopf"
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    operator_settings = load_settings()
    _load_kube_config()
    kube = Kube()
    cache = Cache()
    for kind, body in await kube.list_children(OURS, operator_settings.watch_namespaces):
        observe = {"Job": cache.observe_job, "Deployment": cache.observe_deployment}
        observe.get(kind, cache.observe_pod)(body, False)
    groups = await kube.api_groups()
    features = ClusterFeatures(
        keda_installed=KEDA_GROUP in groups,
        servicemonitor_crd=MONITORING_GROUP in groups,
        prometheus_url=operator_settings.prometheus_url,
    )
    memo.cache = cache
    memo.queue = WorkQueue()
    memo.serving_queue = WorkQueue()
    reconciler = Reconciler(cache=cache, kube=kube, settings=operator_settings, metrics=METRICS)
    serving = ServingReconciler(
        cache=cache, kube=kube, settings=operator_settings, metrics=METRICS, features=features
    )
    workers = int(os.environ.get(WORKERS_ENV, DEFAULT_WORKERS))
    memo.workers = asyncio.gather(
        memo.queue.run(reconciler, workers), memo.serving_queue.run(serving, SERVING_WORKERS)
    )
    port = int(os.environ.get(METRICS_PORT_ENV, DEFAULT_METRICS_PORT))
    memo.metrics_server = METRICS.start_server(port)[0] if port else None
    logger.info(
        "kubetune operator started: %d workers, trainer image %s, KEDA %s, ServiceMonitor "
        "%s, watching %s",
        workers,
        operator_settings.trainer_image,
        "found" if features.keda_installed else "not installed",
        "found" if features.servicemonitor_crd else "not installed",
        ", ".join(operator_settings.watch_namespaces) or "all namespaces",
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the workers and the metrics server."""
    task = getattr(memo, "workers", None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        server.shutdown()
        server.server_close()


@kopf.on.event(GROUP, VERSION, FINETUNEJOBS)
async def finetunejob_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Cache the FineTuneJob and queue it, and the ModelDeployments serving from it."""
    key = memo.cache.observe_finetunejob(event["object"], event.get("type") == "DELETED")
    memo.queue.add(key)
    for server in memo.cache.servers_of.get(key, ()):
        memo.serving_queue.add(server)


@kopf.on.event(GROUP, VERSION, MODELDEPLOYMENTS)
async def modeldeployment_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Cache the ModelDeployment (and what it references) and queue it."""
    body = event["object"]
    try:
        references = referenced_jobs(ModelDeployment.model_validate(body))
    except ValueError:
        references = set()  # the reconciler reports what is wrong with it
    key = memo.cache.observe_modeldeployment(body, event.get("type") == "DELETED", references)
    memo.serving_queue.add(key)


@kopf.on.event("apps", "v1", "deployments", labels=OURS)
async def deployment_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Cache the Deployment and queue its ModelDeployment."""
    owner = memo.cache.observe_deployment(event["object"], event.get("type") == "DELETED")
    if owner is not None:
        memo.serving_queue.add(owner)


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
async def job_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Cache the Job and queue its FineTuneJob."""
    owner = memo.cache.observe_job(event["object"], event.get("type") == "DELETED")
    if owner is not None:
        memo.queue.add(owner)


@kopf.on.event("", "v1", "pods", labels=OURS)
async def pod_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Cache the Pod and queue its FineTuneJob or ModelDeployment."""
    found = memo.cache.observe_pod(event["object"], event.get("type") == "DELETED")
    if found is not None:
        kind, owner = found
        (memo.queue if kind == "FineTuneJob" else memo.serving_queue).add(owner)
