"""The operator's RBAC: the rules the chart renders, the table in docs/install.md, and what
the operator's code really calls, kept in step.

The calls come from the code itself: kopf's registry (what is watched), the builders (what
is created, run on the examples) and `Kube` (every method called against a recording API
client). A rule the code needs but the chart lacks fails here, and so does a rule the docs
do not list.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from chart_tools import REPO_ROOT, Helm, one
from kubernetes import client

from kubetune.api import GROUP
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import handlers
from kubetune.operator.children import build_children, build_cleanup_pod
from kubetune.operator.kube import CUSTOM_KINDS, FINETUNEJOBS, MODELDEPLOYMENTS, Kube
from kubetune.operator.serving_reconcile import OPTIONAL_KINDS
from kubetune.operator.settings import parse_settings
from kubetune.storage.layout import run_id_for

Rules = dict[tuple[str, str], frozenset[str]]
"""(API group, resource) → verbs."""

DOCS = REPO_ROOT / "docs" / "install.md"
FULLNAME = "kubetune"
PLURALS = {
    "ConfigMap": ("", "configmaps"),
    "Service": ("", "services"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "Pod": ("", "pods"),
    "Job": ("batch", "jobs"),
}


def normalize(rules: Iterable[dict[str, Any]]) -> Rules:
    found: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: frozenset(verbs) for key, verbs in found.items()}


def grants(rules: Rules, group: str, resource: str, verb: str) -> bool:
    return verb in rules.get((group, resource), frozenset())


def docs_table(heading: str) -> Rules:
    """The rules in the table under `heading` in docs/install.md."""
    text = DOCS.read_text()
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith(("| API group", "| ---")):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, f"no table under {heading!r} in docs/install.md"
    rules = []
    for group, resources, verbs, _why in rows:
        group = "" if group.startswith("core") else group.strip("`")
        rules.append(
            {
                "apiGroups": [group],
                "resources": [r.strip().strip("`") for r in resources.split(",")],
                "verbs": [v.strip() for v in verbs.split(",")],
            }
        )
    return normalize(rules)


ADMISSION_ONLY = {
    (GROUP, f"{FINETUNEJOBS}/finalizers", "update"),
    (GROUP, f"{MODELDEPLOYMENTS}/finalizers", "update"),
}
"""Never called, but checked by the OwnerReferencesPermissionEnforcement admission plugin
when the operator creates children whose owner reference sets blockOwnerDeletion."""

NAMESPACED_HEADING = "### In the watched namespaces"
CLUSTER_HEADING = "### Cluster-wide, read-only (kopf)"


# --- what the code calls ----------------------------------------------------------------


def watched() -> set[tuple[str, str]]:
    """(group, resource) of every kopf watch the operator registers."""
    assert handlers  # imported for its registrations
    registry = kopf.get_default_registry()
    found: set[tuple[str, str]] = set()
    for handler in registry._watching.get_all_handlers():
        selector = handler.selector
        assert selector is not None
        resource = selector.plural or selector.any_name
        assert isinstance(resource, str), selector
        found.add((selector.group or "", resource))
    return found


def created_by_builders() -> set[tuple[str, str]]:
    """(group, resource) of every object the builders make for the examples."""
    return {PLURALS[kind] for _, kind in created_by_builders_kinds()}


def created_by_builders_kinds() -> set[tuple[str, str]]:
    """(example, kind) of every object the builders make for the example FineTuneJobs (plus
    one run on an operator-made scratch claim, and the artifact cleanup pod)."""
    values = yaml.safe_load((Path(__file__).parent / "values" / "gpu-classes.yaml").read_text())
    settings = parse_settings(values["settings"])
    found: set[tuple[str, str]] = set()
    examples = sorted((REPO_ROOT / "examples").glob("finetunejob-*.yaml"))
    for path in examples:
        data = yaml.safe_load(path.read_text())
        data["metadata"].update(namespace="ml-team", uid="8a3c8e1e-0000-4000-8000-000000000001")
        variants = [data]
        if path.stem == "finetunejob-smoke":
            scratch = json.loads(json.dumps(data))
            scratch["spec"]["resources"]["scratch"] = {"type": "PVC", "size": "50Gi"}
            deleting = json.loads(json.dumps(data))
            deleting["spec"]["output"] = {"uri": "s3://bucket/runs", "deletePolicy": "Delete"}
            variants += [scratch, deleting]
        for variant in variants:
            ftj = FineTuneJob.model_validate(variant)
            for obj in build_children(ftj, settings, run_id_for(ftj.spec)).objects:
                found.add((path.stem, obj["kind"]))
            if ftj.spec.output and ftj.spec.output.delete_policy.value == "Delete":
                root = f"{ftj.spec.output.uri}/ml-team/{ftj.metadata.name}"
                found.add((path.stem, build_cleanup_pod(ftj, settings, [root])["kind"]))
    return found


class RecordingApiClient(client.ApiClient):  # type: ignore[misc]
    """Records (group, resource, verb) of every request instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def call_api(
        self, resource_path: str, method: str, path_params: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        path = resource_path
        for key, value in (path_params or {}).items():
            path = path.replace("{" + key + "}", str(value))
        parts = path.strip("/").split("/")

        class Response:
            data = b"{}"

        if len(parts) <= 2:  # discovery (/api, /apis): allowed to every authenticated user
            return Response()
        if parts[0] == "api":  # /api/v1/namespaces/NS/RESOURCE[/NAME[/SUB]]
            group, rest = "", parts[2:]
        else:  # /apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME[/SUB]]
            group, rest = parts[1], parts[3:]
        if rest and rest[0] == "namespaces" and len(rest) > 2:
            rest = rest[2:]
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        named = len(rest) > 1
        verb = {
            "GET": "get" if named else "list",
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete",
        }[method]
        self.calls.append((group, resource, verb))
        return Response()


EXERCISED = {
    "create",
    "patch",
    "replace",
    "delete_child",
    "api_groups",
    "patch_job",
    "delete",
    "patch_status",
    "patch_modeldeployment_status",
    "current_uid",
    "set_finalizers",
    "secret_keys",
    "post_event",
    "list_children",
}
"""Every public method of Kube, called below. A new method makes the test below fail until
it is added here (and the chart's RBAC checked)."""

SERVING_WRITES: dict[str, tuple[str, ...]] = {
    "create": (
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "ServiceMonitor",
        "PersistentVolumeClaim",
    ),
    "patch": (
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "ServiceMonitor",
    ),
    "replace": ("Deployment",),
    "delete_child": OPTIONAL_KINDS,
}
"""What the ModelDeployment reconciler (serving_reconcile.py) does to which kinds of its
children (ServingChildren): every child is created; all but the Deployment and the claim
are patched when the spec changes; the Deployment is replaced; an autoscaler or monitor no
longer wanted is deleted."""


def child(kind: str) -> dict[str, Any]:
    api_version = {
        "Deployment": "apps/v1",
        "PodDisruptionBudget": "policy/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "Job": "batch/v1",
    }.get(kind, "v1")
    if kind in CUSTOM_KINDS:
        group, version, _ = CUSTOM_KINDS[kind]
        api_version = f"{group}/{version}"
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "a", "namespace": "ml-team", "labels": {}, "annotations": {}},
        "spec": {},
    }


def kube_calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every request `Kube`'s methods make, called the way the
    reconcilers call them."""
    api = RecordingApiClient()
    kube = Kube(api)
    owner = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "a", "namespace": "ml-team", "uid": "u"},
    }

    async def exercise() -> None:
        for kind in {kind for _, kind in created_by_builders_kinds()}:
            await kube.create(child(kind))
        for kind in SERVING_WRITES["create"]:
            await kube.create(child(kind))
        for kind in SERVING_WRITES["patch"]:
            await kube.patch(child(kind))
        for kind in SERVING_WRITES["replace"]:
            await kube.replace(child(kind), "1")
        for kind in SERVING_WRITES["delete_child"]:
            await kube.delete_child(kind, "ml-team", "a")
        await kube.api_groups()
        await kube.patch_job("ml-team", "a", {"suspend": True})
        await kube.delete("Job", "ml-team", "a")
        await kube.delete("Pod", "ml-team", "a")
        await kube.patch_status("ml-team", "a", {"stage": "Pending"})
        await kube.patch_modeldeployment_status("ml-team", "a", {"endpoint": "http://a"})
        await kube.current_uid("modeldeployments", "ml-team", "a")
        await kube.set_finalizers("ml-team", "a", [], "1")
        await kube.secret_keys("ml-team", "s3-credentials")
        await kube.post_event(owner, "Normal", "Created", "Created Job a")
        await kube.list_children({"app.kubernetes.io/managed-by": "kubetune-operator"}, ["ml-team"])
        await kube.list_children({"app.kubernetes.io/managed-by": "kubetune-operator"}, [])

    asyncio.run(exercise())
    return set(api.calls)


def required() -> set[tuple[str, str, str]]:
    """Everything the operator's FineTuneJob code needs, as (group, resource, verb)."""
    needs = set(kube_calls())
    for group, resource in watched():
        needs |= {(group, resource, "list"), (group, resource, "watch")}
    needs |= {(group, resource, "create") for group, resource in created_by_builders()}
    return needs


# --- the tests ----------------------------------------------------------------------------


def test_every_kube_method_is_exercised() -> None:
    public = {
        name
        for name, member in inspect.getmembers(Kube, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    assert public == EXERCISED, (
        "Kube's methods changed: call the new ones in kube_calls() and check the chart's RBAC "
        "(charts/kubetune/templates/_helpers.tpl) and docs/install.md"
    )


def test_the_code_needs_what_the_test_thinks() -> None:
    """A sanity check of the derivation itself."""
    needs = required()
    assert (GROUP, FINETUNEJOBS, "watch") in needs
    assert (GROUP, f"{FINETUNEJOBS}/status", "patch") in needs
    assert ("batch", "jobs", "create") in needs
    assert ("", "persistentvolumeclaims", "create") in needs
    assert ("", "pods", "create") in needs
    assert ("", "secrets", "get") in needs
    assert ("", "events", "create") in needs
    assert (GROUP, MODELDEPLOYMENTS, "watch") in needs
    assert (GROUP, f"{MODELDEPLOYMENTS}/status", "patch") in needs
    assert ("apps", "deployments", "update") in needs
    assert ("keda.sh", "scaledobjects", "delete") in needs
    assert ("monitoring.coreos.com", "servicemonitors", "patch") in needs


@pytest.mark.tools
@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_chart_grants_what_the_code_needs(helm: Helm, mode: str) -> None:
    if mode == "cluster":
        rules = normalize(one(helm.template(), "ClusterRole", FULLNAME)["rules"])
    else:
        roles = [d for d in helm.template("namespaced.yaml") if d["kind"] == "Role"]
        rules = normalize(
            next(r for r in roles if r["metadata"]["namespace"] == "ml-team")["rules"]
        )
    needs = required()
    missing = sorted(need for need in needs if not grants(rules, *need))
    assert missing == [], f"the chart's RBAC lacks {missing}"
    granted = {(g, r, v) for (g, r), verbs in rules.items() for v in verbs}
    observation = {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    extra = sorted(granted - needs - ADMISSION_ONLY - observation)
    assert extra == [], f"the chart grants more than the code uses: {extra}"


@pytest.mark.tools
def test_docs_list_exactly_the_rendered_rules(helm: Helm) -> None:
    namespaced_docs = helm.template("namespaced.yaml")
    role = next(d for d in namespaced_docs if d["kind"] == "Role")
    assert normalize(role["rules"]) == docs_table(NAMESPACED_HEADING)
    observer = one(namespaced_docs, "ClusterRole", f"{FULLNAME}-observer")
    assert normalize(observer["rules"]) == docs_table(CLUSTER_HEADING)
    cluster_role = normalize(one(helm.template(), "ClusterRole", FULLNAME)["rules"])
    documented = docs_table(NAMESPACED_HEADING)
    crds = ("apiextensions.k8s.io", "customresourcedefinitions")
    assert cluster_role == {**documented, crds: docs_table(CLUSTER_HEADING)[crds]}


@pytest.mark.tools
def test_no_wildcards_and_secrets_read_only_by_name(helm: Helm) -> None:
    rules = one(helm.template(), "ClusterRole", FULLNAME)["rules"]
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
    normalized = normalize(rules)
    assert normalized[("", "secrets")] == {"get"}
    assert not any(
        re.search("escalate|bind|impersonate", v) for verbs in normalized.values() for v in verbs
    )


DANGEROUS = {
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "pods/exec", "create"),
    ("", "pods/attach", "create"),
    ("", "pods/portforward", "create"),
    ("", "serviceaccounts/token", "create"),
    ("", "nodes/proxy", "get"),
}
"""Grants that read every credential or reach into pods and nodes: never given."""


@pytest.mark.tools
@pytest.mark.parametrize("values", [(), ("namespaced.yaml",), ("monitoring.yaml",)])
def test_every_rendered_role_is_least_privilege(helm: Helm, values: tuple[str, ...]) -> None:
    """Each Role and ClusterRole the chart renders, in every mode: no wildcard, no escalation,
    no Secret listing; the roles aggregated into `edit`/`view` cover kubetune's kinds only."""
    for doc in helm.template(*values):
        if doc["kind"] not in ("Role", "ClusterRole"):
            continue
        name = doc["metadata"]["name"]
        rules = normalize(doc.get("rules") or [])
        for (group, resource), verbs in rules.items():
            assert "*" not in (group, resource), (name, group, resource)
            assert "*" not in verbs, (name, group, resource)
            assert not verbs & {"escalate", "bind", "impersonate"}, (name, resource)
            assert not {(group, resource, v) for v in verbs} & DANGEROUS, (name, resource)
        if name.startswith(f"{FULLNAME}-aggregate-"):
            assert {group for group, _ in rules} == {GROUP}, (name, rules)
        if name == f"{FULLNAME}-aggregate-view":
            assert set().union(*rules.values()) <= {"get", "list", "watch"}, rules
