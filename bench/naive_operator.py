"""The comparison operator of `operator_scale.py`: kopf used the common, straightforward
way — one handler per event type, kopf's default bookkeeping (handler progress and the
last-handled spec stored on the object, a finalizer), the status returned from the
handler, and a Job event handler that reads the parent and patches its status on every
Job change. It builds the same children with kubetune's builders, so the difference
measured is the reconcile design, not the objects.

    kopf run --standalone -A bench/naive_operator.py
"""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator.children import build_children
from kubetune.operator.settings import load_settings
from kubetune.storage.layout import run_id_for


@kopf.on.startup()
def configure(memo: Any, **_: Any) -> None:
    kubernetes.config.load_kube_config()
    memo.settings = load_settings()


def _create(obj: dict[str, Any]) -> None:
    core, batch = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()
    create = {
        "ConfigMap": core.create_namespaced_config_map,
        "Service": core.create_namespaced_service,
        "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
        "Job": batch.create_namespaced_job,
    }[obj["kind"]]
    try:
        create(obj["metadata"]["namespace"], obj)
    except kubernetes.client.ApiException as error:
        if error.status != 409:
            raise


@kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs")
@kopf.on.update("kubetune.io", "v1alpha1", "finetunejobs")
@kopf.on.resume("kubetune.io", "v1alpha1", "finetunejobs")
def reconcile(body: Any, memo: Any, **_: Any) -> dict[str, Any]:
    ftj = FineTuneJob.model_validate(dict(body))
    run_id = run_id_for(ftj.spec)
    for obj in build_children(ftj, memo.settings, run_id).objects:
        _create(obj)
    kopf.info(body, reason="Created", message=f"Job for run {run_id}")
    return {"runId": run_id, "stage": "Pending"}


@kopf.on.delete("kubetune.io", "v1alpha1", "finetunejobs")
def deleted(**_: Any) -> None:
    """Children go by garbage collection; the handler makes kopf hold a finalizer."""


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": "kubetune-operator"})
def job_changed(body: Any, namespace: str, labels: Any, **_: Any) -> None:
    owner = labels.get("kubetune.io/finetunejob")
    if not owner:
        return
    api = kubernetes.client.CustomObjectsApi()
    ftj = api.get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", owner
    )
    active = (body.get("status") or {}).get("active", 0)
    stage = "Training" if active else (ftj.get("status") or {}).get("stage", "Pending")
    api.patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", owner, {"status": {"stage": stage}}
    )
