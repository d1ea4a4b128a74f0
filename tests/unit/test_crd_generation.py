"""The CRDs are generated from the models, structural, bounded and up to date."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from kubetune.api.crd import KINDS, build_crds, openapi_schema
from kubetune.api.generate import generated_files, stale_files

Schema = dict[str, Any]
FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "nullable"}
# Kubernetes CEL extensions the project must not rely on (DESIGN §8: standard CEL only).
EXTENSION_FUNCTIONS = ("quantity(", "isURL(", ".split(", ".lowerAscii(", "url(", "ip(")


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


ALL_NODES = [
    (kind.kind + path, node) for kind in KINDS for path, node in walk(openapi_schema(kind.model))
]


def test_generated_files_are_up_to_date(repo_root: Path) -> None:
    assert stale_files(repo_root) == [], "run `make generate`"


def test_generated_files_cover_both_kinds_the_charts_copy_and_the_api_doc() -> None:
    files = generated_files()
    assert set(files) == {
        "crds/kubetune.io_finetunejobs.yaml",
        "crds/kubetune.io_modeldeployments.yaml",
        "charts/kubetune/crds/kubetune.io_finetunejobs.yaml",
        "charts/kubetune/crds/kubetune.io_modeldeployments.yaml",
        "docs/api.md",
    }
    for name in ("kubetune.io_finetunejobs.yaml", "kubetune.io_modeldeployments.yaml"):
        assert files[f"charts/kubetune/crds/{name}"] == files[f"crds/{name}"]


@pytest.mark.parametrize(("path", "node"), ALL_NODES, ids=[p for p, _ in ALL_NODES])
def test_schema_node_is_structural_and_bounded(path: str, node: Schema) -> None:
    assert not FORBIDDEN_KEYS & set(node), f"{path} has {FORBIDDEN_KEYS & set(node)}"
    if node.get("x-kubernetes-int-or-string"):
        assert "type" not in node
        return
    if path.endswith(".metadata"):
        assert node == {"type": "object"}
        return
    if path.endswith((".apiVersion", ".kind")) and path.count(".") == 1:
        return  # standard fields, validated by the API server itself
    assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
    if node.get("type") == "string" and "enum" not in node:
        assert "maxLength" in node, f"{path}: strings need maxLength (CEL cost, etcd size)"
    if node.get("type") == "array":
        assert "maxItems" in node, f"{path}: lists need maxItems"
    if node.get("type") == "object" and "additionalProperties" in node:
        assert "maxProperties" in node, f"{path}: maps need maxProperties"


@pytest.mark.parametrize(("path", "node"), ALL_NODES, ids=[p for p, _ in ALL_NODES])
def test_every_field_is_described(path: str, node: Schema) -> None:
    if path.count(".") >= 1 and not path.endswith(("[]", "{}", ".metadata")):
        assert node.get("description"), f"{path} has no description (kubectl explain shows it)"


RULES = [
    (path, rule) for path, node in ALL_NODES for rule in node.get("x-kubernetes-validations", [])
]


@pytest.mark.parametrize(
    ("path", "rule"), RULES, ids=[f"{p}:{r['message'][:40]}" for p, r in RULES]
)
def test_cel_rule_is_standard_cel(path: str, rule: dict[str, str]) -> None:
    env = celpy.Environment()
    env.compile(rule["rule"])  # raises on a syntax error
    assert not any(f in rule["rule"] for f in EXTENSION_FUNCTIONS), rule["rule"]
    assert "\\" not in rule["rule"], "no escapes: RE2 and CEL string escaping differ"
    assert rule["message"]
    assert len(rule["message"]) < 300


def test_names_columns_and_subresources() -> None:
    by_kind = {crd["spec"]["names"]["kind"]: crd for crd in build_crds()}
    ftj, md = by_kind["FineTuneJob"], by_kind["ModelDeployment"]
    assert ftj["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert ftj["spec"]["names"]["shortNames"] == ["ftj"]
    assert md["spec"]["names"]["shortNames"] == ["md"]
    for crd in (ftj, md):
        assert crd["spec"]["names"]["categories"] == ["kubetune"]
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in ftj["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:6] == ["Stage", "Progress", "Loss", "ETA", "Succeeded", "Age"]


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    for kind in KINDS:
        conditions = openapi_schema(kind.model)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert "type" in conditions["items"]["required"]


def test_defaults_are_valid_wire_values() -> None:
    spec = openapi_schema(KINDS[0].model)["properties"]["spec"]["properties"]
    assert spec["method"]["default"] == "LoRA"
    assert spec["stages"]["default"] == [{"type": "SFT"}]
    assert spec["resources"]["properties"]["gpus"]["default"] == "Auto"


def test_crds_yaml_round_trips(repo_root: Path) -> None:
    for path in sorted((repo_root / "crds").glob("*.yaml")):
        (crd,) = list(yaml.safe_load_all(path.read_text()))
        assert crd in build_crds()
