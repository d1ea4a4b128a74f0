"""The real CRD API server harness (tests/support/apiserver.py) and the server's own
validation wording.

Needs the binaries from `make apiserver` (scripts/build-apiextensions-apiserver.sh).

The exact 422 messages the server gives are kept in
tests/integration/data/apiserver_validation_messages.json (a golden file that offline
validators can be checked against). Regenerate it after a server upgrade with
``KUBETUNE_UPDATE_GOLDEN=1 pytest -m apiserver tests/integration/test_apiserver_harness.py``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from support.apiserver import CRDApiServer

pytestmark = pytest.mark.apiserver

GROUP = "harness.kubetune.test"
API_VERSION = f"{GROUP}/v1"
GOLDEN = Path(__file__).parent / "data" / "apiserver_validation_messages.json"

CEL_RULES: list[dict] = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "minReplicas must not exceed maxReplicas",
    },
    {
        "rule": "!has(self.lora) || self.lora.rank <= 64 || self.precision == 'fp32'",
        # A string() of an int here exceeds the CEL cost budget at CRD creation.
        "messageExpression": "'lora.rank above 64 needs precision fp32, got ' + self.precision",
        "fieldPath": ".lora.rank",
        "reason": "FieldValueForbidden",
    },
    {"rule": "self.model != 'forbidden'"},
]

WIDGET_CRD: dict = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "listKind": "WidgetList",
            "shortNames": ["wg"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["model"],
                                "x-kubernetes-validations": CEL_RULES,
                                "properties": {
                                    "model": {
                                        "type": "string",
                                        "maxLength": 20,
                                        "pattern": "^[a-z0-9-]+$",
                                    },
                                    "precision": {
                                        "type": "string",
                                        "enum": ["fp32", "bf16", "fp16"],
                                        "default": "bf16",
                                        "maxLength": 8,
                                    },
                                    "minReplicas": {"type": "integer", "minimum": 0, "default": 1},
                                    "maxReplicas": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": 8,
                                        "default": 1,
                                    },
                                    "learningRate": {
                                        "type": "number",
                                        "minimum": 0,
                                        "exclusiveMinimum": True,
                                    },
                                    "tags": {
                                        "type": "array",
                                        "maxItems": 2,
                                        "items": {"type": "string", "minLength": 1},
                                    },
                                    "lora": {
                                        "type": "object",
                                        "required": ["rank"],
                                        "properties": {
                                            "rank": {
                                                "type": "integer",
                                                "minimum": 1,
                                                "maximum": 256,
                                            },
                                            "targetModules": {
                                                "type": "array",
                                                "minItems": 1,
                                                "items": {"type": "string"},
                                                "x-kubernetes-list-type": "set",
                                            },
                                        },
                                    },
                                    "env": {
                                        "type": "object",
                                        "maxProperties": 2,
                                        "additionalProperties": {"type": "string"},
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "phase": {
                                        "type": "string",
                                        "enum": ["Pending", "Running", "Done"],
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}

# name -> spec that violates exactly the named constraint (or is valid).
INVALID_SPECS: dict[str, dict] = {
    "enum": {"model": "m", "precision": "int3"},
    "pattern": {"model": "Bad_Name"},
    "maxLength": {"model": "a" * 25},
    "minLength": {"model": "m", "tags": [""]},
    "maxItems": {"model": "m", "tags": ["a", "b", "c"]},
    "minItems": {"model": "m", "lora": {"rank": 8, "targetModules": []}},
    "maxProperties": {"model": "m", "env": {"a": "1", "b": "2", "c": "3"}},
    "minimum": {"model": "m", "lora": {"rank": 0}},
    "maximum": {"model": "m", "maxReplicas": 9},
    "exclusiveMinimum": {"model": "m", "learningRate": 0},
    "required": {"precision": "bf16"},
    "required_nested": {"model": "m", "lora": {}},
    "type_string_got_integer": {"model": 5},
    "type_integer_got_string": {"model": "m", "maxReplicas": "two"},
    "type_integer_got_float": {"model": "m", "maxReplicas": 1.5},
    "type_object_got_string": {"model": "m", "lora": "yes"},
    "type_array_got_string": {"model": "m", "tags": "a"},
    "list_set_duplicate": {"model": "m", "lora": {"rank": 4, "targetModules": ["q", "q"]}},
    "cel_message": {"model": "m", "minReplicas": 3, "maxReplicas": 2},
    "cel_messageExpression_fieldPath_reason": {"model": "m", "lora": {"rank": 128}},
    "cel_no_message": {"model": "forbidden"},
    "several": {"model": "Bad_Name", "precision": "x", "lora": {"rank": 0}},
}

SKIPPED_CEL_CAUSE = {
    "reason": "FieldValueInvalid",
    "message": "Invalid value: null: some validation rules were not checked because the object "
    "was invalid; correct the existing errors to complete validation",
    "field": "<nil>",
}


def widget(name: str, spec: dict, **metadata) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "Widget",
        "metadata": {"name": name, **metadata},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def api():
    with CRDApiServer() as server:
        server.apply_crd(WIDGET_CRD)
        yield server


def causes(body: dict) -> list[dict]:
    return body.get("details", {}).get("causes", [])


def fields(body: dict) -> list[str]:
    return [c.get("field") for c in causes(body)]


# ------------------------------------------------------------------- the harness
def test_server_identity_and_kubeconfig(api: CRDApiServer):
    status, version = api.request("GET", "/version")
    assert status == 200
    assert version["major"] == "1"
    assert version["gitVersion"].startswith("v1.")
    assert api.base_url.startswith("https://127.0.0.1:")
    assert api.kubeconfig_path.is_file()
    assert api.base_url in api.kubeconfig_path.read_text()
    groups = {g["name"] for g in api.api_group_list()["groups"]}
    assert {GROUP, "apiextensions.k8s.io"} <= groups


def test_valid_object_created_with_defaults(api: CRDApiServer):
    status, body = api.create(widget("valid", {"model": "smollm2"}))
    assert status == 201, body
    assert body["spec"] == {
        "model": "smollm2",
        "precision": "bf16",
        "minReplicas": 1,
        "maxReplicas": 1,
    }
    assert body["metadata"]["namespace"] == "default"
    assert body["metadata"]["resourceVersion"]
    status, got = api.get(API_VERSION, "widgets", "valid")
    assert status == 200
    assert got["spec"]["precision"] == "bf16"


def test_namespace_needs_no_namespace_object(api: CRDApiServer):
    status, body = api.create(widget("elsewhere", {"model": "m"}), namespace="team-a")
    assert status == 201, body
    assert body["metadata"]["namespace"] == "team-a"


def test_enum_violation_is_422_naming_the_field(api: CRDApiServer):
    status, body = api.create(widget("bad-enum", {"model": "m", "precision": "int3"}))
    assert status == 422
    assert body["kind"] == "Status"
    assert body["reason"] == "Invalid"
    assert body["code"] == 422
    assert "spec.precision" in fields(body)
    cause = next(c for c in causes(body) if c["field"] == "spec.precision")
    assert cause["reason"] == "FieldValueNotSupported"
    assert cause["message"] == 'Unsupported value: "int3": supported values: "fp32", "bf16", "fp16"'


def test_cel_violation_is_422_with_rule_message(api: CRDApiServer):
    status, body = api.create(widget("bad-cel", {"model": "m", "minReplicas": 3, "maxReplicas": 2}))
    assert status == 422
    assert causes(body) == [
        {
            "reason": "FieldValueInvalid",
            "field": "spec",
            "message": "Invalid value: minReplicas must not exceed maxReplicas",
        }
    ]
    assert body["message"].endswith("spec: Invalid value: minReplicas must not exceed maxReplicas")


def test_cel_message_expression_field_path_and_reason(api: CRDApiServer):
    status, body = api.create(widget("bad-cel2", {"model": "m", "lora": {"rank": 128}}))
    assert status == 422
    assert causes(body) == [
        {
            "reason": "FieldValueForbidden",
            "field": "spec.lora.rank",
            "message": "Forbidden: lora.rank above 64 needs precision fp32, got bf16",
        }
    ]


def test_unknown_fields_are_pruned_with_warnings(api: CRDApiServer):
    spec = {"model": "m", "bogus": 1, "lora": {"rank": 4, "alpha": 3}}
    status, body = api.create(widget("pruned", spec))
    assert status == 201, body
    assert "bogus" not in body["spec"]
    assert body["spec"]["lora"] == {"rank": 4}
    assert api.last_warnings == ['unknown field "spec.bogus"', 'unknown field "spec.lora.alpha"']
    status, body = api.create(widget("strict", spec), fieldValidation="Strict")
    assert status == 400
    assert body["reason"] == "BadRequest"
    assert (
        'strict decoding error: unknown field "spec.bogus", unknown field "spec.lora.alpha"'
        in body["message"]
    )


def test_status_subresource_conflicts_finalizers_and_apply(api: CRDApiServer):
    assert api.create(widget("life", {"model": "m"}, finalizers=["kubetune.io/cleanup"]))[0] == 201
    status, body = api.patch_status(API_VERSION, "Widget", "life", {"phase": "Running"})
    assert status == 200
    assert body["status"] == {"phase": "Running"}
    status, body = api.patch_status(API_VERSION, "Widget", "life", {"phase": "Nope"})
    assert status == 422
    assert "status.phase" in fields(body)
    # status changes through the main resource are ignored (status subresource enabled)
    status, body = api.patch(API_VERSION, "Widget", "life", {"status": {"phase": "Done"}})
    assert status == 200
    assert body["status"] == {"phase": "Running"}

    stale = copy.deepcopy(body)
    stale["metadata"]["resourceVersion"] = "1"
    status, conflict = api.replace(stale)
    assert status == 409
    assert conflict["reason"] == "Conflict"
    assert api.create(widget("life", {"model": "m"}))[1]["reason"] == "AlreadyExists"

    status, _ = api.delete(API_VERSION, "Widget", "life")
    assert status == 200
    status, body = api.get(API_VERSION, "Widget", "life")
    assert status == 200
    assert body["metadata"]["deletionTimestamp"]
    assert api.patch(API_VERSION, "Widget", "life", {"metadata": {"finalizers": None}})[0] == 200
    status, body = api.get(API_VERSION, "Widget", "life")
    assert status == 404
    assert body["reason"] == "NotFound"

    status, body = api.patch(
        API_VERSION, "Widget", "applied", widget("applied", {"model": "m"}), patch_type="apply"
    )
    assert status == 201
    assert body["spec"]["precision"] == "bf16"


def test_invalid_crd_is_rejected(api: CRDApiServer):
    bad = copy.deepcopy(WIDGET_CRD)
    bad["metadata"]["name"] = f"gadgets.{GROUP}"
    bad["spec"]["names"] = {"plural": "gadgets", "kind": "Gadget"}
    bad["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "x"
    ] = {"type": "strin"}
    with pytest.raises(RuntimeError, match=r'properties\[x\]\.type: Unsupported value: "strin"'):
        api.apply_crd(bad)


# ------------------------------------------------- the server's exact wording
def test_validation_messages_match_golden(api: CRDApiServer):
    observed: dict[str, dict] = {}
    for i, (case, spec) in enumerate(INVALID_SPECS.items()):
        name = f"msg-{i}"
        status, body = api.create(widget(name, spec))
        observed[case] = {
            "spec": spec,
            "code": status,
            "message": body.get("message"),
            # When several fields fail, the server's order varies from run to run
            # (Go map iteration): keep them sorted here.
            "causes": sorted(
                causes(body), key=lambda c: (c["field"] == "<nil>", c["field"], c["message"])
            ),
        }
        assert status == 422, (case, body)
        # the object-level message is '<Kind>.<group> "<name>" is invalid: <cause list>'
        assert body["message"].startswith(f'Widget.{GROUP} "{name}" is invalid: ')

    # CEL rules are skipped when the schema check found type/required/enum/size errors,
    # and the server then adds this extra cause; not for pattern/minimum/maximum.
    assert SKIPPED_CEL_CAUSE in observed["enum"]["causes"]
    assert SKIPPED_CEL_CAUSE not in observed["pattern"]["causes"]

    data = {
        "about": "Real responses of apiextensions-apiserver to invalid custom resources "
        "(tests/integration/test_apiserver_harness.py). Messages use the object "
        "name the test used (msg-<index>).",
        "server": api.request("GET", "/version")[1].get("gitVersion"),
        "crd": WIDGET_CRD,
        "cases": observed,
    }
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for case, got in observed.items():
        want = golden["cases"][case]
        assert got["causes"] == want["causes"], f"server wording changed for {case!r}"
        if len(got["causes"]) > 1:
            # same parts, maybe in another order
            assert len(got["message"]) == len(want["message"]), case
            for c in got["causes"]:
                assert f"{c['field']}: {c['message']}" in got["message"], (case, c)
        else:
            assert got["message"] == want["message"], f"server wording changed for {case!r}"
