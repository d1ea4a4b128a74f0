"""A stateful fake Kubernetes API server for built-in kinds, over real HTTP on 127.0.0.1.

The real ``apiextensions-apiserver`` (``support/apiserver.py``) serves only CRDs and custom
resources, but the operator also creates Jobs, Pods, ConfigMaps, Services, Deployments... No
kube-apiserver binary can be installed offline, so this server keeps built-in objects in memory
and implements the API semantics controllers (kopf, the kubernetes client) rely on:

- discovery (``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>[/<version>]``) for the kinds in
  :data:`BUILTIN_RESOURCES`;
- create (201, ``409 AlreadyExists``, ``generateName``, uid, creationTimestamp, generation),
  get, list, watch, update (PUT), patch, delete and deletecollection, with the ``status``
  subresource where Kubernetes has one (a write to the main resource keeps the old status, a
  write to ``/status`` changes only the status);
- one global ``resourceVersion`` counter bumped on every write, ``409 Conflict`` for a stale
  ``metadata.resourceVersion`` in PUT or PATCH bodies, no-op writes that change nothing;
- ``generation`` bumped when anything outside ``metadata`` and ``status`` changes;
- JSON merge patch, JSON patch (RFC 6902, with ``test``: a failed test is 422 as kopf expects)
  and an approximation of strategic merge patch (see :func:`strategic_merge_patch`);
- label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``, ``>``, ``<``)
  and field selectors (``a.b=v`` / ``a.b!=v`` on any dotted path) on list, watch and
  deletecollection;
- watch streams (ADDED / MODIFIED / DELETED, translated per watcher when an object starts or
  stops matching its selector), resuming from a ``resourceVersion`` out of a bounded event
  history (``410 Gone`` when it is older than the history), ``timeoutSeconds``,
  ``sendInitialEvents`` with the closing BOOKMARK;
- finalizers (delete sets ``deletionTimestamp``; the object goes when the last finalizer is
  removed) and ownerReference garbage collection: deleting an owner deletes its dependents
  (``Background``), or strips the reference from them (``Orphan``). batch/v1 Jobs orphan their
  Pods unless ``propagationPolicy`` says otherwise, as on a real cluster. Owners outside this
  server (custom resources in the CRD server) are reported with
  :meth:`FakeKubeServer.owner_deleted`;
- name, label and size validation (422 with the API server's wording for the common cases);
- per ``(verb, resource)`` request counts, and injected errors for the next N requests of a
  verb and resource (to test how an operator handles a failing API).

Not emulated (a test that needs one of these must arrange it itself): controllers (a Job never
gets Pods, a Deployment never gets replicas: tests write ``status`` through the status
subresource), defaulting and schema validation of built-in kinds (validate rendered manifests
offline with ``kubernetes-validate``), server-side apply (415), ``dryRun`` (400), pagination
(``limit`` is ignored and the whole list returned), Table/protobuf output, graceful deletion
(Pods go at once), Namespace lifecycle (objects may be created in a namespace that does not
exist; deleting a Namespace deletes its objects at once), garbage collection of dependents
whose owner never existed, and Foreground deletion (treated as Background). Core v1 Events and
events.k8s.io/v1 Events are separate collections here.

Why plain aiohttp and not kmock 0.8 (the Kubernetes mock by kopf's author): its request
parser raises on ``GET /api/v1/namespaces`` and reads ``/api/v1/namespaces/<name>`` as a
namespace without a resource, and its ``KubernetesEmulator`` stores dict-merged versions without
resourceVersions, so the request parsing and every handler (create, update, patch, delete,
list, watch) would have to be replaced.

    from support.kubefake import FakeKubeServer

    with FakeKubeServer() as fake:
        fake.base_url                      # http://127.0.0.1:PORT, no authentication
        fake.request_counts()              # {("create", "jobs.batch"): 1, ...}
        fake.inject_error("create", "jobs.batch", status=500)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import json
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from aiohttp import web

__all__ = [
    "BUILTIN_RESOURCES",
    "ApiError",
    "ApiPath",
    "FakeKubeServer",
    "LabelRequirement",
    "LoopThread",
    "ObjectStore",
    "PatchError",
    "ResourceType",
    "count_key",
    "json_patch",
    "match_fields",
    "match_labels",
    "merge_patch",
    "parse_api_path",
    "parse_field_selector",
    "parse_label_selector",
    "request_verb",
    "strategic_merge_patch",
]

T = TypeVar("T")
Obj = dict[str, Any]

# ---------------------------------------------------------------------------- resource types

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

_NAME_RULES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "subdomain": (
        _DNS1123_SUBDOMAIN,
        253,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
        "'-' or '.', and must start and end with an alphanumeric character",
    ),
    "label": (
        _DNS1123_LABEL,
        63,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
        "'-', and must start and end with an alphanumeric character",
    ),
    "dns1035": (
        _DNS1035_LABEL,
        63,
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start "
        "with an alphabetic character, and end with an alphanumeric character",
    ),
}

VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    """One served resource (what discovery lists) and the per-kind rules the fake applies."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    #: ``subdomain`` (most kinds), ``label`` (Namespaces) or ``dns1035`` (Services).
    name_rule: str = "subdomain"
    #: Longest name the API server accepts (Jobs: 63, for their ``job-name`` label).
    max_name_length: int = 253
    #: What a DELETE without ``propagationPolicy`` does to dependents.
    default_propagation: str = "Background"
    #: Status a new object gets (the status of a create request is dropped).
    initial_status: Mapping[str, Any] | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """``plural.group`` (``jobs.batch``), or the plural alone for the core group."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def collection_path(self, namespace: str | None = None) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            return f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{prefix}/{self.plural}"

    def object_path(self, name: str, namespace: str | None = None) -> str:
        return f"{self.collection_path(namespace)}/{name}"


BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        subresources=("status",),
        short_names=("ns",),
        name_rule="label",
        max_name_length=63,
        initial_status={"phase": "Active"},
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType(
        "",
        "v1",
        "services",
        "Service",
        subresources=("status",),
        short_names=("svc",),
        name_rule="dns1035",
        max_name_length=63,
        initial_status={"loadBalancer": {}},
    ),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        subresources=("status",),
        short_names=("po",),
        initial_status={"phase": "Pending"},
    ),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        subresources=("status",),
        short_names=("pvc",),
        initial_status={"phase": "Pending"},
    ),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType(
        "batch",
        "v1",
        "jobs",
        "Job",
        subresources=("status",),
        max_name_length=63,
        default_propagation="Orphan",
        initial_status={},
    ),
    ResourceType(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        subresources=("status",),
        short_names=("deploy",),
        initial_status={},
    ),
    ResourceType(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        subresources=("status",),
        short_names=("pdb",),
        initial_status={},
    ),
    ResourceType(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        "HorizontalPodAutoscaler",
        subresources=("status",),
        short_names=("hpa",),
        initial_status={},
    ),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
)

# ----------------------------------------------------------------------------- paths, verbs


@dataclass(frozen=True)
class ApiPath:
    """A parsed ``/api/...`` or ``/apis/...`` path; ``plural`` is None for discovery paths.

    ``group`` is ``""`` for the core group (``/api/...``) and None for ``/apis`` itself.
    """

    group: str | None
    version: str | None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath | None:
    """Split an API path into its parts; None for non-API paths (``/version``, ``/healthz``).

    ``/api/v1/namespaces/NAME`` is the Namespace NAME (not a namespace prefix without a
    resource), ``/api/v1/namespaces/NAME/status`` its status subresource.
    """
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return None
    if parts[0] == "api":
        group, rest = "", parts[1:]
    else:
        if len(parts) == 1:
            return ApiPath(group=None, version=None)  # /apis (the group list)
        group, rest = parts[1], parts[2:]
    if not rest:
        return ApiPath(group=group, version=None)
    version, rest = rest[0], rest[1:]
    if not rest:
        return ApiPath(group=group, version=version)
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return ApiPath(group, version, plural, namespace, name, subresource)


def _is_true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def request_verb(method: str, api_path: ApiPath, query: Mapping[str, str]) -> str:
    """The Kubernetes verb of a request (``get``, ``list``, ``watch``, ``create``...)."""
    method = method.upper()
    if method == "GET":
        if _is_true(query.get("watch")):
            return "watch"
        return "get" if api_path.name else "list"
    if method == "POST":
        return "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete" if api_path.name else "deletecollection"
    return method.lower()


def count_key(method: str, path: str, query: Mapping[str, str]) -> tuple[str, str]:
    """``(verb, resource)`` for request counting.

    The resource is ``plural[.group][/subresource]`` (``jobs.batch``, ``pods/status``,
    ``finetunejobs.kubetune.io/status``); discovery and other non-resource requests are
    counted as ``("get", PATH)``.
    """
    api_path = parse_api_path(path)
    if api_path is None or api_path.plural is None:
        return method.lower(), path
    resource = f"{api_path.plural}.{api_path.group}" if api_path.group else api_path.plural
    if api_path.subresource:
        resource += f"/{api_path.subresource}"
    return request_verb(method, api_path, query), resource


# ------------------------------------------------------------------------------- selectors

_LABEL_KEY = r"(?:[A-Za-z0-9.-]+/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQ_SET = re.compile(rf"^({_LABEL_KEY})\s+(in|notin)\s+\(([^()]*)\)$")
_REQ_EQ = re.compile(rf"^({_LABEL_KEY})\s*(==|!=|=|>|<)\s*({_LABEL_VALUE})$")
_REQ_NOT_EXISTS = re.compile(rf"^!\s*({_LABEL_KEY})$")
_REQ_EXISTS = re.compile(rf"^({_LABEL_KEY})$")
_LABEL_VALUE_FULL = re.compile(rf"^{_LABEL_VALUE}$")


@dataclass(frozen=True)
class LabelRequirement:
    """One requirement of a label selector; ``op`` is in/notin/exists/!exists/gt/lt."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "in":
            return value is not None and value in self.values
        if self.op == "notin":
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        (bound,) = self.values
        try:
            number = int(value) if value is not None else None
        except ValueError:
            return False
        if number is None:
            return False
        return number > int(bound) if self.op == "gt" else number < int(bound)


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside ``in (...)`` value lists."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[LabelRequirement]:
    """Parse a label selector string; raises ValueError naming the bad requirement."""
    reqs: list[LabelRequirement] = []
    for part in _split_selector(text or ""):
        if m := _REQ_SET.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(","))
            for value in values:
                if not _LABEL_VALUE_FULL.match(value):
                    raise ValueError(f"unable to parse requirement: invalid label value {value!r}")
            reqs.append(LabelRequirement(m.group(1), m.group(2), values))
        elif m := _REQ_EQ.match(part):
            key, op, value = m.groups()
            if op in (">", "<"):
                if not value.isdigit():
                    raise ValueError(
                        f"unable to parse requirement: for 'gt', 'lt' operators, the value must "
                        f"be an integer: {part!r}"
                    )
                reqs.append(LabelRequirement(key, "gt" if op == ">" else "lt", frozenset([value])))
            else:
                reqs.append(
                    LabelRequirement(key, "notin" if op == "!=" else "in", frozenset([value]))
                )
        elif m := _REQ_NOT_EXISTS.match(part):
            reqs.append(LabelRequirement(m.group(1), "!exists"))
        elif m := _REQ_EXISTS.match(part):
            reqs.append(LabelRequirement(m.group(1), "exists"))
        else:
            raise ValueError(f"unable to parse requirement: {part!r}")
    return reqs


def match_labels(obj: Mapping[str, Any], reqs: Iterable[LabelRequirement]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(req.matches(labels) for req in reqs)


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    """``a.b=v,c!=w`` -> ``[("a.b", True, "v"), ("c", False, "w")]``."""
    out: list[tuple[str, bool, str]] = []
    for part in _split_selector(text or ""):
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*)$", part)
        if not m:
            raise ValueError(f"invalid field selector: {part!r}")
        out.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return out


def _dotted(obj: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _field_text(value: Any) -> str:
    """A field's value as the API server compares it in a field selector."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def match_fields(obj: Mapping[str, Any], reqs: Iterable[tuple[str, bool, str]]) -> bool:
    return all((_field_text(_dotted(obj, path)) == value) == equal for path, equal, value in reqs)


# --------------------------------------------------------------------------------- patches


class PatchError(ValueError):
    """A patch that cannot be applied (JSON patch test failure, missing path...)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value, never mutates its arguments."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists merged by key in strategic merge patch (patchMergeKey in the Kubernetes types).
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "volumes": ("name",),
    "env": ("name",),
    "envFrom": (),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "ports": ("containerPort", "port"),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "imagePullSecrets": ("name",),
    "hostAliases": ("ip",),
    "containerStatuses": ("name",),
    "initContainerStatuses": ("name",),
    "secrets": ("name",),
}
# Lists of scalars merged as sets (patchStrategy: merge).
_MERGE_SETS = frozenset({"finalizers"})


def _list_merge_key(name: str, items: list[Any]) -> str | None:
    for key in _MERGE_KEYS.get(name, ()):
        if items and all(isinstance(i, dict) and key in i for i in items):
            return key
    return None


def strategic_merge_patch(target: Any, patch: Any, field_name: str = "") -> Any:
    """An approximation of Kubernetes' strategic merge patch.

    Like a JSON merge patch, except that: lists known to be merged by a key in the Kubernetes
    types (``containers``/``volumes``/``env``/``imagePullSecrets`` by ``name``,
    ``volumeMounts`` by ``mountPath``, ``ports`` by ``containerPort`` or ``port``,
    ``conditions`` by ``type``, ``ownerReferences`` by ``uid``...) are merged item by item,
    items with ``$patch: delete`` are removed from them; ``metadata.finalizers`` is merged as a
    set; a map with ``$patch: replace`` replaces the target. Other directives
    (``$retainKeys``, ``$setElementOrder``, ``$deleteFromPrimitiveList``) are ignored. Unlike
    the real thing, the merge keys do not depend on the object's type, only on field names.
    """
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
        if patch.get("$patch") == "delete":
            return None
        result = copy.deepcopy(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            else:
                merged = strategic_merge_patch(result.get(key), value, key)
                if merged is None:
                    result.pop(key, None)
                else:
                    result[key] = merged
        return result
    if isinstance(patch, list) and isinstance(target, list):
        if field_name in _MERGE_SETS:
            out = list(target)
            out.extend(v for v in patch if v not in out)
            return out
        key = _list_merge_key(field_name, [*target, *patch])
        if key is not None:
            merged_items = [copy.deepcopy(i) for i in target]
            for item in patch:
                index = next(
                    (i for i, cur in enumerate(merged_items) if cur.get(key) == item.get(key)),
                    None,
                )
                if item.get("$patch") == "delete":
                    if index is not None:
                        merged_items.pop(index)
                elif index is None:
                    merged_items.append(strategic_merge_patch(None, item))
                else:
                    merged_items[index] = strategic_merge_patch(merged_items[index], item)
            return merged_items
    if isinstance(patch, list):
        return [strategic_merge_patch(None, i) if isinstance(i, dict) else i for i in patch]
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve_parent(doc: Any, tokens: list[str], path: str) -> tuple[Any, str]:
    cur = doc
    for tok in tokens[:-1]:
        if isinstance(cur, dict) and tok in cur:
            cur = cur[tok]
        elif isinstance(cur, list) and tok.isdigit() and int(tok) < len(cur):
            cur = cur[int(tok)]
        else:
            raise PatchError(f"doc is missing path: {path!r}")
    return cur, tokens[-1]


def _get(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return doc
    parent, last = _resolve_parent(doc, tokens, path)
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise PatchError(f"doc is missing path: {path!r}")


def _remove(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent, last = _resolve_parent(doc, tokens, path)
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise PatchError(f"unable to remove nonexistent key: {path!r}: missing value")


def _add(doc: Any, path: str, value: Any, replace: bool = False) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent, last = _resolve_parent(doc, tokens, path)
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"replace operation does not apply: doc is missing key: {path!r}")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = value
            else:
                parent.insert(int(last), value)
        else:
            raise PatchError(f"index out of range in {path!r}")
    else:
        raise PatchError(f"doc is missing path: {path!r}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch; returns a new document, raises PatchError on failure."""
    if not isinstance(ops, list):
        raise TypeError("a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise TypeError(f"invalid JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            result = _add(result, path, copy.deepcopy(op.get("value")))
        elif kind == "replace":
            result = _add(result, path, copy.deepcopy(op.get("value")), replace=True)
        elif kind == "remove":
            _remove(result, path)
        elif kind == "move":
            result = _add(result, path, _remove(result, op["from"]))
        elif kind == "copy":
            result = _add(result, path, copy.deepcopy(_get(result, op["from"])))
        elif kind == "test":
            if _get(result, path) != op.get("value"):
                raise PatchError(f"testing value {path} failed")
        else:
            raise TypeError(f"unknown JSON patch operation {kind!r}")
    return result


# ---------------------------------------------------------------------------------- errors

_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}


class ApiError(Exception):
    """An error answered as a ``Status`` object, as the API server does."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = dict(details or {})

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(rtype: ResourceType, name: str, causes: list[Obj] | None = None) -> Obj:
    out: Obj = {"name": name, "group": rtype.group, "kind": rtype.plural}
    if causes:
        out["causes"] = causes
    return out


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rtype.key} "{name}" not found', details=_details(rtype, name))


def _conflict(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {rtype.key} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details=_details(rtype, name),
    )


def _invalid(rtype: ResourceType, name: str, causes: list[tuple[str, str]]) -> ApiError:
    text = "; ".join(f"{f}: {m}" for f, m in causes)
    return ApiError(
        422,
        f'{rtype.kind} "{name}" is invalid: {text}',
        details=_details(
            rtype,
            name,
            [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes],
        ),
    )


# ----------------------------------------------------------------------------- validation

_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_MAX_CONFIG_BYTES = 1024 * 1024
_MAX_ANNOTATION_BYTES = 256 * 1024


def _validate_name(rtype: ResourceType, name: str) -> list[tuple[str, str]]:
    pattern, limit, hint = _NAME_RULES[rtype.name_rule]
    limit = min(limit, rtype.max_name_length)
    causes: list[tuple[str, str]] = []
    if len(name) > limit:
        causes.append(
            ("metadata.name", f'Invalid value: "{name}": must be no more than {limit} characters')
        )
    if not pattern.match(name):
        causes.append(("metadata.name", f'Invalid value: "{name}": {hint}'))
    return causes


def _validate_label_key(key: str, where: str) -> list[tuple[str, str]]:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))) or (
        len(name) > 63 or not _QUALIFIED_NAME.match(name)
    ):
        return [
            (
                where,
                f'Invalid value: "{key}": name part must consist of alphanumeric characters, '
                "'-', '_' or '.', and must start and end with an alphanumeric character, "
                "at most 63 characters, with an optional DNS subdomain prefix and '/'",
            )
        ]
    return []


def _validate_metadata(rtype: ResourceType, obj: Obj) -> list[tuple[str, str]]:
    meta = obj["metadata"]
    causes = _validate_name(rtype, meta["name"])
    for key, value in (meta.get("labels") or {}).items():
        causes += _validate_label_key(key, "metadata.labels")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_FULL.match(value):
            causes.append(
                (
                    "metadata.labels",
                    f'Invalid value: "{value}": a valid label must be an empty string or consist '
                    "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                    "alphanumeric character, at most 63 characters",
                )
            )
    annotations = meta.get("annotations") or {}
    for key in annotations:
        causes += _validate_label_key(key, "metadata.annotations")
    size = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if size > _MAX_ANNOTATION_BYTES:
        causes.append(
            ("metadata.annotations", f"Too long: must have at most {_MAX_ANNOTATION_BYTES} bytes")
        )
    if rtype.plural in ("configmaps", "secrets"):
        data_size = sum(
            len(k) + len(str(v))
            for part in ("data", "binaryData", "stringData")
            for k, v in (obj.get(part) or {}).items()
        )
        if data_size > _MAX_CONFIG_BYTES:
            causes.append(("", f"Too long: must have at most {_MAX_CONFIG_BYTES} bytes"))
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for required in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(required):
                causes.append((f"metadata.ownerReferences[{i}].{required}", "Required value"))
    return causes


# ------------------------------------------------------------------------------------ store


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _content(obj: Mapping[str, Any]) -> Obj:
    """What ``generation`` tracks: everything outside metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _without_rv(obj: Mapping[str, Any]) -> Obj:
    out = dict(obj)
    out["metadata"] = {
        k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"
    }
    return out


@dataclass(frozen=True)
class StoredEvent:
    """One write, kept for watch resumption: the object after it (and before it)."""

    rv: int
    rtype_key: str
    type: str
    obj: Obj
    old: Obj | None


@dataclass
class Watch:
    """A subscription of one watch stream; events are pushed into ``queue`` (None ends it)."""

    rtype: ResourceType
    namespace: str | None
    labels: list[LabelRequirement]
    fields: list[tuple[str, bool, str]]
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return match_labels(obj, self.labels) and match_fields(obj, self.fields)

    def translate(self, etype: str, obj: Obj, old: Obj | None) -> Obj | None:
        """The event this watcher sees: a MODIFIED into or out of its selector becomes
        ADDED or DELETED, as the API server's watch cache does."""
        now, before = self.matches(obj), self.matches(old)
        if etype == "MODIFIED":
            if now and not before:
                etype = "ADDED"
            elif before and not now:
                etype = "DELETED"
            elif not now:
                return None
        elif not now:
            return None
        return {"type": etype, "object": obj}

    def push(self, etype: str, obj: Obj, old: Obj | None) -> None:
        event = self.translate(etype, obj, old)
        if event is not None:
            self.queue.put_nowait(event)


class ObjectStore:
    """In-memory objects with the API server's write semantics. Not thread-safe: use it from
    one thread (the server's event loop). Stored dicts are never mutated: every write stores
    a new dict, so readers can serialize what they got without copying."""

    def __init__(
        self,
        resources: Iterable[ResourceType] = BUILTIN_RESOURCES,
        *,
        history: int = 20000,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.resources = {r.key: r for r in resources}
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in self.resources}
        self._rv = 0
        self._history: collections.deque[StoredEvent] = collections.deque(maxlen=history)
        self._compacted_rv = 0
        self._watches: list[Watch] = []
        self._uids: dict[str, tuple[str, str, str]] = {}
        self._dead_uids: set[str] = set()
        self._pending_policy: dict[str, str] = {}
        self._schedule = schedule or (lambda fn: fn())

    # ------------------------------------------------------------------ helpers
    @property
    def resource_version(self) -> int:
        return self._rv

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, rtype: ResourceType, etype: str, obj: Obj, old: Obj | None) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted_rv = self._history[0].rv
        self._history.append(StoredEvent(self._rv, rtype.key, etype, obj, old))
        for watch in list(self._watches):
            if watch.rtype.key == rtype.key:
                watch.push(etype, obj, old)

    def _bucket(self, rtype: ResourceType) -> dict[tuple[str, str], Obj]:
        return self._objects[rtype.key]

    @staticmethod
    def _ns(rtype: ResourceType, namespace: str | None) -> str:
        return (namespace or "") if rtype.namespaced else ""

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._bucket(rtype).get((self._ns(rtype, namespace), name))
        if obj is None:
            raise _not_found(rtype, name)
        return obj

    def find(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj | None:
        return self._bucket(rtype).get((self._ns(rtype, namespace), name))

    def select(
        self,
        rtype: ResourceType,
        namespace: str | None = None,
        labels: list[LabelRequirement] | None = None,
        fields: list[tuple[str, bool, str]] | None = None,
    ) -> list[Obj]:
        out = []
        for (ns, _), obj in sorted(self._bucket(rtype).items()):
            if namespace is not None and rtype.namespaced and ns != namespace:
                continue
            if match_labels(obj, labels or []) and match_fields(obj, fields or []):
                out.append(obj)
        return out

    def all_objects(self) -> Iterator[tuple[ResourceType, Obj]]:
        for key, bucket in self._objects.items():
            for obj in bucket.values():
                yield self.resources[key], obj

    # ------------------------------------------------------------------- create
    def create(self, rtype: ResourceType, namespace: str | None, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object")
        self._check_kind(rtype, obj)
        ns = self._namespace_for(rtype, namespace, meta)
        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise _invalid(
                    rtype,
                    "",
                    [("metadata.name", "Required value: name or generateName is required")],
                )
            name = self._generate_name(rtype, ns, prefix)
        if (ns, name) in self._bucket(rtype):
            raise ApiError(
                409,
                f'{rtype.key} "{name}" already exists',
                reason="AlreadyExists",
                details=_details(rtype, name),
            )
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(key, None)
        meta["name"] = name
        if rtype.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if rtype.has_status:
            obj["status"] = copy.deepcopy(dict(rtype.initial_status or {}))
        if rtype.plural == "secrets":
            _fold_string_data(obj)
        causes = _validate_metadata(rtype, obj)
        if causes:
            raise _invalid(rtype, name, causes)
        meta["resourceVersion"] = self._next_rv()
        self._bucket(rtype)[(ns, name)] = obj
        self._uids[meta["uid"]] = (rtype.key, ns, name)
        self._record(rtype, "ADDED", obj, None)
        return obj

    @staticmethod
    def _check_kind(rtype: ResourceType, obj: Obj) -> None:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if (kind and kind != rtype.kind) or (api_version and api_version != rtype.api_version):
            raise ApiError(
                400,
                f"the API version in the data ({api_version}) and kind ({kind}) do not match "
                f"the endpoint's {rtype.api_version} {rtype.kind}",
            )

    @staticmethod
    def _namespace_for(rtype: ResourceType, namespace: str | None, meta: Obj) -> str:
        if not rtype.namespaced:
            return ""
        in_body = meta.get("namespace")
        if namespace and in_body and in_body != namespace:
            raise ApiError(
                400,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        ns = namespace or in_body
        if not ns:
            raise ApiError(400, f"{rtype.kind} objects are namespaced: POST to .../namespaces/NS/")
        return str(ns)

    def _generate_name(self, rtype: ResourceType, ns: str, prefix: str) -> str:
        alphabet = "bcdfghjklmnpqrstvwxz2456789"
        for _ in range(100):
            name = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
            if (ns, name) not in self._bucket(rtype):
                return name
        raise ApiError(500, f"could not generate a unique name from {prefix!r}")

    # ------------------------------------------------------------------- update
    def replace(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        subresource: str | None = None,
    ) -> Obj:
        """PUT: the whole object (or its status, for the status subresource)."""
        old = self.get(rtype, namespace, name)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._check_kind(rtype, body)
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise ApiError(
                400,
                f"the name of the object ({meta.get('name')}) does not match the name on the "
                f"URL ({name})",
            )
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name)
        return self._commit(rtype, old, copy.deepcopy(body), subresource)

    def patch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str,
        subresource: str | None = None,
    ) -> Obj:
        old = self.get(rtype, namespace, name)
        ctype = content_type.split(";")[0].strip().lower()
        try:
            if ctype == "application/merge-patch+json":
                if not isinstance(patch, dict):
                    raise TypeError("a merge patch must be a JSON object")
                new = merge_patch(old, patch)
            elif ctype == "application/strategic-merge-patch+json":
                if not isinstance(patch, dict):
                    raise TypeError("a strategic merge patch must be a JSON object")
                new = strategic_merge_patch(old, patch)
            elif ctype == "application/json-patch+json":
                new = json_patch(old, patch)
            elif ctype == "application/apply-patch+yaml":
                raise ApiError(
                    415,
                    "server-side apply is not supported by the fake API server; use a merge "
                    "patch or create the object",
                )
            else:
                raise ApiError(415, f"the media type {content_type!r} is not a patch type")
        except TypeError as exc:
            raise ApiError(400, str(exc)) from exc
        except PatchError as exc:
            raise ApiError(422, str(exc), details=_details(rtype, name)) from exc
        if not isinstance(new, dict):
            raise ApiError(422, "the patched object is not a JSON object")
        new_rv = (new.get("metadata") or {}).get("resourceVersion")
        if new_rv is not None and new_rv != old["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name)
        return self._commit(rtype, old, new, subresource)

    def _commit(self, rtype: ResourceType, old: Obj, new: Obj, subresource: str | None) -> Obj:
        name = old["metadata"]["name"]
        if subresource not in (None, "status") or (subresource and not rtype.has_status):
            raise ApiError(404, f"{rtype.key} has no subresource {subresource!r}")
        if subresource == "status":
            candidate = dict(old)
            if "status" in new:
                candidate["status"] = new["status"]
            else:
                candidate.pop("status", None)
            new = candidate
        else:
            if rtype.has_status:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            meta = new.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise ApiError(400, "metadata must be an object")
            for key in ("uid", "creationTimestamp", "deletionTimestamp", "generation", "name"):
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
                else:
                    meta.pop(key, None)
            if rtype.namespaced:
                meta["namespace"] = old["metadata"]["namespace"]
            new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
            if rtype.plural == "secrets":
                _fold_string_data(new)
            if old["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(
                    old["metadata"].get("finalizers") or []
                )
                if added:
                    raise _invalid(
                        rtype,
                        name,
                        [
                            (
                                "metadata.finalizers",
                                f"Forbidden: no new finalizers can be added if the object is "
                                f"being deleted, found new finalizers {sorted(added)!r}",
                            )
                        ],
                    )
            causes = _validate_metadata(rtype, new)
            if causes:
                raise _invalid(rtype, name, causes)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _without_rv(new) == _without_rv(old):
            return old  # a no-op write: no new resourceVersion, no watch event
        if _content(new) != _content(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        slot = (self._ns(rtype, new["metadata"].get("namespace")), name)
        self._bucket(rtype)[slot] = new
        self._record(rtype, "MODIFIED", new, old)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._remove(rtype, new)
        return new

    # ------------------------------------------------------------------- delete
    def delete(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any] | None = None,
        propagation: str | None = None,
    ) -> Obj:
        obj = self.get(rtype, namespace, name)
        options = options or {}
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise ApiError(
                409,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                f"{obj['metadata']['uid']}",
                details=_details(rtype, name),
            )
        if (
            pre.get("resourceVersion")
            and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]
        ):
            raise _conflict(rtype, name)
        policy = propagation or options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        policy = policy or rtype.default_propagation
        if policy not in ("Background", "Foreground", "Orphan"):
            raise ApiError(400, f"unsupported propagationPolicy {policy!r}")
        if rtype.plural == "namespaces":
            self._delete_namespace_contents(name)
        if obj["metadata"].get("finalizers"):
            if obj["metadata"].get("deletionTimestamp"):
                return obj
            self._pending_policy[obj["metadata"]["uid"]] = policy
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            if rtype.plural == "namespaces":
                new.setdefault("status", {})["phase"] = "Terminating"
            new["metadata"]["resourceVersion"] = self._next_rv()
            key = (self._ns(rtype, namespace), name)
            self._bucket(rtype)[key] = new
            self._record(rtype, "MODIFIED", new, obj)
            return new
        self._pending_policy[obj["metadata"]["uid"]] = policy
        return self._remove(rtype, obj)

    def _remove(self, rtype: ResourceType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        key = (self._ns(rtype, meta.get("namespace")), meta["name"])
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        del self._bucket(rtype)[key]
        self._uids.pop(meta["uid"], None)
        self._record(rtype, "DELETED", gone, obj)
        policy = self._pending_policy.pop(meta["uid"], "Background")
        uid = meta["uid"]
        self._schedule(lambda: self.owner_deleted(uid, policy))
        return gone

    def _delete_namespace_contents(self, namespace: str) -> None:
        for rtype in self.resources.values():
            if not rtype.namespaced:
                continue
            for obj in self.select(rtype, namespace):
                if self.find(rtype, namespace, obj["metadata"]["name"]) is not None:
                    self.delete(rtype, namespace, obj["metadata"]["name"], propagation="Background")

    # ---------------------------------------------------------- garbage collection
    def owner_deleted(self, uid: str, policy: str = "Background") -> None:
        """The object with this uid is gone (here or in another API server): delete its
        dependents (``Background``/``Foreground``) or strip the reference (``Orphan``).

        A dependent with other owners that are not known to be gone only loses the reference.
        """
        self._dead_uids.add(uid)
        for rtype, obj in list(self.all_objects()):
            refs = (obj.get("metadata") or {}).get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            meta = obj["metadata"]
            current = self.find(rtype, meta.get("namespace"), meta["name"])
            if current is None or current["metadata"]["uid"] != meta["uid"]:
                continue
            alive = [ref for ref in refs if ref.get("uid") not in self._dead_uids]
            if policy == "Orphan" or alive:
                kept = [ref for ref in refs if ref.get("uid") != uid]
                new = copy.deepcopy(current)
                if kept:
                    new["metadata"]["ownerReferences"] = kept
                else:
                    new["metadata"].pop("ownerReferences", None)
                self._commit(rtype, current, new, None)
            else:
                self.delete(rtype, meta.get("namespace"), meta["name"], propagation="Background")

    # -------------------------------------------------------------------- watch
    def watch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        labels: list[LabelRequirement],
        fields: list[tuple[str, bool, str]],
        resource_version: str | None,
        send_initial_events: bool = False,
    ) -> Watch:
        """Subscribe; the returned watch's queue already holds the events to replay."""
        watch = Watch(rtype, namespace if rtype.namespaced else None, labels, fields)
        since = int(resource_version) if resource_version and resource_version != "0" else None
        if since is None or send_initial_events:
            for obj in self.select(rtype, watch.namespace, labels, fields):
                watch.queue.put_nowait({"type": "ADDED", "object": obj})
            if send_initial_events:
                watch.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": rtype.kind,
                            "apiVersion": rtype.api_version,
                            "metadata": {
                                "resourceVersion": str(self._rv),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    }
                )
        else:
            if since < self._compacted_rv:
                watch.queue.put_nowait(
                    {
                        "type": "ERROR",
                        "object": ApiError(
                            410,
                            f"too old resource version: {since} ({self._compacted_rv + 1})",
                            reason="Expired",
                        ).status(),
                    }
                )
                watch.queue.put_nowait(None)
                return watch
            for event in self._history:
                if event.rv > since and event.rtype_key == rtype.key:
                    watch.push(event.type, event.obj, event.old)
        self._watches.append(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)

    def close_watches(self) -> None:
        for watch in self._watches:
            watch.queue.put_nowait(None)
        self._watches.clear()


def _fold_string_data(obj: Obj) -> None:
    """Secrets: ``stringData`` is merged into base64 ``data`` and never stored."""
    string_data = obj.pop("stringData", None) or {}
    if string_data:
        data = dict(obj.get("data") or {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj["data"] = data


# ------------------------------------------------------------------------------ event loop


class LoopThread:
    """An asyncio event loop running in a daemon thread, for servers used by sync tests."""

    def __init__(self, name: str = "kubefake-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """Run a plain function on the loop thread and return its result."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------- HTTP server


@dataclass
class _Injected:
    verb: str
    resource: str
    status: int
    message: str
    times: int


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


class FakeKubeServer:
    """The fake API server on ``http://127.0.0.1:PORT``; a context manager.

    Runs on its own :class:`LoopThread` unless given one (the router and this server share
    one in :class:`support.kubeenv.KubeEnv`). All public methods are safe to call from any
    thread.
    """

    def __init__(
        self,
        *,
        resources: Iterable[ResourceType] = BUILTIN_RESOURCES,
        loop_thread: LoopThread | None = None,
        history: int = 20000,
        version: Mapping[str, str] | None = None,
    ) -> None:
        self.resource_types = tuple(resources)
        self._own_loop = loop_thread is None
        self._loop_thread = loop_thread
        self._history = history
        self._version = dict(
            version
            or {"major": "1", "minor": "36", "gitVersion": "v1.36.4", "platform": "linux/amd64"}
        )
        self._by_path: dict[tuple[str, str, str], ResourceType] = {
            (r.group, r.version, r.plural): r for r in self.resource_types
        }
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._injected: list[_Injected] = []
        self._runner: web.AppRunner | None = None
        self.store: ObjectStore | None = None
        self.port: int | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> FakeKubeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def loop_thread(self) -> LoopThread:
        if self._loop_thread is None:
            raise RuntimeError("the fake API server is not started")
        return self._loop_thread

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake API server is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self._runner is not None:
            return
        if self._loop_thread is None:
            self._loop_thread = LoopThread("kubefake")
        self.loop_thread.run(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.store = ObjectStore(
            self.resource_types, history=self._history, schedule=loop.call_soon
        )
        self.store.create(
            self._rtype("", "v1", "namespaces"), None, {"metadata": {"name": "default"}}
        )
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=2.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is None:
            return
        self.loop_thread.run(self._stop())
        self._runner = None
        if self._own_loop:
            self.loop_thread.stop()
            self._loop_thread = None

    async def _stop(self) -> None:
        if self.store is not None:
            self.store.close_watches()
        assert self._runner is not None
        await self._runner.cleanup()

    # ----------------------------------------------------------- test helpers
    def request_counts(self) -> dict[tuple[str, str], int]:
        """Requests served so far per ``(verb, resource)`` (see :func:`count_key`)."""
        with self._counts_lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

    def inject_error(
        self,
        verb: str,
        resource: str,
        *,
        status: int = 500,
        message: str = "injected by the test",
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests for ``(verb, resource)`` with an error, e.g.
        ``inject_error("create", "jobs.batch", status=500)``."""
        self.loop_thread.call(
            lambda: self._injected.append(_Injected(verb, resource, status, message, times))
        )

    def owner_deleted(self, uid: str, policy: str = "Background") -> None:
        """An owner outside this server (a custom resource) is gone: collect its dependents."""
        loop = self.loop_thread.loop
        store = self.store
        assert store is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            store.owner_deleted(uid, policy)
        else:
            loop.call_soon_threadsafe(store.owner_deleted, uid, policy)

    def objects(self, resource: str, namespace: str | None = None) -> list[Obj]:
        """A snapshot of the stored objects of one resource (``"jobs.batch"``, ``"pods"``)."""
        store = self.store
        assert store is not None
        rtype = store.resources[resource]
        return self.loop_thread.call(lambda: copy.deepcopy(store.select(rtype, namespace)))

    @property
    def resource_version(self) -> int:
        return self.store.resource_version if self.store else 0

    # ------------------------------------------------------------------- routing
    def _rtype(self, group: str, version: str, plural: str) -> ResourceType:
        rtype = self._by_path.get((group, version, plural))
        if rtype is None:
            raise ApiError(
                404,
                f"the server could not find the requested resource ({group or 'core'}/{version} "
                f"{plural})",
            )
        return rtype

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        key = count_key(request.method, request.path, query)
        with self._counts_lock:
            self._counts[key] += 1
        try:
            for injected in self._injected:
                if (injected.verb, injected.resource) == key:
                    injected.times -= 1
                    if injected.times <= 0:
                        self._injected.remove(injected)
                    raise ApiError(injected.status, injected.message)
            api_path = parse_api_path(request.path)
            if request.path == "/version":
                return _json(self._version)
            if api_path is None:
                raise ApiError(
                    404, f"the server could not find the requested resource ({request.path})"
                )
            if api_path.plural is None:
                if request.method != "GET":
                    raise ApiError(405, f"{request.method} is not allowed on {request.path}")
                return _json(self._discovery(api_path))
            return await self._serve(request, api_path, query)
        except ApiError as exc:
            return _json(exc.status(), exc.code)

    def _discovery(self, api_path: ApiPath) -> Obj:
        if api_path.group is None:
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": self.api_groups()}
        if api_path.group == "" and api_path.version is None:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if api_path.version is None:
            for group in self.api_groups():
                if group["name"] == api_path.group:
                    return {"kind": "APIGroup", "apiVersion": "v1", **group}
            raise ApiError(
                404, f"the server could not find the requested resource ({api_path.group})"
            )
        served = [
            r
            for r in self.resource_types
            if (r.group, r.version) == (api_path.group, api_path.version)
        ]
        if not served:
            raise ApiError(404, "the server could not find the requested resource")
        resources: list[Obj] = []
        for r in served:
            singular = r.kind.lower()
            resources.append(
                {
                    "name": r.plural,
                    "singularName": singular,
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": list(VERBS),
                    **({"shortNames": list(r.short_names)} if r.short_names else {}),
                }
            )
            for sub in r.subresources:
                resources.append(
                    {
                        "name": f"{r.plural}/{sub}",
                        "singularName": "",
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        group_version = (
            f"{api_path.group}/{api_path.version}" if api_path.group else api_path.version
        )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    def api_groups(self) -> list[Obj]:
        """The ``APIGroupList`` entries of the non-core groups this server serves."""
        versions: dict[str, list[str]] = {}
        for r in self.resource_types:
            if r.group and r.version not in versions.setdefault(r.group, []):
                versions[r.group].append(r.version)
        return [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in vs],
                "preferredVersion": {"groupVersion": f"{group}/{vs[0]}", "version": vs[0]},
            }
            for group, vs in versions.items()
        ]

    # ------------------------------------------------------------------ resources
    async def _serve(
        self, request: web.Request, api_path: ApiPath, query: dict[str, str]
    ) -> web.StreamResponse:
        store = self.store
        assert store is not None
        assert api_path.group is not None
        assert api_path.version is not None
        assert api_path.plural is not None
        rtype = self._rtype(api_path.group, api_path.version, api_path.plural)
        verb = request_verb(request.method, api_path, query)
        if "dryRun" in query:
            raise ApiError(400, "dryRun is not supported by the fake API server")
        if api_path.subresource and api_path.subresource != "status":
            raise ApiError(404, f"{rtype.key} has no subresource {api_path.subresource!r}")
        if api_path.subresource and not rtype.has_status:
            raise ApiError(404, f"{rtype.key} has no status subresource")
        if api_path.subresource and verb not in ("get", "update", "patch"):
            raise ApiError(405, f"{verb} is not allowed on {rtype.key}/status")
        namespace = api_path.namespace if rtype.namespaced else None
        if rtype.namespaced and api_path.name and not namespace:
            raise ApiError(404, f"{rtype.kind} objects are namespaced: use .../namespaces/NS/...")
        try:
            labels = parse_label_selector(query.get("labelSelector"))
            fields = parse_field_selector(query.get("fieldSelector"))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc

        if verb == "watch":
            return await self._watch(request, rtype, namespace, labels, fields, query)
        if verb == "list":
            items = store.select(rtype, namespace, labels, fields)
            return _json(
                {
                    "kind": f"{rtype.kind}List",
                    "apiVersion": rtype.api_version,
                    "metadata": {"resourceVersion": str(store.resource_version)},
                    "items": items,
                }
            )
        if verb == "get":
            assert api_path.name is not None
            return _json(store.get(rtype, namespace, api_path.name))

        body = await self._body(request)
        if verb == "create":
            if api_path.name:
                raise ApiError(405, "POST must go to the collection, not to an object")
            return _json(store.create(rtype, namespace, body), 201)
        if verb == "update":
            assert api_path.name is not None
            return _json(store.replace(rtype, namespace, api_path.name, body, api_path.subresource))
        if verb == "patch":
            assert api_path.name is not None
            ctype = request.headers.get("Content-Type", "")
            return _json(
                store.patch(rtype, namespace, api_path.name, body, ctype, api_path.subresource)
            )
        propagation = query.get("propagationPolicy")
        options = body if isinstance(body, dict) else {}
        if verb == "delete":
            assert api_path.name is not None
            return _json(store.delete(rtype, namespace, api_path.name, options, propagation))
        if verb == "deletecollection":
            deleted = [
                store.delete(rtype, namespace, obj["metadata"]["name"], options, propagation)
                for obj in store.select(rtype, namespace, labels, fields)
            ]
            return _json(
                {
                    "kind": f"{rtype.kind}List",
                    "apiVersion": rtype.api_version,
                    "metadata": {"resourceVersion": str(store.resource_version)},
                    "items": deleted,
                }
            )
        raise ApiError(405, f"{request.method} is not supported")

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(
                400, f"the request body is not JSON (YAML and protobuf are not supported): {exc}"
            ) from exc

    async def _watch(
        self,
        request: web.Request,
        rtype: ResourceType,
        namespace: str | None,
        labels: list[LabelRequirement],
        fields: list[tuple[str, bool, str]],
        query: dict[str, str],
    ) -> web.StreamResponse:
        store = self.store
        assert store is not None
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError as exc:
            raise ApiError(400, f"invalid timeoutSeconds: {query['timeoutSeconds']!r}") from exc
        watch = store.watch(
            rtype,
            namespace,
            labels,
            fields,
            query.get("resourceVersion"),
            send_initial_events=_is_true(query.get("sendInitialEvents")),
        )
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            async with asyncio.timeout(timeout):
                while True:
                    event = await watch.queue.get()
                    if event is None:
                        break
                    await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            store.unwatch(watch)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response
