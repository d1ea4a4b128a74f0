"""The operator's jobs-by-stage and GPU-hours gauges follow each job's changes."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kubetune.operator.cache import Cache
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.reconcile import Reconciler
from kubetune.operator.settings import OperatorSettings

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


def gauge(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def running_pod(start: str, gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "creationTimestamp": start},
        "spec": {
            "containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": gpus}}}]
        },
        "status": {"phase": "Running", "startTime": start},
    }


def test_stage_counts_and_gpu_hours_move_with_each_job() -> None:
    metrics = OperatorMetrics()
    reconciler = Reconciler(Cache(), None, OperatorSettings(), metrics)  # type: ignore[arg-type]
    reconciler._account(("a", "one"), "Training", [running_pod("2026-01-01T10:00:00Z", 2)], NOW)
    reconciler._account(("a", "two"), "Pending", [], NOW)
    reconciler._account(("b", "three"), "Training", [], NOW)
    assert gauge(metrics, "kubetune_operator_finetunejobs", stage="Training") == 2
    assert gauge(metrics, "kubetune_operator_finetunejobs", stage="Pending") == 1
    assert gauge(metrics, "kubetune_operator_gpu_hours", namespace="a") == 4.0

    reconciler._account(("a", "one"), "Succeeded", [], NOW)  # GPU-hours never go down
    reconciler._forget(("a", "two"))
    assert gauge(metrics, "kubetune_operator_finetunejobs", stage="Training") == 1
    assert gauge(metrics, "kubetune_operator_finetunejobs", stage="Succeeded") == 1
    assert gauge(metrics, "kubetune_operator_finetunejobs", stage="Pending") == 0
    assert gauge(metrics, "kubetune_operator_gpu_hours", namespace="a") == 4.0
