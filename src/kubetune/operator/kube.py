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
MODELDEPLOYMENTS = "modeldeployments"
CUSTOM_KINDS = {
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "ServiceMonitor": ("monitoring.coreos.com", "v1", "servicemonitors"),
}
"""Children that are custom resources of other projects (present only when installed)."""
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
        self.apps = client.AppsV1Api(self.client)
        self.policy = client.PolicyV1Api(self.client)
        self.autoscaling = client.AutoscalingV2Api(self.client)
        self.apis = client.ApisApi(self.client)

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
        try:
            if kind in CUSTOM_KINDS:
                group, version, plural = CUSTOM_KINDS[kind]
                await self._call(
                    self.custom.create_namespaced_custom_object,
                    group,
                    version,
                    namespace,
                    plural,
                    dict(obj),
                )
            else:
                await self._call(self._method("create", kind), namespace, dict(obj))
        except ApiError as error:
            if error.status == 409:
                return False
            raise
        return True

    def _method(self, verb: str, kind: str) -> Any:
        """The typed client method for `verb` (create, patch, replace, delete) of a kind."""
        api, resource = {
            "ConfigMap": (self.core, "config_map"),
            "Service": (self.core, "service"),
            "PersistentVolumeClaim": (self.core, "persistent_volume_claim"),
            "Pod": (self.core, "pod"),
            "Job": (self.batch, "job"),
            "Deployment": (self.apps, "deployment"),
            "PodDisruptionBudget": (self.policy, "pod_disruption_budget"),
            "HorizontalPodAutoscaler": (self.autoscaling, "horizontal_pod_autoscaler"),
        }[kind]
        return getattr(api, f"{verb}_namespaced_{resource}")

    async def patch(self, obj: Mapping[str, Any]) -> None:
        """Merge the labels, annotations and spec of a desired child into the live one."""
        kind, meta = obj["kind"], obj["metadata"]
        patch: dict[str, Any] = {
            "metadata": {
                "labels": meta.get("labels") or {},
                "annotations": meta.get("annotations") or {},
            }
        }
        if "spec" in obj:
            patch["spec"] = obj["spec"]
        if kind in CUSTOM_KINDS:
            group, version, plural = CUSTOM_KINDS[kind]
            await self._call(
                self.custom.patch_namespaced_custom_object,
                group,
                version,
                meta["namespace"],
                plural,
                meta["name"],
                patch,
            )
            return
        await self._call(self._method("patch", kind), meta["name"], meta["namespace"], patch)

    async def replace(self, obj: Mapping[str, Any], resource_version: str) -> None:
        """Replace a child (a Deployment) as a whole, only if it did not change meanwhile."""
        meta = {**obj["metadata"], "resourceVersion": resource_version}
        body = {**obj, "metadata": meta}
        await self._call(
            self._method("replace", obj["kind"]), meta["name"], meta["namespace"], body
        )

    async def delete_child(self, kind: str, namespace: str, name: str) -> None:
        """Delete a child of any kind the operator makes; gone (or not installed) is fine."""
        try:
            if kind in CUSTOM_KINDS:
                group, version, plural = CUSTOM_KINDS[kind]
                await self._call(
                    self.custom.delete_namespaced_custom_object,
                    group,
                    version,
                    namespace,
                    plural,
                    name,
                )
            else:
                await self._call(self._method("delete", kind), name, namespace)
        except ApiError as error:
            if error.status != 404:
                raise

    async def api_groups(self) -> set[str]:
        """The API groups the cluster serves (to find KEDA and the Prometheus Operator)."""
        groups = await self._call(self.apis.get_api_versions) or {}
        return {str(group.get("name")) for group in groups.get("groups") or []}

    async def current_uid(self, plural: str, namespace: str, name: str) -> str | None:
        """The uid of one of our custom resources as the API server has it now (None when
        it is gone): the check before creating children from a possibly stale cache."""
        try:
            found = await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return str(((found or {}).get("metadata") or {}).get("uid") or "") or None

    async def patch_modeldeployment_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch a ModelDeployment's status subresource; the ModelDeployment as
        written."""
        return await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            MODELDEPLOYMENTS,
            name,
            {"status": dict(patch)},
        )

    async def patch_job(self, namespace: str, name: str, spec_patch: Mapping[str, Any]) -> None:
        """Merge the in-place fields into a Job's spec."""
        await self._call(
            self.batch.patch_namespaced_job, name, namespace, {"spec": dict(spec_patch)}
        )

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a Job (with its pods, in the background) or a Pod; gone is fine."""
        try:
            await self._call(
                self._method("delete", kind),
                name,
                namespace,
                body={"propagationPolicy": "Background"},
            )
        except ApiError as error:
            if error.status != 404:
                raise

    async def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch a FineTuneJob's status subresource; the FineTuneJob as written."""
        return await self._call(
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
        """(kind, body) of every Job, Pod and Deployment with `labels`, in `namespaces` (all when
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
                    ("Deployment", self.apps.list_deployment_for_all_namespaces, ()),
                ]
            else:
                calls += [
                    ("Job", self.batch.list_namespaced_job, (namespace,)),
                    ("Pod", self.core.list_namespaced_pod, (namespace,)),
                    ("Deployment", self.apps.list_namespaced_deployment, (namespace,)),
                ]
        found: list[tuple[str, dict[str, Any]]] = []
        for kind, method, args in calls:
            listing = await self._call(method, *args, label_selector=selector) or {}
            found += [(kind, {"kind": kind, **item}) for item in listing.get("items") or []]
        return found
