"""Operator settings: the file Helm renders, the environment overrides, and the errors a
platform engineer sees when a value is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.operator.settings import (
    DEFAULT_GPU_RESOURCE,
    SETTINGS_ENV,
    TRAINER_IMAGE_ENV,
    VLLM_IMAGE_ENV,
    GPUClass,
    OperatorSettings,
    SettingsError,
    load_settings,
    parse_settings,
)

HELM_VALUES = """\
trainerImage: registry.example.com/kubetune/trainer:1.2.3
imagePullSecrets: [registry-creds]
gpuClasses:
  - name: l4-24gb
    memoryGiB: 22.5
    nodeSelector:
      nvidia.com/gpu.product: NVIDIA-L4
  - name: h100-80gb
    memoryGiB: 79.6
    nodeSelector:
      nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    gpusPerNode: 8
defaultShmSize: 32Gi
uploadBandwidthMiBps: 500
allowBuiltinRandom: true
watchNamespaces: [ml-team, research]
"""


def test_defaults_without_a_settings_file() -> None:
    settings = load_settings({})
    assert settings == OperatorSettings()
    assert settings.run_as_user == 1000
    assert settings.metrics_port == 9400
    assert settings.gpu_classes == []
    assert not settings.allow_builtin_random


def test_yaml_file_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(HELM_VALUES)
    settings = load_settings({SETTINGS_ENV: str(path)})
    assert settings.trainer_image == "registry.example.com/kubetune/trainer:1.2.3"
    assert [g.name for g in settings.gpu_classes] == ["l4-24gb", "h100-80gb"]
    h100 = settings.gpu_class("h100-80gb")
    assert h100 is not None
    assert h100.memory_gib == pytest.approx(79.6)
    assert h100.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert h100.resource_name == DEFAULT_GPU_RESOURCE
    assert settings.gpu_class("a100") is None
    assert settings.default_shm_size == "32Gi"
    assert settings.upload_bandwidth_mib_s == 500
    assert settings.allow_builtin_random
    assert settings.watch_namespaces == ["ml-team", "research"]


def test_json_file_works_too(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"gpuClasses": [{"name": "t4", "memoryGiB": 15}]}))
    assert load_settings({SETTINGS_ENV: str(path)}).gpu_classes[0].memory_gib == 15


def test_image_environment_overrides_beat_the_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("trainerImage: from-file:1\nvllm_image: from-file:2\n")
    settings = load_settings(
        {SETTINGS_ENV: str(path), TRAINER_IMAGE_ENV: "dev:latest", VLLM_IMAGE_ENV: "vllm:dev"}
    )
    assert (settings.trainer_image, settings.vllm_image) == ("dev:latest", "vllm:dev")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("")
    assert load_settings({SETTINGS_ENV: str(path)}) == OperatorSettings()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param({"gpuClases": []}, "gpuClases: Extra inputs are not permitted", id="typo"),
        pytest.param(
            {"gpuClasses": [{"name": "a", "memoryGiB": -1}]},
            "gpuClasses[0].memoryGiB: Input should be greater than 0",
            id="negative-memory",
        ),
        pytest.param(
            {"gpuClasses": [{"name": "a", "memoryGiB": 1, "memory": 2}]},
            "gpuClasses[0].memory: Extra inputs are not permitted",
            id="unknown-class-key",
        ),
        pytest.param(
            {"gpuClasses": [{"name": "a", "memoryGiB": 1}, {"name": "a", "memoryGiB": 2}]},
            "gpuClasses[1].name 'a' is listed twice",
            id="duplicate-class",
        ),
        pytest.param(
            {"gpuClasses": [{"name": "H100 80GB", "memoryGiB": 80}]},
            "gpuClasses[0].name: 'H100 80GB' is not a DNS label",
            id="class-name",
        ),
        pytest.param(
            {"runAsUser": 0}, "runAsUser: Input should be greater than or equal to 1", id="root"
        ),
        pytest.param(
            {"defaultMemory": "lots"},
            "defaultMemory: 'lots' is not a Kubernetes quantity",
            id="quantity",
        ),
        pytest.param(
            {"uploadBandwidthMiBps": 0},
            "uploadBandwidthMiBps: Input should be greater than 0",
            id="bandwidth",
        ),
    ],
)
def test_invalid_settings_name_the_setting(data: dict[str, object], expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings(data, "values.yaml")
    assert "invalid operator settings (values.yaml)" in str(caught.value)
    assert expected in str(caught.value)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings({"runAsUser": 0, "metricsPort": 70000})
    assert "runAsUser" in str(caught.value)
    assert "metricsPort" in str(caught.value)


def test_missing_file_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SettingsError, match=f"{missing}.*{SETTINGS_ENV}"):
        load_settings({SETTINGS_ENV: str(missing)})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("- a\n- b\n", "must hold a mapping of settings, not list", id="list"),
        pytest.param("gpuClasses: [\n", "is not YAML/JSON", id="broken"),
    ],
)
def test_unparseable_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=expected):
        load_settings({SETTINGS_ENV: str(path)})


def test_settings_are_immutable() -> None:
    settings = OperatorSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.trainer_image = "other"


def test_every_setting_is_documented() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "operator.md").read_text()
    keys = [f.alias or name for name, f in OperatorSettings.model_fields.items()]
    keys += [f.alias or name for name, f in GPUClass.model_fields.items()]
    # Settings keys appear in backticks in the table, GPU class keys in the YAML example.
    missing = [key for key in keys if f"`{key}`" not in doc and f" {key}: " not in doc]
    assert missing == []
