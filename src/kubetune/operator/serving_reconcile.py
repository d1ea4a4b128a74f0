"""Reconcile one ModelDeployment: resolve what it serves, make its children match, write
its status.

Level-based like the FineTuneJob reconciler (`reconcile.py`), from the watch cache:

1. Resolve the artifacts (`serving_resolve.resolve`): a FineTuneJob's newest servable run,
   or a RUN_URI. A referenced FineTuneJob changing (a new run succeeding) queues the
   ModelDeployment again, so a new artifact rolls out.
2. Build the children (`serving_objects.build_serving`). A refusal (gate failed, adapter
   incompatible, variant missing…) leaves the running children alone: what is served keeps
   being served, and the status says why the new spec or artifact is not.
3. The Deployment is replaced when what the operator wants of it changed (a hash of the
   desired object, kept as an annotation): an unchanged artifact and spec change nothing,
   a new manifest digest changes the pod template and rolls out. The autoscaler owns the
   replica count when there is one. The other children are created when missing and
   patched when the ModelDeployment's generation moved; an autoscaler or ServiceMonitor the
   plan no longer has is deleted. Labels copied from the ModelDeployment are left out of
   the hash: a label edit moves no generation, and in the pod template it would restart
   every replica, so it reaches the children with their next change.
4. The status mirrors the Deployment (`serving_status.compute_serving_status`): Ready only
   when a replica of the current template is ready and no pod is crash-looping.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment
from kubetune.operator.cache import Cache, Key
from kubetune.operator.kube import MODELDEPLOYMENTS, Kube
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.serving import ServingError
from kubetune.operator.serving_checks import ClusterFeatures
from kubetune.operator.serving_objects import ServingChildren, build_serving
from kubetune.operator.serving_resolve import referenced_jobs, resolve
from kubetune.operator.serving_status import (
    ReadyReason,
    compute_serving_status,
    load_serving_status,
    serving_status_patch,
)
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.workqueue import backoff

logger = logging.getLogger("kubetune.operator")

ANNOTATION_DESIRED = "kubetune.io/desired-hash"
"""On the Deployment: the hash of what the operator last wanted it to be."""
OPTIONAL_KINDS = ("HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor")
NORMAL_REASONS = frozenset({ReadyReason.DEPLOYING.value, ReadyReason.SCALED_TO_ZERO.value})
"""Ready False for these is the normal course (a rollout, no replica wanted): their Events
are Normal, so alerts on Warning Events fire for problems only."""


def desired_hash(obj: Mapping[str, Any]) -> str:
    """A stable hash of a desired object (its rendering is deterministic)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def without_labels(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """A desired Deployment without the labels of its metadata and pod template: besides
    the ModelDeployment's own labels (which never change for a name) they are the ones
    copied from its metadata."""
    copied: dict[str, Any] = json.loads(json.dumps(deployment))
    copied["metadata"].pop("labels", None)
    copied["spec"]["template"]["metadata"].pop("labels", None)
    return copied


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


@dataclass
class ServingReconciler:
    """Reconciles ModelDeployments by key (the serving work queue's `process`)."""

    cache: Cache
    kube: Kube
    settings: OperatorSettings
    metrics: OperatorMetrics
    features: ClusterFeatures = field(default_factory=ClusterFeatures)
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    _waiting: dict[Key, int] = field(default_factory=dict)
    _ready: dict[Key, str] = field(default_factory=dict)
    _ready_counts: Counter[str] = field(default_factory=Counter)

    async def __call__(self, key: Hashable) -> float | None:
        assert isinstance(key, tuple)
        return await self.metrics.timed("ModelDeployment", self.reconcile(key))

    async def reconcile(self, key: Key) -> float | None:
        """One pass over a ModelDeployment; returns seconds until it needs another look."""
        body = self.cache.modeldeployments.get(key)
        if body is None or _meta(body).get("deletionTimestamp"):
            self._waiting.pop(key, None)
            self._set_ready(key, None)
            return None  # children go by garbage collection
        try:
            md = ModelDeployment.model_validate(body)
        except ValidationError as error:
            self.metrics.record_error(Reason.INVALID_SPEC.value)
            logger.warning("ModelDeployment %s/%s does not validate: %s", *key, error)
            return None
        previous = load_serving_status(body.get("status"))
        generation = int(_meta(body).get("generation") or 0)
        deployment, pods = self.cache.serving(key)
        outcome: ServingChildren | ServingError
        try:
            outcome = build_serving(md, resolve(md, self.cache.finetunejobs), self.settings,
                                    self.features)  # fmt: skip
        except ServingError as error:
            outcome = error
        if isinstance(outcome, ServingChildren):
            if deployment is None and await self.kube.current_uid(
                MODELDEPLOYMENTS, key[0], key[1]
            ) != _meta(body).get("uid"):
                return None  # deleted meanwhile: never re-create what it would have owned
            changed = previous is None or previous.observed_generation != generation
            deployment = await self._apply(outcome, deployment, changed) or deployment
        new = compute_serving_status(
            md,
            generation,
            previous,
            deployment,
            pods,
            outcome.plan if isinstance(outcome, ServingChildren) else outcome,
            self.clock(),
        )
        patch = serving_status_patch(body.get("status"), new)
        if patch is not None:
            written = await self.kube.patch_modeldeployment_status(key[0], key[1], patch)
            if written is not None:
                # The next pass must start from this status, even when it runs before the
                # watch event of this write (a Deployment's or a pod's often comes first):
                # else it writes the same status and records the same Event again.
                self.cache.observe_modeldeployment(written, False, referenced_jobs(md))
        await self._events(body, previous, new)
        ready = next((c.status.value for c in new.conditions or [] if c.type == "Ready"), None)
        self._set_ready(key, ready or "Unknown")
        if isinstance(outcome, ServingError) and outcome.waiting:
            attempts = self._waiting.get(key, 0) + 1
            self._waiting[key] = attempts
            return backoff(attempts)
        self._waiting.pop(key, None)
        return None

    def _set_ready(self, key: Key, ready: str | None) -> None:
        """Update the readiness gauge by this ModelDeployment's change only."""
        previous = self._ready.pop(key, None)
        if ready is not None:
            self._ready[key] = ready
        if previous == ready:
            return
        if previous is not None:
            self._ready_counts[previous] -= 1
        if ready is not None:
            self._ready_counts[ready] += 1
        self.metrics.set_deployments_by_readiness(self._ready_counts)

    async def _apply(
        self,
        children: ServingChildren,
        live: Mapping[str, Any] | None,
        generation_changed: bool,
    ) -> dict[str, Any] | None:
        """Make the children match; returns the Deployment as written, if it was. The
        children besides the Deployment (not watched) are written when the Deployment is
        new or the ModelDeployment's generation moved, not on every pass."""
        written = None
        settled = live is not None and not generation_changed
        for obj in children.objects:
            if obj["kind"] == "Deployment":
                written = await self._apply_deployment(obj, live, children)
            elif not settled:
                created = await self.kube.create(obj)
                immutable = obj["kind"] == "PersistentVolumeClaim"
                if not created and generation_changed and not immutable:
                    await self.kube.patch(obj)
        if generation_changed:
            wanted = {o["kind"] for o in children.objects}
            meta = children.deployment["metadata"]
            for kind in OPTIONAL_KINDS:
                if (
                    kind not in wanted
                    and not (kind == "ServiceMonitor" and not self.features.servicemonitor_crd)
                    and not (kind == "ScaledObject" and not self.features.keda_installed)
                ):
                    await self.kube.delete_child(kind, meta["namespace"], meta["name"])
        return written

    async def _apply_deployment(
        self,
        desired: dict[str, Any],
        live: Mapping[str, Any] | None,
        children: ServingChildren,
    ) -> dict[str, Any] | None:
        """Create or replace the Deployment when what is wanted of it changed."""
        desired = json.loads(json.dumps(desired))
        digest = desired_hash(without_labels(desired))
        desired["metadata"].setdefault("annotations", {})[ANNOTATION_DESIRED] = digest
        if live is None:
            await self.kube.create(desired)
            return desired
        if (_meta(live).get("annotations") or {}).get(ANNOTATION_DESIRED) == digest:
            return None
        if children.autoscaler is not None and "replicas" in (live.get("spec") or {}):
            desired["spec"]["replicas"] = live["spec"]["replicas"]  # the autoscaler's
        await self.kube.replace(desired, str(_meta(live)["resourceVersion"]))
        return None

    async def _events(self, body: Mapping[str, Any], previous: Any, new: Any) -> None:
        """An Event whenever the Ready condition changes status or reason."""

        def ready(status: Any) -> tuple[str, str, str] | None:
            for condition in (status.conditions or []) if status is not None else []:
                if condition.type == "Ready":
                    return condition.status.value, condition.reason, condition.message
            return None

        before, after = ready(previous), ready(new)
        if after is not None and (before is None or before[:2] != after[:2]):
            normal = after[0] in ("True", "Unknown") or after[1] in NORMAL_REASONS
            kind = "Normal" if normal else "Warning"
            await self.kube.post_event(body, kind, after[1], after[2] or after[1])
