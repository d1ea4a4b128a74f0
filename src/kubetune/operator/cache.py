"""What the operator has seen: FineTuneJobs, their Jobs and their Pods, kept current by
watch events.

Reconciling reads only from here, never from the API server, so a reconcile costs no
requests unless it writes something. Jobs and Pods are grouped under the FineTuneJob they
belong to (the `kubetune.io/finetunejob` label the builders put on every child).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator import names

Key = tuple[str, str]
"""(namespace, FineTuneJob name)."""


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def owner_key(body: Mapping[str, Any], label: str = names.LABEL_FINETUNEJOB) -> Key | None:
    """The FineTuneJob (or, with `label`, the ModelDeployment) a child belongs to, from its
    label; None for other objects."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(label)
    return (str(meta.get("namespace", "")), str(owner)) if owner else None


def controller_uid(body: Mapping[str, Any]) -> str | None:
    """The uid of an object's controller (its ownerReference with `controller: true`)."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def _children() -> dict[Key, dict[str, dict[str, Any]]]:
    return defaultdict(dict)


def older(body: Mapping[str, Any], cached: Mapping[str, Any] | None) -> bool:
    """Whether `body` is an older version of the same object than `cached`.

    The operator stores the result of its own status writes, so a watch event still in
    flight from before that write must not replace it. resourceVersions are etcd revisions,
    integers that only grow; a value that is not an integer is never called older.
    """
    if cached is None:
        return False
    meta, cached_meta = body.get("metadata") or {}, cached.get("metadata") or {}
    if meta.get("uid") != cached_meta.get("uid"):
        return False
    new, old = str(meta.get("resourceVersion", "")), str(cached_meta.get("resourceVersion", ""))
    return new.isdigit() and old.isdigit() and int(new) < int(old)


@dataclass
class Cache:
    """FineTuneJobs and ModelDeployments by key; their Jobs, Deployments and Pods by owner
    key, then by name; which ModelDeployments serve from which FineTuneJob."""

    finetunejobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=_children)
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=_children)
    modeldeployments: dict[Key, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=_children)
    serving_pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=_children)
    servers_of: dict[Key, set[Key]] = field(default_factory=lambda: defaultdict(set))
    """FineTuneJob key → keys of the ModelDeployments referencing it."""

    def observe_finetunejob(self, body: Mapping[str, Any], deleted: bool) -> Key:
        """Keep a FineTuneJob (from a watch event, or as the operator's own status write
        returned it), unless the cache already holds a newer version of it."""
        key = key_of(body)
        if deleted:
            self.finetunejobs.pop(key, None)
        elif not older(body, self.finetunejobs.get(key)):
            self.finetunejobs[key] = dict(body)
        return key

    def observe_modeldeployment(
        self, body: Mapping[str, Any], deleted: bool, references: set[str]
    ) -> Key:
        """Record a ModelDeployment (from a watch event, or as the operator's own status
        write returned it) and the FineTuneJobs it references, unless the cache already
        holds a newer version of it."""
        key = key_of(body)
        if not deleted and older(body, self.modeldeployments.get(key)):
            return key
        for servers in self.servers_of.values():
            servers.discard(key)
        if deleted:
            self.modeldeployments.pop(key, None)
        else:
            self.modeldeployments[key] = dict(body)
            for name in references:
                self.servers_of[(key[0], name)].add(key)
        return key

    def observe_deployment(self, body: Mapping[str, Any], deleted: bool) -> Key | None:
        return self._observe_child(self.deployments, body, deleted, names.LABEL_MODELDEPLOYMENT)

    def serving(self, key: Key) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(Deployment, pods) of a ModelDeployment."""
        deployments = list(self.deployments.get(key, {}).values())
        return (deployments[0] if deployments else None), list(
            self.serving_pods.get(key, {}).values()
        )

    def _observe_child(
        self,
        store: dict[Key, dict[str, dict[str, Any]]],
        body: Mapping[str, Any],
        deleted: bool,
        label: str = names.LABEL_FINETUNEJOB,
    ) -> Key | None:
        owner = owner_key(body, label)
        if owner is None:
            return None
        name = str((body.get("metadata") or {}).get("name", ""))
        if deleted:
            store[owner].pop(name, None)
            if not store[owner]:
                del store[owner]
        else:
            store[owner][name] = dict(body)
        return owner

    def observe_job(self, body: Mapping[str, Any], deleted: bool) -> Key | None:
        return self._observe_child(self.jobs, body, deleted)

    def observe_pod(self, body: Mapping[str, Any], deleted: bool) -> tuple[str, Key] | None:
        """Record a trainer, cleanup or serving pod; returns ("FineTuneJob" or
        "ModelDeployment", owner key)."""
        if owner_key(body, names.LABEL_MODELDEPLOYMENT) is not None:
            owner = self._observe_child(
                self.serving_pods, body, deleted, names.LABEL_MODELDEPLOYMENT
            )
            return ("ModelDeployment", owner) if owner else None
        owner = self._observe_child(self.pods, body, deleted)
        return ("FineTuneJob", owner) if owner else None

    def children(
        self, key: Key, owner_uid: str | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(jobs, pods) of a FineTuneJob; with `owner_uid`, without those another object
        controls: Jobs of another FineTuneJob object, pods of such Jobs.

        Children are found by name (their label), but a FineTuneJob deleted and created
        again under the same name is another object: the old one's Jobs and pods, still
        being collected or kept here by a relist after `410 Gone` (which reports no
        deletions), are not the new one's to track.
        """
        jobs = list(self.jobs.get(key, {}).values())
        pods = list(self.pods.get(key, {}).values())
        if owner_uid is None:
            return jobs, pods
        jobs = [job for job in jobs if controller_uid(job) in (None, owner_uid)]
        owners = {None, owner_uid} | {(job.get("metadata") or {}).get("uid") for job in jobs}
        return jobs, [pod for pod in pods if controller_uid(pod) in owners]
