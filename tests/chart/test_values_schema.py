"""values.schema.json: generated (not stale), refuses typos and wrong types at every level
(checked with jsonschema here, and by helm itself in the `tools` tests), and values.yaml
documents every key with the operator's own defaults."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_tools import CHART_DIR, REPO_ROOT, VALUES_DIR, Helm, merged_values, schema_errors

from kubetune.operator.settings import OperatorSettings

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
VALUES_TEXT = (CHART_DIR / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "chart_schema", REPO_ROOT / "scripts" / "chart_schema.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_schema"] = module
    spec.loader.exec_module(module)
    return module


def test_schema_is_generated_from_the_sources() -> None:
    generator = load_generator()
    assert generator.render() == (CHART_DIR / "values.schema.json").read_text(), (
        "charts/kubetune/values.schema.json is stale: run `python scripts/chart_schema.py`"
    )


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_object_of_the_schema_is_closed() -> None:
    """additionalProperties is false (or a schema for free-form maps) wherever properties
    are listed, including the Kubernetes types."""
    open_objects = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(SCHEMA, "#")
    assert open_objects == []


@pytest.mark.parametrize(
    "files",
    [(), ("namespaced.yaml",), ("monitoring.yaml",), ("gpu-classes.yaml",)],
    ids=["default", "namespaced", "monitoring", "gpu-classes"],
)
def test_values_pass_the_schema(files: tuple[str, ...]) -> None:
    overrides = [yaml.safe_load((VALUES_DIR / f).read_text()) for f in files]
    assert schema_errors(merged_values(*overrides)) == []


def test_settings_defaults_are_the_operators() -> None:
    defaults = OperatorSettings().model_dump(mode="json", by_alias=True)
    defaults["trainerImage"] = ""  # the chart fills in its own trainer image
    unset = {key: "" for key, value in defaults.items() if value is None}  # empty: unset
    assert VALUES["settings"] == {**defaults, **unset}


def test_every_chart_key_is_documented() -> None:
    """Each key the chart defines (not the contents of labels, resources or other Kubernetes
    objects) has a comment right above it in values.yaml."""
    lines = VALUES_TEXT.splitlines()
    undocumented = []

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    def walk(node: yaml.Node, schema: dict[str, Any], path: str) -> None:
        schema = resolve(schema)
        if not isinstance(node, yaml.MappingNode) or "properties" not in schema:
            return
        if path.startswith(
            ("operator.resources", "operator.podSecurityContext", "operator.securityContext")
        ):
            return  # Kubernetes objects: documented by Kubernetes
        for key_node, value_node in node.value:
            key = key_node.value
            child = schema["properties"].get(key, {})
            is_section = (
                isinstance(value_node, yaml.MappingNode)
                and value_node.value
                and "properties" in resolve(child)
            )
            above = lines[key_node.start_mark.line - 1].strip() if key_node.start_mark.line else ""
            if not is_section and not above.startswith("#"):
                undocumented.append(f"{path}{key}")
            walk(value_node, child, f"{path}{key}.")

    root = yaml.compose(VALUES_TEXT)
    assert root is not None
    walk(root, SCHEMA, "")
    assert undocumented == []


# (case, override, the key the error must name)
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("typo at the top", {"setings": {}}, "setings"),
    ("typo in a section", {"operator": {"workerz": 4}}, "workerz"),
    ("typo in the settings", {"settings": {"gpuClasess": []}}, "gpuClasess"),
    (
        "typo in a GPU class",
        {"settings": {"gpuClasses": [{"name": "l4", "memoryGiB": 22.5, "nodeSelektor": {}}]}},
        "nodeSelektor",
    ),
    ("number for a quantity string", {"settings": {"defaultCpu": 8}}, "defaultCpu"),
    ("not a quantity", {"settings": {"defaultMemory": "64 gigabytes"}}, "defaultMemory"),
    ("GPU class without memory", {"settings": {"gpuClasses": [{"name": "l4"}]}}, "memoryGiB"),
    ("string for a boolean", {"settings": {"allowBuiltinRandom": "yes"}}, "allowBuiltinRandom"),
    (
        "namespace that is not a DNS label",
        {"settings": {"watchNamespaces": ["ML_Team"]}},
        "watchNamespaces",
    ),
    (
        "typo inside an affinity",
        {
            "operator": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpresions": []}]
                        }
                    }
                }
            }
        },
        "matchExpresions",
    ),
    (
        "typo in a toleration",
        {"operator": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}},
        "efect",
    ),
    (
        "typo in the security context",
        {"operator": {"securityContext": {"readOnlyRootFileSystem": True}}},
        "readOnlyRootFileSystem",
    ),
    ("unknown pull policy", {"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ("bad digest", {"image": {"digest": "latest"}}, "digest"),
    ("port out of range", {"operator": {"metricsPort": 70000}}, "metricsPort"),
    (
        "bad scrape interval",
        {"monitoring": {"serviceMonitor": {"interval": "30 seconds"}}},
        "serviceMonitor.interval",
    ),
    ("typo in monitoring", {"monitoring": {"prometheusRule": {"enable": True}}}, "enable"),
]


@pytest.mark.parametrize(
    ("override", "needle"), [pytest.param(o, n, id=i) for i, o, n in BAD_VALUES]
)
def test_bad_values_are_refused(override: dict[str, Any], needle: str) -> None:
    found = schema_errors(merged_values(override))
    assert found, "accepted"
    assert any(needle in e for e in found), found


@pytest.mark.tools
@pytest.mark.parametrize(
    ("override", "needle"), [pytest.param(o, n, id=i) for i, o, n in BAD_VALUES]
)
def test_helm_refuses_bad_values(
    helm: Helm, tmp_path: Path, override: dict[str, Any], needle: str
) -> None:
    values = tmp_path / "bad.yaml"
    values.write_text(yaml.safe_dump(override))
    done = helm.template_text(str(values))
    assert done.returncode != 0, "helm accepted the values"
    assert "values don't meet the specifications of the schema" in done.stderr
    assert needle in done.stderr, done.stderr
