"""Generate the CustomResourceDefinitions from the pydantic models.

pydantic's JSON schema is rewritten into a Kubernetes structural schema: `$ref`s inlined,
`Optional` as a plain optional property instead of `anyOf [X, null]`, int-or-string marked,
titles and `additionalProperties: false` dropped (the server prunes and, with strict field
validation, refuses unknown fields), descriptions folded into single lines.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api import GROUP, VERSION
from kubetune.api.v1alpha1.finetunejob import FineTuneJob
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment

Schema = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """A custom resource kind and how `kubectl` shows it."""

    model: type[BaseModel]
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    printer_columns: tuple[dict[str, Any], ...]


def _condition_column(name: str, condition: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
    }


AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

KINDS = (
    Kind(
        model=FineTuneJob,
        kind="FineTuneJob",
        plural="finetunejobs",
        singular="finetunejob",
        short_names=("ftj",),
        printer_columns=(
            {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent"},
            {"name": "Loss", "type": "string", "jsonPath": ".status.progress.loss"},
            {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
            _condition_column("Succeeded", "Succeeded"),
            AGE,
            {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
            {"name": "Run", "type": "string", "jsonPath": ".status.runId", "priority": 1},
        ),
    ),
    Kind(
        model=ModelDeployment,
        kind="ModelDeployment",
        plural="modeldeployments",
        singular="modeldeployment",
        short_names=("md",),
        printer_columns=(
            _condition_column("Ready", "Ready"),
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
            AGE,
            {"name": "Variant", "type": "string", "jsonPath": ".spec.model.variant", "priority": 1},
        ),
    ),
)

_DROP = {"title", "discriminator"}


def _fold(text: str) -> str:
    """Fold docstring line breaks; keep blank-line paragraph breaks."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _is_int_or_string(options: list[Schema]) -> bool:
    types = sorted(str(o.get("type")) for o in options)
    return types == ["integer", "string"]


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = _structural(defs[node.pop("$ref").split("/")[-1]], defs)
        # Keys at the reference site (description, default) win over the target's.
        node = {**target, **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = _structural(node.pop("allOf")[0], defs)
        node = {**inner, **node}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            del node["anyOf"]
            inner = _structural(options[0], defs)
            node = {**inner, **{k: v for k, v in node.items() if k != "type"}}
        elif _is_int_or_string(options) or node.get("x-kubernetes-int-or-string"):
            del node["anyOf"]
            node["x-kubernetes-int-or-string"] = True
        else:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "description":
            out["description"] = _fold(value)
        elif key == "default":
            if value is not None:
                out["default"] = _strip_none(value)
        elif key == "properties":
            out["properties"] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = _structural(value, defs)
            elif value is True and "properties" not in node:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "maxLength" and node.get("type") == "object":
            out["maxProperties"] = value
        elif key == "minLength" and node.get("type") == "object":
            out["minProperties"] = value
        else:
            out[key] = value
    if (
        out.get("type") == "object"
        and not out.get("properties")
        and not out.get("additionalProperties")
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type[BaseModel]) -> Schema:
    """The structural openAPIV3Schema of a kind's root object."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(raw, defs)
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"]["apiVersion"] = {
        "type": "string",
        "description": "APIVersion of the object: kubetune.io/v1alpha1.",
    }
    schema["properties"]["kind"] = {"type": "string", "description": "Kind of the object."}
    schema["required"] = [r for r in schema.get("required", []) if r != "metadata"]
    schema.pop("default", None)
    return schema


def build_crd(kind: Kind) -> Schema:
    """The CustomResourceDefinition of one kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(kind.model)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(kind.printer_columns),
                }
            ],
        },
    }


def build_crds() -> list[Schema]:
    """Every CRD, in a stable order."""
    return [build_crd(kind) for kind in KINDS]


def crd_filename(crd: Schema) -> str:
    """File name of a CRD under crds/, e.g. kubetune.io_finetunejobs.yaml."""
    spec = crd["spec"]
    return f"{spec['group']}_{spec['names']['plural']}.yaml"


def to_yaml(crds: list[Schema]) -> str:
    """The CRDs as one multi-document YAML stream."""
    return "---\n".join(
        yaml.safe_dump(crd, sort_keys=False, width=100, allow_unicode=True) for crd in crds
    )
