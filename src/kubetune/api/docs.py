"""Render docs/api.md from the same schema the CRDs are generated from."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api import API_VERSION
from kubetune.api.contract import EXIT_CODES, Reason
from kubetune.api.crd import KINDS, Kind, openapi_schema

Schema = dict[str, Any]

HEADER = f"""# API reference: `{API_VERSION}`

Generated from the pydantic models in `src/kubetune/api` by `make generate`; do not edit.
`kubectl explain finetunejob.spec` shows the same descriptions. Numbers that are not
integers are written as strings (e.g. `learningRate: "2e-4"`). Rules listed under an object
are checked by the API server at `kubectl apply` and by `kubetune validate`.
"""


def _type(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = schema.get("type", "object")
    if kind == "array":
        return f"[]{_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type(schema['additionalProperties'])}"
    return str(kind)


def _constraints(schema: Schema) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (("minimum", "≥"), ("maximum", "≤")):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "maxItems" in schema:
        parts.append(f"at most {schema['maxItems']} items")
    if "pattern" in schema and "enum" not in schema and len(schema["pattern"]) < 60:
        parts.append(f"pattern `{schema['pattern']}`")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _object_section(title: str, schema: Schema, out: list[str], depth: int) -> None:
    props = schema.get("properties", {})
    if not props:
        return
    out.append(f"{'#' * min(depth, 4)} `{title}`\n")
    if schema.get("description"):
        out.append(schema["description"] + "\n")
    required = set(schema.get("required", []))
    out.append("| Field | Type | Default | Description |")
    out.append("| --- | --- | --- | --- |")
    nested: list[tuple[str, Schema]] = []
    for name, sub in props.items():
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        if name in required:
            default = "**required**"
        description = sub.get("description", "")
        extra = _constraints(sub)
        if extra:
            description = f"{description} ({extra})" if description else extra
        out.append(f"| `{name}` | {_type(sub)} | {default} | {_cell(description)} |")
        target = sub.get("items", sub) if sub.get("type") == "array" else sub
        if target.get("properties"):
            nested.append((f"{title}.{name}{'[]' if sub.get('type') == 'array' else ''}", target))
    rules = schema.get("x-kubernetes-validations", [])
    if rules:
        out.append("\nRules:\n")
        for rule in rules:
            where = f" (`{rule['fieldPath'].lstrip('.')}`)" if rule.get("fieldPath") else ""
            out.append(f"- {rule['message']}{where}")
    out.append("")
    for child_title, child in nested:
        _object_section(child_title, child, out, depth + 1)


def _kind_section(kind: Kind, out: list[str]) -> None:
    schema = openapi_schema(kind.model)
    short = ", ".join(kind.short_names)
    out.append(f"## {kind.kind}\n")
    out.append(f"Short name `{short}`, category `kubetune`. {schema.get('description', '')}\n")
    out.append("Printer columns: " + ", ".join(c["name"] for c in kind.printer_columns) + ".\n")
    for part in ("spec", "status"):
        _object_section(f"{kind.kind}.{part}", schema["properties"][part], out, 3)
    top_rules = schema.get("x-kubernetes-validations", [])
    if top_rules:
        out.append(f"Rules on the {kind.kind} object:\n")
        out.extend(f"- {r['message']}" for r in top_rules)
        out.append("")


def render_api_doc() -> str:
    """The whole of docs/api.md."""
    out = [HEADER]
    for kind in KINDS:
        _kind_section(kind, out)
    out.append("## Reasons\n")
    out.append("CamelCase reasons used in conditions, events and the trainer's result:\n")
    out.append(", ".join(f"`{r.value}`" for r in Reason) + ".\n")
    out.append("## Trainer exit codes\n")
    out.append(
        "`0`: the pipeline ran to the end (the result says whether the gate passed). "
        "User errors and out-of-memory fail the job at once; infrastructure errors are "
        "retried within `backoffLimit` and resume from the last checkpoint. Any other code "
        "is treated as infrastructure.\n"
    )
    out.append("| Code | Reason | Class | Meaning |")
    out.append("| --- | --- | --- | --- |")
    for row in EXIT_CODES:
        out.append(
            f"| {row.code} | `{row.reason.value}` | {row.failure_class.value} | {row.meaning} |"
        )
    return "\n".join(out).rstrip() + "\n"
