"""Validate kubetune manifests offline, the way the API server would.

`kubetune validate` and the tests use this: defaulting, then the structural schema of the
generated CRD (messages in the API server's own wording), then its CEL rules (evaluated
with a Python CEL engine), then the pydantic models. Every problem is reported with its
field path, so a spec can be fixed in one go.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import celpy
import jsonschema
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from kubetune.api import API_VERSION
from kubetune.api.crd import KINDS, Kind, openapi_schema

Schema = dict[str, Any]
UNCHECKED_RULES = (
    "Invalid value: null: some validation rules were not checked because the object was "
    "invalid; correct the existing errors to complete validation"
)
_BLOCKING = ("Required value", "Unsupported value", "Too long", "Too many", "unknown field")


@dataclass(frozen=True)
class FieldError:
    """One problem in a manifest.

    Attributes:
        path: dotted field path, e.g. "spec.lora.rank" or "spec.stages[1].type".
        detail: the message without the path, in the API server's wording.
    """

    path: str
    detail: str

    @property
    def blocks_rules(self) -> bool:
        """Schema errors after which the API server skips the CEL rules."""
        return self.detail.startswith(_BLOCKING) or " in body must be of type " in self.detail

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path else self.detail


def kind_for(obj: dict[str, Any]) -> Kind | None:
    """The kubetune kind of a manifest, or None if it is not one of ours."""
    for kind in KINDS:
        if obj.get("kind") == kind.kind:
            return kind
    return None


def is_kubetune_manifest(obj: Any) -> bool:
    """True for a mapping whose apiVersion is in the kubetune.io group."""
    return isinstance(obj, dict) and str(obj.get("apiVersion", "")).startswith("kubetune.io/")


# --- paths and values in the API server's notation -------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _show(value: Any) -> str:
    """A value as the API server prints it in "Invalid value: …"."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(_type_name(value))


# --- defaulting ----------------------------------------------------------------------------


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Apply schema defaults as the API server does: inside objects that are present."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out = {}
        for key, item in value.items():
            sub = props.get(key) or schema.get("additionalProperties")
            out[key] = apply_defaults(item, sub) if isinstance(sub, dict) else item
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = apply_defaults(copy.deepcopy(sub["default"]), sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


# --- structural schema -----------------------------------------------------------------


def _to_jsonschema(schema: Schema) -> Schema:
    """The CRD schema as a JSON schema that also refuses unknown fields (strict mode)."""
    out: Schema = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("description", "default"):
            continue
        if key == "properties":
            out[key] = {k: _to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _to_jsonschema(value)
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _schema_error(error: jsonschema.ValidationError) -> list[FieldError]:
    path = ""
    for part in error.absolute_path:
        path = _join(path, part)
    value = error.instance
    validator, bound = error.validator, error.validator_value
    if validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return [FieldError(_join(path, m), "Required value") for m in missing]
    if validator == "additionalProperties":
        extra = sorted(set(value) - set(error.schema.get("properties", {})))
        return [FieldError(_join(path, k), f'unknown field "{_join(path, k)}"') for k in extra]
    if validator == "enum":
        supported = ", ".join(json.dumps(v) for v in bound)
        return [
            FieldError(path, f"Unsupported value: {_show(value)}: supported values: {supported}")
        ]
    if validator == "type":
        wanted = bound if isinstance(bound, str) else " or ".join(bound)
        detail = f'{path} in body must be of type {wanted}: "{_type_name(value)}"'
        return [FieldError(path, f"Invalid value: {json.dumps(_type_name(value))}: {detail}")]
    details = {
        "pattern": f"{path} in body should match '{bound}'",
        "minimum": f"{path} in body should be greater than or equal to {bound}",
        "maximum": f"{path} in body should be less than or equal to {bound}",
        "minLength": f"{path} in body should be at least {bound} chars long",
        "minItems": f"{path} in body should have at least {bound} items",
        "minProperties": f"{path} in body should have at least {bound} properties",
    }
    if validator in details:
        return [FieldError(path, f"Invalid value: {_show(value)}: {details[validator]}")]
    if validator == "maxLength":
        return [FieldError(path, f"Too long: may not be more than {bound} bytes")]
    if validator == "maxItems":
        return [FieldError(path, f"Too many: {len(value)}: must have at most {bound} items")]
    if validator == "maxProperties":
        return [FieldError(path, f"Too many: {len(value)}: must have at most {bound} items")]
    return [FieldError(path, error.message)]


@cache
def _validator(kind_name: str) -> jsonschema.Draft202012Validator:
    kind = next(k for k in KINDS if k.kind == kind_name)
    return jsonschema.Draft202012Validator(_to_jsonschema(openapi_schema(kind.model)))


@cache
def _schema(kind_name: str) -> Schema:
    kind = next(k for k in KINDS if k.kind == kind_name)
    return openapi_schema(kind.model)


def schema_errors(obj: dict[str, Any], kind: Kind) -> list[FieldError]:
    """Structural-schema problems, in the API server's wording."""
    errors: list[FieldError] = []
    for error in _validator(kind.kind).iter_errors(obj):
        errors.extend(_schema_error(error))
    return sorted(set(errors), key=lambda e: (e.path, e.detail))


# --- CEL rules ---------------------------------------------------------------------------


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _walk_rules(value: Any, schema: Schema, path: str) -> Iterator[tuple[str, Any, Schema]]:
    if "x-kubernetes-validations" in schema:
        yield path, value, schema
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                yield from _walk_rules(item, sub, _join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _walk_rules(item, schema["items"], _join(path, index))


def _field_path(path: str, field_path: str) -> str:
    if not field_path:
        return path
    return (path + field_path) if path else field_path.lstrip(".")


def cel_errors(obj: dict[str, Any], kind: Kind) -> list[FieldError]:
    """Failures of the CRD's x-kubernetes-validations rules (on a defaulted object).

    A rule that cannot be evaluated because a value has the wrong type counts as passed:
    the schema check reports that value.
    """
    errors = []
    for path, value, schema in _walk_rules(obj, _schema(kind.kind), ""):
        if value is None:
            continue
        activation = {"self": json_to_cel(value)}
        for rule in schema["x-kubernetes-validations"]:
            try:
                result = _program(rule["rule"]).evaluate(activation)
            except CELEvalError:
                continue
            if isinstance(result, CELEvalError):
                continue
            if not bool(result):
                # The API server reports the rule's message at the rule's fieldPath.
                errors.append(
                    FieldError(
                        _field_path(path, rule.get("fieldPath", "")),
                        f"Invalid value: {rule['message']}",
                    )
                )
    return errors


# --- pydantic ----------------------------------------------------------------------------


def _loc_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, str) and part.startswith(("function-", "union[", "constrained-")):
            continue
        path = _join(path, part if isinstance(part, int) else to_camel(part))
    return path


def model_errors(obj: dict[str, Any], model: type[BaseModel]) -> list[FieldError]:
    """Problems pydantic finds (it mirrors the CEL rules with the same messages)."""
    try:
        model.model_validate(obj)
    except ValidationError as exc:
        return [FieldError(_loc_path(e["loc"]), e["msg"]) for e in exc.errors()]
    return []


# --- entry point -------------------------------------------------------------------------


def validate_manifest(obj: Any) -> list[FieldError]:
    """Every problem with one kubetune manifest; an empty list means it is valid."""
    if not isinstance(obj, dict):
        return [FieldError("", "a manifest must be a mapping with apiVersion, kind, metadata")]
    if obj.get("apiVersion") != API_VERSION:
        return [
            FieldError(
                "apiVersion",
                f"Unsupported value: {_show(obj.get('apiVersion'))}: supported values: "
                f'"{API_VERSION}"',
            )
        ]
    kind = kind_for(obj)
    if kind is None:
        supported = ", ".join(json.dumps(k.kind) for k in KINDS)
        return [
            FieldError(
                "kind",
                f"Unsupported value: {_show(obj.get('kind'))}: supported values: {supported}",
            )
        ]
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not (metadata.get("name") or metadata.get("generateName")):
        return [FieldError("metadata.name", "Required value: name or generateName is required")]
    defaulted = apply_defaults(obj, _schema(kind.kind))
    errors = schema_errors(defaulted, kind)
    unknown = [e for e in errors if e.detail.startswith("unknown field")]
    if unknown:
        # Strict field validation refuses the request before validating anything else.
        return unknown
    if any(e.blocks_rules for e in errors):
        # Like the API server: CEL rules are not evaluated on an object with these errors.
        return [*errors, FieldError("", UNCHECKED_RULES)]
    errors += cel_errors(defaulted, kind)
    if errors:
        return errors
    return model_errors(defaulted, kind.model)
