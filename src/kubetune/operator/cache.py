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


def owner_key(body: Mapping[str, Any]) -> Key | None:
    """The FineTuneJob a child belongs to, from its label; None for other objects."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(names.LABEL_FINETUNEJOB)
    return (str(meta.get("namespace", "")), str(owner)) if owner else None


@dataclass
class Cache:
    """FineTuneJobs by key; Jobs and Pods by owner key, then by name."""

    finetunejobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))

    def observe_finetunejob(self, body: Mapping[str, Any], deleted: bool) -> Key:
        key = key_of(body)
        if deleted:
            self.finetunejobs.pop(key, None)
        else:
            self.finetunejobs[key] = dict(body)
        return key

    def _observe_child(
        self, store: dict[Key, dict[str, dict[str, Any]]], body: Mapping[str, Any], deleted: bool
    ) -> Key | None:
        owner = owner_key(body)
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

    def observe_pod(self, body: Mapping[str, Any], deleted: bool) -> Key | None:
        return self._observe_child(self.pods, body, deleted)

    def children(self, key: Key) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(jobs, pods) of a FineTuneJob."""
        jobs = list(self.jobs.get(key, {}).values())
        pods = list(self.pods.get(key, {}).values())
        return jobs, pods
