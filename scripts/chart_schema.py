"""Generate the Helm chart's values.schema.json, so that `helm install` refuses a typo or a
wrong type at any level of the values instead of silently ignoring it.

    python scripts/chart_schema.py           # write charts/kubetune/values.schema.json
    python scripts/chart_schema.py --check   # exit 1 when the file is stale

Three sources, none copied by hand:

- the chart's own keys, declared below (every object closed with additionalProperties: false);
- `settings`, from the `OperatorSettings` model the operator validates its settings file with
  (src/kubetune/operator/settings.py), so the chart accepts exactly what the operator does;
- the Kubernetes types passed through to the operator's pod (Affinity, Toleration, EnvVar,
  ResourceRequirements, security contexts, NetworkPolicy peers and rules), from the strict
  Kubernetes 1.36 schemas that kubernetes-validate ships (unknown fields are refused there too).

tests/chart/test_values_schema.py fails when the committed file differs from this output.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "charts" / "kubetune" / "values.schema.json"
KUBERNETES_SCHEMA_VERSION = "v1.36.0-local-strict"
"""kubernetes-validate's strict schemas of the newest supported Kubernetes (a superset of the
older versions' fields, so valid values for any supported cluster pass)."""

DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DURATION = "^([0-9]+(ms|s|m|h))+$"
LABEL_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

Schema = dict[str, Any]


def closed(properties: dict[str, Schema], description: str = "", **extra: Any) -> Schema:
    """An object schema that refuses keys it does not list."""
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if description:
        schema["description"] = description
    schema.update(extra)
    return schema


def string(description: str = "", **extra: Any) -> Schema:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def integer(minimum: int, maximum: int, description: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


def boolean(description: str = "") -> Schema:
    return {"type": "boolean", **({"description": description} if description else {})}


class KubernetesTypes:
    """Kubernetes definitions from kubernetes-validate, collected with everything they refer
    to, under `$defs` with their full names (io.k8s.api.core.v1.Affinity)."""

    def __init__(self) -> None:
        root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
        text = (root / KUBERNETES_SCHEMA_VERSION / "_definitions.json").read_text()
        self.source: dict[str, Schema] = json.loads(text)["$defs"]
        self.used: dict[str, Schema] = {}

    def ref(self, name: str) -> Schema:
        """A `$ref` to the definition `name`, which is added with its dependencies."""
        self._add(name)
        return {"$ref": f"#/$defs/{name}"}

    def list_of(self, name: str, description: str) -> Schema:
        return {"type": "array", "description": description, "items": self.ref(name)}

    def _add(self, name: str) -> None:
        if name in self.used:
            return
        if name not in self.source:
            raise KeyError(f"{name} is not in kubernetes-validate's {KUBERNETES_SCHEMA_VERSION}")
        self.used[name] = {}
        self.used[name] = self._clean(self.source[name])

    def _clean(self, node: Any) -> Any:
        """Without descriptions and x-kubernetes-* markers (the schema stays small; the
        Kubernetes reference documents these types), following every $ref."""
        if isinstance(node, dict):
            out: Schema = {}
            for key, value in node.items():
                if key == "description" or key.startswith("x-kubernetes-"):
                    continue
                if key == "$ref":
                    name = value.rsplit("/", 1)[-1]
                    self._add(name)
                    out[key] = f"#/$defs/{name}"
                else:
                    out[key] = self._clean(value)
            return out
        if isinstance(node, list):
            return [self._clean(item) for item in node]
        return node


def _without_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_titles(v) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_without_titles(item) for item in node]
    return node


def settings_schema() -> tuple[Schema, dict[str, Schema]]:
    """`settings` from OperatorSettings, and its nested definitions (renamed kubetune.*).

    The chart fills some keys in, so they differ from the model: an empty trainerImage means
    the chart's own trainer image, and an empty string for an optional key (one whose
    default is null, e.g. defaultOutputCredentialsSecret) means unset: the chart leaves it
    out of the settings file.
    """
    from kubetune.operator.settings import OperatorSettings

    raw = _without_titles(OperatorSettings.model_json_schema(by_alias=True))
    definitions = raw.pop("$defs", {})
    text = json.dumps(raw)
    renamed = {}
    for name, definition in definitions.items():
        text = text.replace(f'"#/$defs/{name}"', f'"#/$defs/kubetune.{name}"')
        renamed[f"kubetune.{name}"] = definition
    schema: Schema = json.loads(text)
    properties = schema["properties"]
    properties["trainerImage"] = {
        **properties["trainerImage"],
        "minLength": 0,
        "default": "",
        "description": properties["trainerImage"]["description"]
        + " Empty: ghcr.io/kubetune/kubetune-trainer:<the chart's appVersion>.",
    }
    for key, prop in list(properties.items()):
        branches = prop.get("anyOf", [])
        if prop.get("default", "") is None and {"type": "null"} in branches:
            (value,) = [b for b in branches if b != {"type": "null"}]
            if value.get("type") != "string":
                raise ValueError(f"settings.{key}: only optional strings can be empty in values")
            properties[key] = {
                **{k: v for k, v in value.items() if k != "minLength"},
                "default": "",
                "description": prop["description"] + " Empty: unset.",
            }
    properties["watchNamespaces"]["items"]["pattern"] = DNS_LABEL
    schema["description"] = (
        "The operator settings file (OperatorSettings; docs/operator.md#operator-settings)."
    )
    return schema, renamed


def build_schema() -> Schema:
    """The whole values schema."""
    k8s = KubernetesTypes()
    settings, settings_defs = settings_schema()
    monitor = closed(
        {
            "enabled": boolean("Create it (needs the monitoring.coreos.com CRDs)."),
            "labels": {**LABEL_MAP, "description": "Labels your Prometheus selects it by."},
            "interval": string("Scrape interval, e.g. 30s.", pattern=DURATION),
            "scrapeTimeout": string("Scrape timeout, e.g. 10s.", pattern=DURATION),
        }
    )
    properties: dict[str, Schema] = {
        "nameOverride": string("Replaces the chart name in resource names.", maxLength=52),
        "fullnameOverride": string("Replaces the name prefix of every resource.", maxLength=52),
        "image": closed(
            {
                "repository": string("Image repository.", minLength=1),
                "tag": string("Image tag; empty means the chart's appVersion."),
                "digest": string(
                    "Image digest; pins the image when set.", pattern="^(sha256:[a-f0-9]{64})?$"
                ),
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            },
            "The operator image.",
            required=["repository"],
        ),
        "imagePullSecrets": k8s.list_of(
            "io.k8s.api.core.v1.LocalObjectReference",
            "Secrets for pulling the operator image ([{name: …}]).",
        ),
        "operator": closed(
            {
                "workers": integer(1, 256, "Reconcile workers."),
                "metricsPort": integer(1, 65535, "Port of the operator's /metrics."),
                "extraEnv": k8s.list_of("io.k8s.api.core.v1.EnvVar", "Extra environment."),
                "resources": k8s.ref("io.k8s.api.core.v1.ResourceRequirements"),
                "podSecurityContext": k8s.ref("io.k8s.api.core.v1.PodSecurityContext"),
                "securityContext": k8s.ref("io.k8s.api.core.v1.SecurityContext"),
                "podAnnotations": LABEL_MAP,
                "podLabels": LABEL_MAP,
                "nodeSelector": LABEL_MAP,
                "tolerations": k8s.list_of("io.k8s.api.core.v1.Toleration", "Tolerations."),
                "affinity": k8s.ref("io.k8s.api.core.v1.Affinity"),
                "priorityClassName": string("PriorityClass of the operator pod."),
                "terminationGracePeriodSeconds": integer(0, 3600, "Grace period at shutdown."),
            },
            "The operator process (one replica, Recreate strategy).",
        ),
        "settings": settings,
        "serviceAccount": closed(
            {
                "create": boolean("Create the operator's ServiceAccount."),
                "name": string("Its name; empty means the release's full name."),
                "annotations": LABEL_MAP,
            }
        ),
        "rbac": closed(
            {
                "create": boolean("Create the operator's (Cluster)Roles and bindings."),
                "clusterObservation": boolean(
                    "Let kopf list and watch CRDs (and Namespaces in namespaced mode)."
                ),
                "aggregateToDefaultRoles": boolean(
                    "ClusterRoles aggregated into admin/edit and view."
                ),
            }
        ),
        "networkPolicy": closed(
            {
                "enabled": boolean("A NetworkPolicy for the operator pod."),
                "metricsFrom": k8s.list_of(
                    "io.k8s.api.networking.v1.NetworkPolicyPeer",
                    "Who may scrape the operator's metrics; empty: anyone.",
                ),
                "apiServerPorts": {
                    "type": "array",
                    "minItems": 1,
                    "items": integer(1, 65535),
                    "description": "Ports of the Kubernetes API server.",
                },
                "apiServerCIDRs": {
                    "type": "array",
                    "items": string(pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"),
                    "description": "CIDRs of the API server; empty: any address.",
                },
                "extraEgress": k8s.list_of(
                    "io.k8s.api.networking.v1.NetworkPolicyEgressRule", "Further egress rules."
                ),
            }
        ),
        "monitoring": closed(
            {
                "serviceMonitor": monitor,
                "podMonitor": monitor,
                "prometheusRule": closed(
                    {
                        "enabled": boolean("Create it (needs the monitoring.coreos.com CRDs)."),
                        "labels": LABEL_MAP,
                        "alertLabels": LABEL_MAP,
                        "stuckMinutes": integer(5, 1440, "Minutes without a training step."),
                        "reconcileErrorRatio": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "maximum": 1,
                            "description": "Share of failed reconciles that alerts.",
                        },
                        "notReadyMinutes": integer(
                            1, 1440, "Minutes a ModelDeployment may be not ready."
                        ),
                        "operatorDownMinutes": integer(
                            1, 1440, "Minutes the operator may be down."
                        ),
                    }
                ),
                "grafanaDashboard": closed(
                    {
                        "enabled": boolean("Create the dashboard ConfigMap."),
                        "labels": LABEL_MAP,
                        "annotations": LABEL_MAP,
                        "namespace": string("Its namespace; empty: the release namespace."),
                    }
                ),
            }
        ),
    }
    schema: Schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Values of the kubetune Helm chart",
        "description": "Generated by scripts/chart_schema.py; values.yaml documents each key.",
        **closed(properties),
        "$defs": {**settings_defs, **dict(sorted(k8s.used.items()))},
    }
    return schema


def render() -> str:
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    content = render()
    if args.check:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.is_file() else ""
        if current != content:
            stale = SCHEMA_PATH.relative_to(REPO_ROOT)
            print(f"{stale} is stale: run `python scripts/chart_schema.py`", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(content, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
