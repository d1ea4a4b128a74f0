"""A tiny kopf operator that proves the local Kubernetes API can host a real operator.

On FineTuneJob creation it creates a ConfigMap owned by the job (an ownerReference, so the
garbage collector removes it with the job), posts an Event and patches the job's status; a
deletion handler makes kopf put its finalizer on every job and release it on deletion. Used
by test_kube_env.py through ``kopf.testing.KopfRunner``.
"""

from __future__ import annotations

import os
from typing import Any

import kopf
import kubernetes

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.watching.server_timeout = 60
    config = kubernetes.client.Configuration()
    # The client reads KUBECONFIG once, at import; the test sets it after that.
    kubernetes.config.load_kube_config(
        config_file=os.environ.get("KUBECONFIG"), client_configuration=config
    )
    memo.kube_config = config


@kopf.on.create(GROUP, VERSION, PLURAL, id="render-config")
def render_config(body: kopf.Body, name: str, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    config_map: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "labels": {"kubetune.io/job": name}},
        "data": {"model": body["spec"]["model"]["uri"]},
    }
    kopf.adopt(config_map, owner=body)  # ownerReference + the job's namespace
    namespace = config_map["metadata"]["namespace"]
    with kubernetes.client.ApiClient(memo.kube_config) as api:
        try:
            kubernetes.client.CoreV1Api(api).create_namespaced_config_map(namespace, config_map)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:  # created by an earlier attempt of this handler
                raise
    kopf.info(body, reason="Created", message=f"Created ConfigMap {name}-config")
    patch.status["stage"] = "Pending"
    patch.status["observedGeneration"] = body.metadata["generation"]


@kopf.on.delete(GROUP, VERSION, PLURAL, id="release")
def release(name: str, logger: kopf.Logger, **_: Any) -> None:
    logger.info("Released FineTuneJob %s; its ConfigMap goes with it", name)
