"""The operator's writes and point reads against the Kubernetes API.

Reads of FineTuneJobs, Jobs and Pods come from the watch cache (`cache.py`); this module
only creates, patches and deletes, and reads the few things nothing watches (Secrets, by
name, to say which one is missing). It wraps the official `kubernetes` client, without
deserializing responses into model objects (the operator works on plain dicts), and runs
each call in a worker thread so the operator's event loop never blocks.

Every method is idempotent where the operator needs it to be: creating what already exists
is not an error (an operator restarted mid-reconcile re-creates nothing), deleting what is
gone is not an error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from kubetune.api import GROUP, VERSION
from kubetune.operator import names

FINETUNEJOBS = "finetunejobs"
FINALIZER = "kubetune.io/artifacts"
"""Held while a FineTuneJob with `output.deletePolicy: Delete` still has artifacts."""


class ApiError(Exception):
    """A request the API server refused; `status` is the HTTP status code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _error(exc: Exception) -> ApiError:
    status = int(getattr(exc, "status", 0) or 0)
    body = getattr(exc, "body", None) or ""
    try:
        detail = json.loads(body)
        return ApiError(status, str(detail.get("reason", "")), str(detail.get("message", body)))
    except (TypeError, ValueError):
        return ApiError(status, str(getattr(exc, "reason", "")), str(body)[:500])


class Kube:
    """Typed access to the few API calls the operator makes."""

    def __init__(self, api_client: Any | None = None) -> None:
        from kubernetes import client

        self.client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.client)
        self.batch = client.BatchV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """Call without model deserialization; the JSON body as a dict (None if empty)."""
        from kubernetes.client.exceptions import ApiException

        def call() -> dict[str, Any] | None:
            try:
                response = method(*args, _preload_content=False, **kwargs)
            except ApiException as exc:
                raise _error(exc) from None
            data = response.data
            return json.loads(data) if data else None

        return await asyncio.to_thread(call)

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a child object; False when it already existed (409 AlreadyExists)."""
        kind, namespace = obj["kind"], obj["metadata"]["namespace"]
        method = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "Pod": self.core.create_namespaced_pod,
            "Job": self.batch.create_namespaced_job,
        }[kind]
        try:
            await self._call(method, namespace, dict(obj))
        except ApiError as error:
            if error.status == 409:
                return False
            raise
        return True

    async def patch_job(self, namespace: str, name: str, spec_patch: Mapping[str, Any]) -> None:
        """Merge the in-place fields into a Job's spec."""
        await self._call(
            self.batch.patch_namespaced_job, name, namespace, {"spec": dict(spec_patch)}
        )

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a Job (with its pods, in the background) or a Pod; gone is fine."""
        method = {"Job": self.batch.delete_namespaced_job, "Pod": self.core.delete_namespaced_pod}
        try:
            await self._call(
                method[kind], name, namespace, body={"propagationPolicy": "Background"}
            )
        except ApiError as error:
            if error.status != 404:
                raise

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """Merge-patch a FineTuneJob's status subresource."""
        await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            FINETUNEJOBS,
            name,
            {"status": dict(patch)},
        )

    async def set_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        """Replace a FineTuneJob's finalizers, only if it did not change meanwhile (a stale
        resourceVersion gives 409 and the reconcile is retried)."""
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        await self._call(
            self.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            FINETUNEJOBS,
            name,
            patch,
        )

    async def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """The data keys of a Secret (never its values), or None when it does not exist."""
        try:
            secret = await self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiError as error:
            if error.status in (403, 404):
                return None
            raise
        secret = secret or {}
        return set(secret.get("data") or {}) | set(secret.get("stringData") or {})

    async def post_event(
        self, owner: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """Record an Event on a FineTuneJob."""
        meta = owner["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": owner.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": owner.get("kind", "FineTuneJob"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": names.MANAGER},
            "reportingComponent": names.MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(self.core.create_namespaced_event, meta["namespace"], event)

    async def list_children(
        self, labels: Mapping[str, str], namespaces: list[str]
    ) -> list[tuple[str, dict[str, Any]]]:
        """(kind, body) of every Job and Pod with `labels`, in `namespaces` (all when
        empty): the cache's starting point, so no reconcile runs before the operator knows
        which Jobs exist."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        calls: list[tuple[str, Any, tuple[Any, ...]]] = []
        targets: list[str | None] = [*namespaces] or [None]
        for namespace in targets:
            if namespace is None:
                calls += [
                    ("Job", self.batch.list_job_for_all_namespaces, ()),
                    ("Pod", self.core.list_pod_for_all_namespaces, ()),
                ]
            else:
                calls += [
                    ("Job", self.batch.list_namespaced_job, (namespace,)),
                    ("Pod", self.core.list_namespaced_pod, (namespace,)),
                ]
        found: list[tuple[str, dict[str, Any]]] = []
        for kind, method, args in calls:
            listing = await self._call(method, *args, label_selector=selector) or {}
            found += [(kind, {"kind": kind, **item}) for item in listing.get("items") or []]
        return found
