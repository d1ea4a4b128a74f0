"""The generated CRDs on the real apiextensions-apiserver: they install, every example is
accepted (with the same defaults `kubetune validate` applies), every catalog case is
refused at its field with its message, and the status subresource and printer columns
work as kubectl users see them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from catalog import Case, load_catalog
from kubetune.api import API_VERSION
from kubetune.api.crd import KINDS, openapi_schema
from kubetune.api.validation import UNCHECKED_RULES, apply_defaults
from support.apiserver import CRDApiServer

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CASES = load_catalog()


@pytest.fixture(scope="module")
def api() -> Iterator[CRDApiServer]:
    with CRDApiServer() as server:
        for path in sorted((REPO / "crds").glob("*.yaml")):
            server.apply_crd_yaml(path)
        yield server


def strict_create(api: CRDApiServer, manifest: dict[str, Any], name: str) -> tuple[int, Any]:
    obj = copy.deepcopy(manifest)
    obj["metadata"] = {**obj["metadata"], "name": name, "namespace": "catalog"}
    return api.create(obj, fieldValidation="Strict")


def causes(body: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c.get("field", ""), c["message"]) for c in body.get("details", {}).get("causes", [])}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted_with_the_same_defaults(api: CRDApiServer, path: Path) -> None:
    for manifest in yaml.safe_load_all(path.read_text()):
        status, body = api.create(manifest, fieldValidation="Strict")
        assert status == 201, body
        kind = next(k for k in KINDS if k.kind == manifest["kind"])
        expected = apply_defaults(manifest, openapi_schema(kind.model))
        assert body["spec"] == expected["spec"], "server defaulting differs from apply_defaults"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_catalog_case_is_refused_at_its_field(api: CRDApiServer, case: Case) -> None:
    name = case.manifest["metadata"]["name"]
    if name == "bad":
        name = case.name.split("-", 1)[1][:40].strip("-")
    status, body = strict_create(api, case.manifest, name)
    if case.message.startswith("unknown field"):
        assert status == 400, body
        assert f"strict decoding error: {case.message}" in body["message"]
        return
    assert status == 422, body
    field = case.path or "<nil>"
    assert (field, case.message) in causes(body), causes(body)


def test_schema_errors_skip_the_rules_like_offline_validation(api: CRDApiServer) -> None:
    case = next(c for c in CASES if c.name.endswith("method-typo"))
    status, body = strict_create(api, case.manifest, "skip-rules")
    assert status == 422
    assert ("<nil>", UNCHECKED_RULES) in causes(body)


def test_status_subresource_and_printer_columns(api: CRDApiServer) -> None:
    job = yaml.safe_load((REPO / "examples" / "finetunejob-lora.yaml").read_text())
    job["metadata"] = {"name": "columns", "namespace": "printers"}
    status, body = api.create(job)
    assert status == 201, body
    status_patch = {
        "observedGeneration": 1,
        "stage": "Training",
        "progress": {
            "step": 120,
            "totalSteps": 500,
            "percent": "24%",
            "loss": "1.234",
            "eta": "12m",
        },
        "conditions": [
            {
                "type": "Succeeded",
                "status": "Unknown",
                "reason": "Running",
                "message": "training",
                "lastTransitionTime": "2026-11-29T04:00:00Z",
                "observedGeneration": 1,
            }
        ],
    }
    status, body = api.patch_status(API_VERSION, "FineTuneJob", "columns", status_patch, "printers")
    assert status == 200, body
    assert body["status"]["progress"]["percent"] == "24%"
    # A spec change in a status write is ignored (status subresource).
    status, body = api.patch(
        API_VERSION,
        "finetunejobs",
        "columns",
        {"spec": {"method": "Full"}, "status": {"stage": "Failed"}},
        "printers",
        subresource="status",
    )
    assert status == 200
    assert body["spec"]["method"] == "LoRA"
    # What `kubectl get ftj` shows.
    status, table = api.request(
        "GET",
        api.path_for(API_VERSION, "finetunejobs", None, "printers"),
        headers={"Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"},
    )
    assert status == 200, table
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:7] == ["Name", "Stage", "Progress", "Loss", "ETA", "Succeeded", "Age"]
    row = table["rows"][0]["cells"]
    assert row[:6] == ["columns", "Failed", "24%", "1.234", "12m", "Unknown"]


def test_invalid_status_is_refused(api: CRDApiServer) -> None:
    md = yaml.safe_load((REPO / "examples" / "modeldeployment-merged.yaml").read_text())
    md["metadata"] = {"name": "bad-status", "namespace": "printers"}
    assert api.create(md)[0] == 201
    status, body = api.patch_status(
        API_VERSION,
        "ModelDeployment",
        "bad-status",
        {
            "conditions": [
                {"type": "Ready", "status": "Maybe", "reason": "X", "lastTransitionTime": "t"}
            ]
        },
        "printers",
    )
    assert status == 422
    assert any('Unsupported value: "Maybe"' in m for _, m in causes(body))
