"""What a ModelDeployment renders: the checks, the vLLM command line and every object.

Every rendered object is validated against the Kubernetes 1.30 and 1.36 schemas in strict
mode. The ServiceMonitor and the KEDA ScaledObject are custom resources whose CRDs are
not available offline; they are checked against the subset of their schemas written out
below (the fields used, their types, and no unknown field at those levels).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.methods import Method
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, Variant
from kubetune.api.v1alpha1.status import Artifacts, FineTuneJobStatus, RunRecord, RunState
from kubetune.operator import names
from kubetune.operator.serving import (
    AdapterInfo,
    ClusterFeatures,
    JobRun,
    Resolution,
    ResolvedArtifact,
    ServingError,
    ServingProblem,
    ServingReason,
    artifact_from_manifest,
    combined_digest,
    missing_finetunejob,
    plan_serving,
    resolve_from_finetunejob,
)
from kubetune.operator.serving_args import (
    MANAGED_FLAGS,
    build_vllm_args,
    check_extra_args,
    emitted_flags,
    flag_name,
    lora_rank_for,
    vllm_record,
)
from kubetune.operator.serving_objects import (
    ANNOTATION_ARTIFACT_DIGEST,
    ServingChildren,
    build_serving,
    owner_reference,
    prometheus_query,
)
from kubetune.operator.settings import DEFAULT_VLLM_IMAGE, OperatorSettings
from kubetune.storage.fetch import cache_dir
from kubetune.storage.manifest import FileEntry, Manifest

K8S_VERSIONS = ("1.30.0", "1.36.0")
NAMESPACE = "ml-team"
UID = "0b7c2d4e-0000-4000-8000-00000000000a"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
DIGEST_C = "sha256:" + "c" * 64
BASE = "hf://Qwen/Qwen2.5-0.5B-Instruct"
BASE_REVISION = "7ae557604adf67be50417f59c2c2f167def9a775"
RUN_ROOT = "s3://ml-artifacts/kubetune/ml-team"
SETTINGS = OperatorSettings.model_validate(
    {
        "trainerImage": "registry.example.com/kubetune/trainer:1.0.0",
        "defaultOutputCredentialsSecret": "artifact-store",
        "gpuClasses": [
            {
                "name": "l4-24gb",
                "memoryGiB": 22.5,
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
            },
            {
                "name": "h100-80gb",
                "memoryGiB": 79.6,
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "gpusPerNode": 8,
            },
            {
                "name": "mig-1g",
                "memoryGiB": 9.5,
                "resourceName": "nvidia.com/mig-1g.10gb",
                "gpusPerNode": 7,
            },
        ],
    }
)
NO_FEATURES = ClusterFeatures()
ALL_FEATURES = ClusterFeatures(
    keda_installed=True,
    servicemonitor_crd=True,
    prometheus_url="http://prometheus-operated.monitoring.svc:9090",
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}

# The parts of the CRD schemas the builders use (monitoring.coreos.com/v1 ServiceMonitor,
# keda.sh/v1alpha1 ScaledObject); unknown fields at these levels are refused.
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_LABEL.pattern, "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "ownerReferences": {"type": "array"},
    },
    "additionalProperties": False,
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {
                                "type": "string",
                                "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
CUSTOM_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "ScaledObject": SCALED_OBJECT_SCHEMA}


# --- Fixtures ---------------------------------------------------------------------------


def make_md(
    name: str = "support-bot", labels: dict[str, str] | None = None, **spec: Any
) -> ModelDeployment:
    metadata: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "uid": UID}
    if labels:
        metadata["labels"] = labels
    wire = dict(spec)
    if "model" not in wire and "baseModel" not in wire:
        wire["model"] = {"fineTuneJobRef": {"name": "support-bot"}}
    return ModelDeployment.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": metadata,
            "spec": wire,
        }
    )


def artifact(
    variant: Variant = Variant.MERGED,
    *,
    job: str = "support-bot",
    run_id: str = "4f702c671992",
    digest: str = DIGEST_A,
    method: Method = Method.LORA,
    variants: tuple[Variant, ...] = (Variant.ADAPTER, Variant.MERGED, Variant.W4A16),
    rank: int | None = 16,
    base: str = BASE,
    revision: str | None = BASE_REVISION,
    **fields: Any,
) -> ResolvedArtifact:
    values: dict[str, Any] = {
        "run_uri": f"{RUN_ROOT}/{job}/{run_id}",
        "manifest_digest": digest,
        "variant": variant,
        "variants": frozenset(variants),
        "lineage": {
            "model": {"uri": base, "revision": revision},
            "runId": run_id,
            "method": method.value,
            "dataset": {"uri": "s3://ml-data/train.jsonl", "digest": "sha256:" + "d" * 64},
            "gatePassed": True,
        },
        "metrics": {"tuned": {"ROUGEL": 0.4512, "Perplexity": 3.25}, "base": {"ROUGEL": 0.3}},
        "gate_passed": True,
        "adapter": AdapterInfo(rank=rank) if rank is not None else None,
        "fine_tune_job": job,
    }
    values.update(fields)
    return ResolvedArtifact(**values)


def multi_md(*adapters: str, **extra: Any) -> ModelDeployment:
    spec: dict[str, Any] = {
        "baseModel": {"uri": BASE, "revision": BASE_REVISION},
        "adapters": [{"name": a, "fineTuneJobRef": {"name": a}} for a in adapters],
    }
    spec.update(extra)
    return make_md(**spec)


def multi_resolution(*adapters: str, **per_adapter: ResolvedArtifact) -> Resolution:
    found = {
        name: per_adapter.get(name)
        or artifact(Variant.ADAPTER, job=name, digest="sha256:" + f"{index:064x}")
        for index, name in enumerate(adapters)
    }
    return Resolution(adapters=found)


def assert_schema_valid(obj: dict[str, Any]) -> None:
    schema = CUSTOM_SCHEMAS.get(obj["kind"])
    if schema is not None:
        jsonschema.validate(obj, schema)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} invalid for Kubernetes {version}: {path}: {exc.message}")


def assert_valid(obj: dict[str, Any], md: ModelDeployment) -> None:
    assert_schema_valid(obj)
    metadata = obj["metadata"]
    assert metadata["namespace"] == NAMESPACE
    assert DNS_LABEL.match(metadata["name"])
    assert metadata["ownerReferences"] == [owner_reference(md)]
    labels = metadata["labels"]
    assert labels[names.LABEL_NAME] == "kubetune"
    assert labels[names.LABEL_MANAGED_BY] == "kubetune-operator"
    assert labels[names.LABEL_COMPONENT] == "serving"
    assert labels["kubetune.io/modeldeployment"] == md.metadata.name
    assert len(metadata["annotations"][names.ANNOTATION_SPEC_HASH]) == 64


def build(
    md: ModelDeployment,
    resolution: Resolution | None = None,
    settings: OperatorSettings = SETTINGS,
    features: ClusterFeatures = NO_FEATURES,
) -> ServingChildren:
    if resolution is None:
        resolution = Resolution(
            model=artifact(md.spec.model.variant if md.spec.model else Variant.MERGED)
        )
    children = build_serving(md, resolution, settings, features)
    for obj in children.objects:
        assert_valid(obj, md)
    assert_pod_locked_down(pod_of(children))
    return children


def refuse(
    md: ModelDeployment,
    resolution: Resolution | None = None,
    features: ClusterFeatures = NO_FEATURES,
    settings: OperatorSettings = SETTINGS,
) -> list[ServingProblem]:
    if resolution is None:
        resolution = Resolution(
            model=artifact(md.spec.model.variant if md.spec.model else Variant.MERGED)
        )
    with pytest.raises(ServingError) as caught:
        plan_serving(md, resolution, settings, features)
    return list(caught.value.problems)


def pod_of(children: ServingChildren) -> dict[str, Any]:
    pod: dict[str, Any] = children.deployment["spec"]["template"]["spec"]
    return pod


def vllm_of(children: ServingChildren) -> dict[str, Any]:
    container: dict[str, Any] = pod_of(children)["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def assert_pod_locked_down(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    for container in pod.get("initContainers", []) + pod["containers"]:
        assert container["securityContext"] == {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        for env in container.get("env", []):
            if env["name"] in SECRET_ENV_NAMES:
                assert set(env) == {"name", "valueFrom"}
                assert set(env["valueFrom"]) == {"secretKeyRef"}


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- The recorded vLLM flags ------------------------------------------------------------


def test_the_record_is_for_the_pinned_image() -> None:
    record = vllm_record()
    assert record.image == DEFAULT_VLLM_IMAGE
    assert record.checks_flags_of(DEFAULT_VLLM_IMAGE)
    assert record.checks_flags_of(f"registry.example.com/mirror/vllm-openai:v{record.version}")
    assert not record.checks_flags_of("vllm/vllm-openai:v0.34.0")
    assert not record.checks_flags_of("vllm/vllm-openai@sha256:" + "e" * 64)
    assert record.entrypoint == ("vllm", "serve")
    # Every flag looks like an option; boolean options come with their --no- form.
    assert all(re.match(r"^(--[a-z0-9][a-z0-9-]*|-[A-Za-z][a-z]*)$", f) for f in record.flags)
    assert {"--enable-lora", "--no-enable-lora", "--trust-remote-code"} <= record.flags
    assert set(record.metrics) == {"RunningRequests", "WaitingRequests", "KVCacheUsage"}
    assert all(name.startswith("vllm:") for name in record.metrics.values())
    assert set(MANAGED_FLAGS) <= record.flags


GOLDEN_CASES = {
    "merged": (make_md(), None),
    "quantized": (
        make_md(model={"fineTuneJobRef": {"name": "support-bot"}, "variant": "W4A16"}),
        None,
    ),
    "adapter": (
        make_md(
            model={"fineTuneJobRef": {"name": "support-bot"}, "variant": "Adapter"},
            vllm={"maxModelLen": 4096, "extraArgs": ["--max-num-seqs", "64"]},
        ),
        None,
    ),
    "multi-lora": (
        multi_md(
            "billing",
            "tickets",
            vllm={"maxLoras": 1, "tensorParallelSize": 2},
            resources={"gpus": 2, "gpuClass": "h100-80gb"},
        ),
        multi_resolution("billing", "tickets"),
    ),
}


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=list(GOLDEN_CASES))
def test_every_emitted_flag_is_a_flag_of_the_pinned_vllm(case: str) -> None:
    md, resolution = GOLDEN_CASES[case]
    children = build(md, resolution)
    args = vllm_of(children)["args"]
    flags = emitted_flags(args)
    assert flags, args
    unknown = [f for f in flags if f not in vllm_record().flags]
    assert unknown == []
    assert vllm_of(children)["command"] == ["vllm", "serve"]
    assert not args[0].startswith("-")  # the model path is vLLM's positional argument


@pytest.mark.parametrize(
    ("token", "name"),
    [
        ("--max-num-seqs", "--max-num-seqs"),
        ("--max_num_seqs=8", "--max-num-seqs"),
        ("--compilation-config.mode", "--compilation-config"),
        ("--compilation_config.cudagraph_capture_sizes+=1,2", "--compilation-config"),
        ("-O3", "-O"),
        ("-tp", "-tp"),
        ("-q=fp8", "-q"),
        ("64", None),
        ("-1", None),
        ("0.5", None),
        ('{"mode": 3}', None),
        ("auto", None),
    ],
)
def test_flag_name_normalises_like_vllm(token: str, name: str | None) -> None:
    assert flag_name(token) == name


@pytest.mark.parametrize(
    ("extra", "problems"),
    [
        (["--max-num-seqs", "64", "--enable-prefix-caching"], []),
        (["--max_num_seqs=64", "--kv-cache-dtype", "fp8", "-O3"], []),
        (["--compilation-config", '{"level": 3}', "--no-enable-prefix-caching"], []),
        (["--max-num-seq", "64"], [(0, "--max-num-seq is not an option of vllm serve")]),
        (["--enable-prefix-caching", "--frobnicate"], [(1, "--frobnicate is not an option")]),
        (["--port", "9000"], [(0, "--port is set by the operator")]),
        (["--max-model-len=8192"], [(0, "set by spec.vllm.maxModelLen")]),
        (["-tp", "2"], [(0, "set by spec.vllm.tensorParallelSize")]),
        (["--lora-modules", "x=/y"], [(0, "set by spec.adapters")]),
        (["fp8", "--kv-cache-dtype"], [(0, "is not a flag")]),
    ],
)
def test_extra_args_are_checked_against_the_record(
    extra: list[str], problems: list[tuple[int, str]]
) -> None:
    found = check_extra_args(extra, DEFAULT_VLLM_IMAGE)
    assert [(p.index, p.field) for p in found] == [
        (i, f"spec.vllm.extraArgs[{i}]") for i, _ in problems
    ]
    for problem, (_, text) in zip(found, problems, strict=True):
        assert text in problem.message


def test_another_vllm_image_is_checked_for_operator_flags_only() -> None:
    image = "vllm/vllm-openai:v0.40.0"
    assert check_extra_args(["--a-flag-from-the-future"], image) == []
    assert [p.index for p in check_extra_args(["--served-model-name", "x"], image)] == [0]


def test_an_unknown_extra_arg_refuses_the_deployment_naming_the_flag() -> None:
    md = make_md(
        model={"fineTuneJobRef": {"name": "support-bot"}},
        vllm={"extraArgs": ["--max-num-seqs", "64", "--max-num-seq", "32"]},
    )
    (problem,) = refuse(md)
    assert problem.field == "spec.vllm.extraArgs[2]"
    assert problem.reason == Reason.INVALID_SPEC
    assert "--max-num-seq is not an option of vllm serve in vLLM" in problem.message


@pytest.mark.parametrize(
    ("rank", "limit"), [(1, 1), (8, 8), (12, 16), (24, 32), (300, 320), (512, 512), (600, None)]
)
def test_lora_rank_rounds_up_to_what_vllm_accepts(rank: int, limit: int | None) -> None:
    assert lora_rank_for(rank) == limit


def test_vllm_args_order_keeps_extra_args_last() -> None:
    args = build_vllm_args(
        "/models/base",
        "md",
        tensor_parallel_size=1,
        gpu_memory_utilization="0.9",
        lora_modules=(),
        extra_args=["--max-num-seqs", "8"],
    )
    assert args[-2:] == ["--max-num-seqs", "8"]
    assert "--enable-lora" not in args


# --- One tuned model --------------------------------------------------------------------


def test_merged_model_deployment() -> None:
    md = make_md(resources={"gpus": 1, "gpuClass": "h100-80gb", "cpu": "12", "memory": "96Gi"})
    children = build(md)
    assert [o["kind"] for o in children.objects] == [
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    ]
    deployment = children.deployment
    assert deployment["metadata"]["name"] == "support-bot"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"][ANNOTATION_ARTIFACT_DIGEST] == DIGEST_A
    pod = pod_of(children)
    vllm = vllm_of(children)
    assert vllm["name"] == "vllm"
    assert vllm["image"] == DEFAULT_VLLM_IMAGE
    assert vllm["args"] == [
        "/models/model",
        "--served-model-name",
        "support-bot",
        "--port",
        "8000",
        "--load-format",
        "safetensors",
        "--tensor-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.9",
    ]
    amounts = {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "1"}
    assert vllm["resources"] == {"requests": amounts, "limits": amounts}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert vllm["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = vllm["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert vllm["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # The model volume is read-only for vLLM; everything it writes is a volume.
    mounts = {m["mountPath"]: m for m in vllm["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert {"/scratch", "/tmp", "/dev/shm"} <= set(mounts)
    env = env_of(vllm)
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME"):
        value = env[key]["value"]
        assert any(value == p or value.startswith(p + "/") for p in ("/scratch", "/tmp")), key
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["VLLM_NO_USAGE_STATS"]["value"] == "1"
    assert not SECRET_ENV_NAMES & set(env), "vLLM reads local files and gets no credentials"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes["models"]


def test_the_init_container_fetches_the_run_with_secret_references() -> None:
    children = build(make_md(credentialsSecretRef={"name": "s3-reader"}))
    (fetch,) = pod_of(children)["initContainers"]
    assert fetch["name"] == "fetch-model"
    assert fetch["image"] == SETTINGS.trainer_image
    assert fetch["command"] == ["kubetune"]
    assert fetch["args"] == [
        "fetch",
        f"{RUN_ROOT}/support-bot/4f702c671992",
        "/models/model",
        "--variant",
        "Merged",
        "--expect-digest",
        DIGEST_A,
    ]
    env = env_of(fetch)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-reader", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "HF_TOKEN" not in env
    assert {m["mountPath"] for m in fetch["volumeMounts"]} >= {"/models", "/tmp"}
    assert fetch["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_without_a_secret_the_settings_default_is_used() -> None:
    (fetch,) = pod_of(build(make_md()))["initContainers"]
    assert env_of(fetch)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == (
        "artifact-store"
    )
    bare = OperatorSettings()
    children = build(make_md(), settings=bare)
    assert not SECRET_ENV_NAMES & set(env_of(pod_of(children)["initContainers"][0]))


@pytest.mark.parametrize(
    ("variant", "quant_method", "flag"),
    [
        (Variant.W4A16, None, True),
        (Variant.W8A8, "compressed-tensors", True),
        (Variant.FP8, "fp8", False),
        (Variant.MERGED, None, False),
    ],
    ids=["w4a16", "w8a8", "fp8-other-format", "merged"],
)
def test_quantized_variants_name_compressed_tensors_only_when_they_are(
    variant: Variant, quant_method: str | None, flag: bool
) -> None:
    md = make_md(model={"fineTuneJobRef": {"name": "support-bot"}, "variant": variant.value})
    found = artifact(
        variant,
        variants=(Variant.MERGED, variant),
        quantization_method=quant_method,
    )
    args = vllm_of(build(md, Resolution(model=found)))["args"]
    if flag:
        assert arg_value(args, "--quantization") == "compressed-tensors"
    else:
        assert "--quantization" not in args
    (fetch,) = pod_of(build(md, Resolution(model=found)))["initContainers"]
    assert arg_value(fetch["args"], "--variant") == variant.value


def test_adapter_variant_is_served_on_its_base_model() -> None:
    md = make_md(model={"fineTuneJobRef": {"name": "support-bot"}, "variant": "Adapter"})
    children = build(md, Resolution(model=artifact(Variant.ADAPTER, rank=24)))
    base, adapter = pod_of(children)["initContainers"]
    assert base["name"] == "fetch-base"
    assert base["args"] == ["fetch", BASE, "/models/base", "--model", "--revision", BASE_REVISION]
    # hf:// base: the artifact Secret's HF_TOKEN is optional (public models need none).
    assert env_of(base)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "AWS_ACCESS_KEY_ID" not in env_of(base)
    assert adapter["args"][:4] == [
        "fetch",
        f"{RUN_ROOT}/support-bot/4f702c671992",
        "/models/adapter",
        "--variant",
    ]
    args = vllm_of(children)["args"]
    assert args[0] == "/models/base"
    assert arg_value(args, "--served-model-name") == "support-bot-base"
    assert "--enable-lora" in args
    assert arg_value(args, "--lora-modules") == "support-bot=/models/adapter"
    assert arg_value(args, "--max-lora-rank") == "32"
    assert arg_value(args, "--max-loras") == "1"
    assert [m.name for m in children.plan.served_models] == ["support-bot", "support-bot-base"]


def test_tensor_parallelism_follows_the_gpus() -> None:
    md = make_md(resources={"gpus": 4, "gpuClass": "h100-80gb"})
    args = vllm_of(build(md))["args"]
    assert arg_value(args, "--tensor-parallel-size") == "4"
    md = make_md(
        model={"fineTuneJobRef": {"name": "support-bot"}},
        resources={"gpus": 4, "gpuClass": "h100-80gb"},
        vllm={"tensorParallelSize": 2, "gpuMemoryUtilization": "0.85", "maxModelLen": 8192},
    )
    args = vllm_of(build(md))["args"]
    assert arg_value(args, "--tensor-parallel-size") == "2"
    assert arg_value(args, "--gpu-memory-utilization") == "0.85"
    assert arg_value(args, "--max-model-len") == "8192"


def test_gpu_class_resource_name_and_scheduling() -> None:
    md = make_md(
        model={"fineTuneJobRef": {"name": "support-bot"}},
        resources={
            "gpus": 1,
            "gpuClass": "mig-1g",
            "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "affinity": {"podAntiAffinity": {}},
            "shmSize": "2Gi",
        },
    )
    children = build(md)
    vllm = vllm_of(children)
    assert vllm["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"
    assert "nvidia.com/gpu" not in vllm["resources"]["limits"]
    pod = pod_of(children)
    assert pod["nodeSelector"] == {"topology.kubernetes.io/zone": "eu-west-1a"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == {"podAntiAffinity": {}}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["sizeLimit"] == "2Gi"


def test_lineage_is_in_the_annotations_and_the_plan() -> None:
    children = build(make_md(labels={"team": "support"}))
    annotations = children.deployment["metadata"]["annotations"]
    assert annotations["kubetune.io/finetunejob"] == "support-bot"
    assert annotations["kubetune.io/run-id"] == "4f702c671992"
    assert annotations["kubetune.io/run-uri"] == f"{RUN_ROOT}/support-bot/4f702c671992"
    assert annotations["kubetune.io/dataset-digest"] == "sha256:" + "d" * 64
    assert json.loads(annotations["kubetune.io/eval-scores"]) == {
        "Perplexity": "3.25",
        "ROUGEL": "0.4512",
    }
    assert annotations[ANNOTATION_ARTIFACT_DIGEST] == DIGEST_A
    lineage = children.plan.lineage
    assert lineage is not None
    assert lineage.eval_scores == {"Perplexity": "3.25", "ROUGEL": "0.4512"}
    for obj in children.objects:
        assert obj["metadata"]["labels"]["team"] == "support"


# --- Determinism and rollouts -----------------------------------------------------------


def _render(children: ServingChildren) -> str:
    return yaml.safe_dump_all(children.objects, sort_keys=False)


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=list(GOLDEN_CASES))
def test_identical_inputs_render_byte_identical_objects(case: str) -> None:
    md, resolution = GOLDEN_CASES[case]
    first = _render(build(copy.deepcopy(md), copy.deepcopy(resolution)))
    second = _render(build(copy.deepcopy(md), copy.deepcopy(resolution)))
    assert first == second
    assert json.dumps(build(md, resolution).objects) == json.dumps(build(md, resolution).objects)


def test_a_new_artifact_changes_only_the_digest_in_the_pod_template() -> None:
    """The digest is pinned twice: the template annotation (a new artifact rolls out) and
    the init container's --expect-digest (the pod loads exactly that manifest)."""
    md = make_md()
    old = build(md, Resolution(model=artifact(digest=DIGEST_A)))
    new = build(md, Resolution(model=artifact(digest=DIGEST_B)))
    old_template = copy.deepcopy(old.deployment["spec"]["template"])
    new_template = copy.deepcopy(new.deployment["spec"]["template"])
    assert old_template["metadata"]["annotations"][ANNOTATION_ARTIFACT_DIGEST] == DIGEST_A
    assert new_template["metadata"]["annotations"][ANNOTATION_ARTIFACT_DIGEST] == DIGEST_B
    del old_template["metadata"]["annotations"][ANNOTATION_ARTIFACT_DIGEST]
    del new_template["metadata"]["annotations"][ANNOTATION_ARTIFACT_DIGEST]
    (old_fetch,) = old_template["spec"]["initContainers"]
    (new_fetch,) = new_template["spec"]["initContainers"]
    assert arg_value(old_fetch["args"], "--expect-digest") == DIGEST_A
    assert arg_value(new_fetch["args"], "--expect-digest") == DIGEST_B
    old_fetch["args"].remove(DIGEST_A)
    new_fetch["args"].remove(DIGEST_B)
    assert old_template == new_template
    assert old.service == new.service


def test_a_spec_change_that_does_not_touch_the_pods_keeps_the_template() -> None:
    fixed = build(make_md(model={"fineTuneJobRef": {"name": "support-bot"}}, replicas=2))
    scaled = build(make_md(model={"fineTuneJobRef": {"name": "support-bot"}}, replicas=3))
    assert fixed.deployment["spec"]["template"] == scaled.deployment["spec"]["template"]
    assert fixed.deployment["spec"]["replicas"] == 2


def test_multi_lora_digest_covers_base_and_every_adapter() -> None:
    md = multi_md("billing", "tickets")
    plan = build(md, multi_resolution("billing", "tickets")).plan
    other = multi_resolution(
        "billing", "tickets", tickets=artifact(Variant.ADAPTER, job="tickets", digest=DIGEST_C)
    )
    changed = build(md, other).plan
    assert plan.artifact_digest != changed.artifact_digest
    assert plan.artifact_digest.startswith("sha256:")
    assert combined_digest("a@1", {"x": DIGEST_A, "y": DIGEST_B}) == combined_digest(
        "a@1", {"y": DIGEST_B, "x": DIGEST_A}
    )
    assert combined_digest("a@1", {"x": DIGEST_A}) != combined_digest("a@2", {"x": DIGEST_A})


# --- Several adapters on one base -------------------------------------------------------


def test_multi_lora_deployment() -> None:
    md = multi_md("billing", "tickets")
    resolution = multi_resolution(
        "billing",
        "tickets",
        tickets=artifact(Variant.ADAPTER, job="tickets", rank=64, digest=DIGEST_C),
    )
    children = build(md, resolution)
    fetches = pod_of(children)["initContainers"]
    assert [f["name"] for f in fetches] == ["fetch-base", "fetch-adapter-0", "fetch-adapter-1"]
    assert fetches[0]["args"] == [
        "fetch", BASE, "/models/base", "--model", "--revision", BASE_REVISION
    ]  # fmt: skip
    assert fetches[2]["args"] == [
        "fetch",
        f"{RUN_ROOT}/tickets/4f702c671992",
        "/models/adapters/tickets",
        "--variant",
        "Adapter",
        "--expect-digest",
        DIGEST_C,
    ]
    args = vllm_of(children)["args"]
    assert args[0] == "/models/base"
    assert arg_value(args, "--served-model-name") == "support-bot"
    start = args.index("--lora-modules") + 1
    assert args[start : start + 2] == [
        "billing=/models/adapters/billing",
        "tickets=/models/adapters/tickets",
    ]
    assert arg_value(args, "--max-lora-rank") == "64"
    assert arg_value(args, "--max-loras") == "2"
    served = {m.name: m for m in children.plan.served_models}
    assert list(served) == ["support-bot", "billing", "tickets"]
    assert served["tickets"].artifact_digest == DIGEST_C
    assert served["support-bot"].artifact_digest is None
    adapters = json.loads(children.deployment["metadata"]["annotations"]["kubetune.io/adapters"])
    assert [a["name"] for a in adapters] == ["billing", "tickets"]
    assert adapters[1] == {
        "name": "tickets",
        "fineTuneJob": "tickets",
        "runId": "4f702c671992",
        "digest": DIGEST_C,
    }


def test_base_revision_comes_from_the_adapters_when_unset() -> None:
    md = make_md(
        baseModel={"uri": BASE, "credentialsSecretRef": {"name": "hf"}},
        adapters=[{"name": "billing", "uri": f"{RUN_ROOT}/billing/4f702c671992"}],
    )
    children = build(md, multi_resolution("billing"))
    base = pod_of(children)["initContainers"][0]
    assert arg_value(base["args"], "--revision") == BASE_REVISION
    # An explicit baseModel secret: its HF_TOKEN is required, like a FineTuneJob's.
    token = env_of(base)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "hf", "key": "HF_TOKEN"}


def test_adapters_on_different_revisions_need_an_explicit_base_revision() -> None:
    md = make_md(
        baseModel={"uri": BASE},
        adapters=[
            {"name": "billing", "fineTuneJobRef": {"name": "billing"}},
            {"name": "tickets", "fineTuneJobRef": {"name": "tickets"}},
        ],
    )
    resolution = multi_resolution(
        "billing", "tickets", tickets=artifact(Variant.ADAPTER, job="tickets", revision="0" * 40)
    )
    (problem,) = refuse(md, resolution)
    assert problem.field == "spec.baseModel.revision"
    assert problem.reason == ServingReason.ADAPTER_INCOMPATIBLE


# --- Refusals ---------------------------------------------------------------------------

MODEL_REF = {"fineTuneJobRef": {"name": "support-bot"}}
REFUSALS: dict[str, tuple[ModelDeployment, Resolution | None, str, str, str]] = {
    "gate-failed": (
        make_md(),
        Resolution(model=artifact(gate_passed=False)),
        "spec.model.fineTuneJobRef",
        Reason.EVALUATION_GATE_FAILED.value,
        "requireGate: false",
    ),
    "variant-missing": (
        make_md(model={**MODEL_REF, "variant": "FP8"}),
        Resolution(model=artifact(Variant.FP8)),
        "spec.model.fineTuneJobRef",
        ServingReason.VARIANT_NOT_AVAILABLE.value,
        "it has: Adapter, Merged, W4A16",
    ),
    "full-has-no-adapter": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}),
        Resolution(
            model=artifact(
                Variant.ADAPTER, method=Method.FULL, variants=(Variant.MERGED,), rank=None
            )
        ),
        "spec.model.fineTuneJobRef",
        ServingReason.VARIANT_NOT_AVAILABLE.value,
        "method Full",
    ),
    "prefix-tuning": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}),
        Resolution(model=artifact(Variant.ADAPTER, method=Method.PREFIX_TUNING, rank=None)),
        "spec.model.fineTuneJobRef",
        ServingReason.METHOD_NOT_SERVABLE.value,
        "PrefixTuning, which vLLM cannot serve",
    ),
    "dora-adapter": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}),
        Resolution(model=artifact(Variant.ADAPTER, adapter=AdapterInfo(rank=16, use_dora=True))),
        "spec.model.variant",
        ServingReason.ADAPTER_INCOMPATIBLE.value,
        "deploy variant Merged",
    ),
    "modules-to-save": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}),
        Resolution(
            model=artifact(Variant.ADAPTER, adapter=AdapterInfo(rank=16, has_modules_to_save=True))
        ),
        "spec.model.variant",
        ServingReason.ADAPTER_INCOMPATIBLE.value,
        "modules_to_save",
    ),
    "no-adapter-config": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}),
        Resolution(model=artifact(Variant.ADAPTER, rank=None)),
        "spec.model.variant",
        ServingReason.ARTIFACT_NOT_READY.value,
        "adapter_config.json",
    ),
    "rank-over-limit": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}, vllm={"maxLoraRank": 16}),
        Resolution(model=artifact(Variant.ADAPTER, rank=64)),
        "spec.model.variant",
        ServingReason.ADAPTER_INCOMPATIBLE.value,
        "raise spec.vllm.maxLoraRank to 64",
    ),
    "rank-vllm-cannot-take": (
        make_md(model={**MODEL_REF, "variant": "Adapter"}, vllm={"maxLoraRank": 24}),
        Resolution(model=artifact(Variant.ADAPTER, rank=16)),
        "spec.vllm.maxLoraRank",
        Reason.INVALID_SPEC.value,
        "1, 8, 16, 32, 64, 128, 256, 320, 512",
    ),
    "local-run-uri": (
        make_md(model={"uri": "/home/me/artifacts/run"}),
        Resolution(model=artifact()),
        "spec.model.uri",
        Reason.LOCAL_URI_IN_CLUSTER.value,
        "upload the run",
    ),
    "unknown-gpu-class": (
        make_md(resources={"gpuClass": "a100"}),
        None,
        "spec.resources.gpuClass",
        Reason.INVALID_SPEC.value,
        "known: l4-24gb, h100-80gb, mig-1g",
    ),
    "too-many-gpus-for-the-class": (
        make_md(resources={"gpuClass": "l4-24gb", "gpus": 16}),
        None,
        "spec.resources.gpus",
        Reason.INVALID_SPEC.value,
        "at most 8 per node",
    ),
    "node-selector-clash": (
        make_md(
            resources={
                "gpuClass": "l4-24gb",
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A10"},
            }
        ),
        None,
        "spec.resources.nodeSelector.nvidia.com/gpu.product",
        Reason.INVALID_SPEC.value,
        "contradicts GPU class l4-24gb",
    ),
    "tensor-parallel-over-gpus": (
        make_md(resources={"gpus": 2}, vllm={"tensorParallelSize": 4}),
        None,
        "spec.vllm.tensorParallelSize",
        Reason.INVALID_SPEC.value,
        "exceeds the GPUs per replica",
    ),
    "context-too-long": (
        make_md(vllm={"maxModelLen": 65536}),
        Resolution(model=artifact(max_position_embeddings=32768)),
        "spec.vllm.maxModelLen",
        Reason.INVALID_SPEC.value,
        "exceeds the model's context length (32768",
    ),
    "adapter-on-another-base": (
        multi_md("billing"),
        multi_resolution(
            "billing",
            billing=artifact(Variant.ADAPTER, job="billing", base="hf://meta-llama/Llama-3.2-1B"),
        ),
        "spec.adapters[0].fineTuneJobRef",
        ServingReason.ADAPTER_INCOMPATIBLE.value,
        "trained on hf://meta-llama/Llama-3.2-1B@",
    ),
    "adapter-on-another-revision": (
        multi_md("billing"),
        multi_resolution(
            "billing", billing=artifact(Variant.ADAPTER, job="billing", revision="f" * 40)
        ),
        "spec.adapters[0].fineTuneJobRef",
        ServingReason.ADAPTER_INCOMPATIBLE.value,
        "retrain it on this one",
    ),
    "dora-in-multi-lora": (
        multi_md("billing"),
        multi_resolution(
            "billing",
            billing=artifact(
                Variant.ADAPTER, job="billing", adapter=AdapterInfo(rank=8, use_dora=True)
            ),
        ),
        "spec.adapters[0].fineTuneJobRef",
        ServingReason.ADAPTER_INCOMPATIBLE.value,
        "serve it alone with spec.model, variant Merged",
    ),
    "adapter-named-like-the-base": (
        multi_md("support-bot"),
        multi_resolution("support-bot"),
        "spec.adapters[0].name",
        Reason.INVALID_SPEC.value,
        "give the adapter another name",
    ),
    "random-base-not-allowed": (
        make_md(
            baseModel={"uri": "builtin://random/llama-3.2-1b"},
            adapters=[{"name": "billing", "fineTuneJobRef": {"name": "billing"}}],
        ),
        multi_resolution(
            "billing",
            billing=artifact(Variant.ADAPTER, job="billing", base="builtin://random/llama-3.2-1b"),
        ),
        "spec.baseModel.uri",
        Reason.INVALID_SPEC.value,
        "allowBuiltinRandom",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_name_the_field_and_the_fix(case: str) -> None:
    md, resolution, field, reason, text = REFUSALS[case]
    problems = refuse(md, resolution)
    assert [(p.field, p.reason.value) for p in problems] == [(field, reason)], problems
    assert text in problems[0].message
    assert problems[0].waiting is False


def test_without_require_gate_a_failed_gate_is_served() -> None:
    md = make_md(requireGate=False)
    children = build(md, Resolution(model=artifact(gate_passed=False)))
    assert children.plan.artifact_digest == DIGEST_A


def test_every_problem_is_reported_at_once() -> None:
    md = make_md(
        model={**MODEL_REF, "variant": "Adapter"},
        resources={"gpuClass": "a100"},
        vllm={"extraArgs": ["--max-num-seq", "8"]},
    )
    resolution = Resolution(
        model=artifact(Variant.ADAPTER, gate_passed=False, adapter=AdapterInfo(16, use_dora=True))
    )
    with pytest.raises(ServingError) as caught:
        plan_serving(md, resolution, SETTINGS, NO_FEATURES)
    fields = [p.field for p in caught.value.problems]
    assert fields == [
        "spec.resources.gpuClass",
        "spec.vllm.extraArgs[0]",
        "spec.model.fineTuneJobRef",
        "spec.model.variant",
    ]
    assert caught.value.reason == Reason.INVALID_SPEC.value
    assert "spec.resources.gpuClass" in str(caught.value)


def test_resolution_problems_are_reported_with_the_spec_problems() -> None:
    waiting = missing_finetunejob("spec.model.fineTuneJobRef", "support-bot", NAMESPACE)
    with pytest.raises(ServingError) as caught:
        plan_serving(make_md(), Resolution(problems=(waiting,)), SETTINGS, NO_FEATURES)
    assert caught.value.waiting is True
    assert caught.value.reason == Reason.SOURCE_NOT_FOUND.value
    assert "FineTuneJob support-bot not found in namespace ml-team" in str(caught.value)
    with pytest.raises(ServingError) as caught:
        plan_serving(
            make_md(resources={"gpuClass": "a100"}),
            Resolution(problems=(waiting,)),
            SETTINGS,
            NO_FEATURES,
        )
    assert caught.value.waiting is False


def test_an_unexplained_missing_artifact_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not resolved"):
        plan_serving(make_md(), Resolution(), SETTINGS, NO_FEATURES)
    with pytest.raises(ValueError, match="resolved for"):
        plan_serving(make_md(), Resolution(model=artifact(Variant.W4A16)), SETTINGS, NO_FEATURES)


def test_a_modeldeployment_read_from_the_cluster_has_a_uid() -> None:
    md = make_md()
    md.metadata.__pydantic_extra__ = {}
    with pytest.raises(ValueError, match=r"metadata\.uid"):
        build_serving(md, Resolution(model=artifact()), SETTINGS, NO_FEATURES)


# --- Resolving a fineTuneJobRef ---------------------------------------------------------


def run(
    run_id: str,
    state: RunState,
    *,
    digest: str | None = DIGEST_A,
    gate: bool | None = None,
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        state=state,
        run_uri=f"{RUN_ROOT}/support-bot/{run_id}" if digest else None,
        manifest_digest=digest,
        gate_passed=gate,
    )


def job_status(*runs: RunRecord, artifacts: Artifacts | None = None) -> FineTuneJobStatus:
    return FineTuneJobStatus(
        runs=list(runs) or None, run_id=runs[0].run_id if runs else None, artifacts=artifacts
    )


RESOLUTIONS: dict[str, tuple[FineTuneJobStatus | None, bool, str | tuple[str, bool]]] = {
    "no-status-yet": (None, True, ("ArtifactNotReady", True)),
    "first-run-training": (
        job_status(run("r2", RunState.RUNNING, digest=None)),
        True,
        ("ArtifactNotReady", True),
    ),
    "succeeded": (job_status(run("r1", RunState.SUCCEEDED)), True, "r1"),
    "a-newer-run-trains-the-older-serves": (
        job_status(run("r2", RunState.RUNNING, digest=None), run("r1", RunState.SUCCEEDED)),
        True,
        "r1",
    ),
    "a-newer-run-failed-its-gate-the-older-serves": (
        job_status(
            run("r2", RunState.FAILED, digest=DIGEST_B, gate=False),
            run("r1", RunState.SUCCEEDED, gate=True),
        ),
        True,
        "r1",
    ),
    "only-a-failed-gate": (
        job_status(run("r2", RunState.FAILED, digest=DIGEST_B, gate=False)),
        True,
        ("EvaluationGateFailed", False),
    ),
    "failed-gate-without-require-gate": (
        job_status(run("r2", RunState.FAILED, digest=DIGEST_B, gate=False)),
        False,
        "r2",
    ),
    "only-a-crash": (
        job_status(run("r3", RunState.FAILED, digest=None)),
        True,
        ("ArtifactNotReady", True),
    ),
    "superseded-runs-with-artifacts-do-not-count": (
        job_status(run("r4", RunState.SUPERSEDED)),
        True,
        ("ArtifactNotReady", True),
    ),
}


@pytest.mark.parametrize("case", RESOLUTIONS, ids=list(RESOLUTIONS))
def test_resolve_from_finetunejob(case: str) -> None:
    status, require_gate, expected = RESOLUTIONS[case]
    found = resolve_from_finetunejob(
        "support-bot", status, Variant.MERGED, require_gate=require_gate
    )
    if isinstance(expected, str):
        assert isinstance(found, JobRun), found
        assert found.run_id == expected
        assert found.run_uri == f"{RUN_ROOT}/support-bot/{expected}"
        assert found.manifest_digest.startswith("sha256:")
    else:
        assert isinstance(found, ServingProblem), found
        assert (found.reason.value, found.waiting) == expected
        assert found.field == "spec.model.fineTuneJobRef"
        assert "FineTuneJob support-bot" in found.message


def test_a_variant_the_current_run_did_not_export_is_refused_early() -> None:
    status = job_status(
        run("r1", RunState.SUCCEEDED),
        artifacts=Artifacts(
            run_uri=f"{RUN_ROOT}/support-bot/r1",
            adapter=f"{RUN_ROOT}/support-bot/r1/adapter/",
            quantized={"W4A16": f"{RUN_ROOT}/support-bot/r1/quantized/W4A16/"},
        ),
    )
    found = resolve_from_finetunejob(
        "support-bot", status, Variant.MERGED, field_path="spec.adapters[2].fineTuneJobRef"
    )
    assert isinstance(found, ServingProblem)
    assert found.field == "spec.adapters[2].fineTuneJobRef"
    assert found.reason == ServingReason.VARIANT_NOT_AVAILABLE
    assert "it has: Adapter, W4A16" in found.message
    ok = resolve_from_finetunejob("support-bot", status, Variant.W4A16)
    assert isinstance(ok, JobRun)
    found = resolve_from_finetunejob("support-bot", status, Variant.FP8)
    assert isinstance(found, ServingProblem)
    assert found.field == "spec.model.variant"


def test_artifact_from_manifest() -> None:
    files = tuple(
        FileEntry(path, 1, "0" * 64)
        for path in (
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "merged/model.safetensors",
            "quantized/W8A8/model.safetensors",
            "eval/metrics.json",
        )
    )
    manifest = Manifest(
        run_id="4f702c671992",
        namespace=NAMESPACE,
        job_name="support-bot",
        created_at="2026-01-01T00:00:00Z",
        files=files,
        lineage={
            "model": {"uri": BASE, "revision": BASE_REVISION},
            "runId": "4f702c671992",
            "method": "QLoRA",
            "dataset": {"digest": "sha256:" + "d" * 64},
            "gatePassed": False,
        },
        metrics={"tuned": {"BLEU": 0.21}},
        digest=DIGEST_B,
    )
    found = artifact_from_manifest(
        f"{RUN_ROOT}/support-bot/4f702c671992",
        manifest,
        Variant.ADAPTER,
        adapter_config={"r": 32, "use_dora": False, "modules_to_save": None, "peft_type": "LORA"},
        model_config={
            "max_position_embeddings": 32768,
            "quantization_config": {"quant_method": "compressed-tensors"},
        },
    )
    assert found.variants == {Variant.ADAPTER, Variant.MERGED, Variant.W8A8}
    assert found.manifest_digest == DIGEST_B
    assert found.gate_passed is False
    assert found.adapter == AdapterInfo(rank=32, peft_type="LORA")
    assert (found.max_position_embeddings, found.quantization_method) == (
        32768,
        "compressed-tensors",
    )
    assert (found.base_model_uri, found.base_model_revision) == (BASE, BASE_REVISION)
    assert (found.method, found.run_id, found.fine_tune_job) == (
        "QLoRA",
        "4f702c671992",
        "support-bot",
    )
    assert found.dataset_digest == "sha256:" + "d" * 64
    # A QLoRA adapter is served on the unquantized base like any LoRA adapter.
    md = make_md(model={**MODEL_REF, "variant": "Adapter"}, requireGate=False)
    args = vllm_of(build(md, Resolution(model=found)))["args"]
    assert "--quantization" not in args
    assert arg_value(args, "--max-lora-rank") == "32"


# --- Replicas, autoscaling, monitoring ---------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "budget"),
    [
        ({}, {"maxUnavailable": 1}),
        ({"replicas": 0}, {"maxUnavailable": 1}),
        ({"replicas": 3}, {"minAvailable": 1}),
        ({"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}, {"maxUnavailable": 1}),
        ({"autoscaling": {"minReplicas": 2, "maxReplicas": 4}}, {"minAvailable": 1}),
    ],
    ids=["one", "zero", "three", "autoscaled-from-one", "autoscaled-from-two"],
)
def test_pod_disruption_budget(spec: dict[str, Any], budget: dict[str, int]) -> None:
    children = build(make_md(**spec))
    pdb = children.pod_disruption_budget["spec"]
    assert {k: v for k, v in pdb.items() if k in ("minAvailable", "maxUnavailable")} == budget
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["selector"] == children.deployment["spec"]["selector"]


def test_service_selects_the_pods_on_port_8000() -> None:
    children = build(make_md(name="7b-support"))
    service = children.service
    assert service["metadata"]["name"] == "kt-7b-support"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    labels = children.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize(
    ("metric", "target", "name"),
    [
        ("WaitingRequests", "4", "vllm:num_requests_waiting"),
        ("RunningRequests", "16", "vllm:num_requests_running"),
        ("KVCacheUsage", "0.8", "vllm:kv_cache_usage_perc"),
    ],
)
def test_hpa_follows_a_vllm_metric(metric: str, target: str, name: str) -> None:
    md = make_md(
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 5,
            "metric": metric,
            "target": target,
            "provider": "HPA",
        }
    )
    children = build(md, features=ALL_FEATURES)
    assert "replicas" not in children.deployment["spec"], "the autoscaler owns replicas"
    hpa = children.autoscaler
    assert hpa is not None
    assert hpa["kind"] == "HorizontalPodAutoscaler"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "support-bot",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 5)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": name},
                "target": {"type": "AverageValue", "averageValue": target},
            },
        }
    ]


def test_auto_uses_keda_when_installed_and_hpa_otherwise() -> None:
    md = make_md(autoscaling={"minReplicas": 0, "maxReplicas": 3})
    children = build(md, features=ALL_FEATURES)
    scaled = children.autoscaler
    assert scaled is not None
    assert scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 3)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
        "query": prometheus_query("vllm:num_requests_waiting", NAMESPACE, "support-bot"),
        "threshold": "4",
    }
    assert 'namespace="ml-team"' in trigger["metadata"]["query"]
    assert re.fullmatch(
        r".*pod=~\"support-bot-\[a-z0-9\]\+-\[a-z0-9\]\+\".*", trigger["metadata"]["query"]
    )
    # Without KEDA, Auto means HPA, which cannot scale to zero.
    (problem,) = refuse(md)
    assert (problem.field, problem.reason) == ("spec.autoscaling.minReplicas", Reason.INVALID_SPEC)
    assert "needs KEDA" in problem.message
    md = make_md(autoscaling={"minReplicas": 1, "maxReplicas": 3})
    autoscaler = build(md).autoscaler
    assert autoscaler is not None
    assert autoscaler["kind"] == "HorizontalPodAutoscaler"


@pytest.mark.parametrize(
    ("autoscaling", "features", "field", "text", "waiting"),
    [
        (
            {"maxReplicas": 3, "provider": "KEDA"},
            NO_FEATURES,
            "spec.autoscaling.provider",
            "install KEDA",
            True,
        ),
        (
            {"maxReplicas": 3, "provider": "KEDA"},
            ClusterFeatures(keda_installed=True),
            "spec.autoscaling.provider",
            "prometheusUrl",
            False,
        ),
        (
            {"maxReplicas": 3, "target": "0"},
            NO_FEATURES,
            "spec.autoscaling.target",
            "greater than 0",
            False,
        ),
        (
            {"maxReplicas": 3, "metric": "KVCacheUsage", "target": "4"},
            NO_FEATURES,
            "spec.autoscaling.target",
            "use e.g. 0.8",
            False,
        ),
    ],
    ids=["keda-missing", "no-prometheus", "zero-target", "kv-cache-target-over-one"],
)
def test_autoscaling_refusals(
    autoscaling: dict[str, Any], features: ClusterFeatures, field: str, text: str, waiting: bool
) -> None:
    (problem,) = refuse(make_md(autoscaling=autoscaling), features=features)
    assert problem.field == field
    assert text in problem.message
    assert problem.waiting is waiting


def test_service_monitor_only_with_its_crd() -> None:
    assert build(make_md()).service_monitor is None
    children = build(make_md(), features=ALL_FEATURES)
    monitor = children.service_monitor
    assert monitor is not None
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        children.service["metadata"]["labels"].items()
    )
    assert [o["kind"] for o in children.objects][-1] == "ServiceMonitor"


# --- The model cache ----------------------------------------------------------------------


def test_a_pvc_model_cache_is_keyed_by_the_manifest_digest() -> None:
    md = make_md(
        model={**MODEL_REF, "variant": "Adapter"},
        modelCache={"type": "PVC", "size": "500Gi", "storageClassName": "efs"},
    )
    children = build(md, Resolution(model=artifact(Variant.ADAPTER)))
    claim = children.cache_claim
    assert claim is not None
    assert claim["metadata"]["name"] == "support-bot-model-cache"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "500Gi"}},
        "storageClassName": "efs",
    }
    assert children.objects[0] is claim
    pod = pod_of(children)
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models == {
        "name": "models",
        "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
    }
    base, adapter = pod["initContainers"]
    assert base["args"][2].startswith("/models/base/")
    # The folder `kubetune fetch --cache-root` fills: <root>/<sha256 hex>/<variant>.
    cached = f"/models/{DIGEST_A.removeprefix('sha256:')}/Adapter"
    assert str(cache_dir("/models", DIGEST_A, Variant.ADAPTER)) == cached
    assert adapter["args"] == [
        "fetch",
        f"{RUN_ROOT}/support-bot/4f702c671992",
        "--cache-root",
        "/models",
        "--variant",
        "Adapter",
        "--expect-digest",
        DIGEST_A,
    ]
    args = vllm_of(children)["args"]
    assert args[0] == base["args"][2]
    assert arg_value(args, "--lora-modules") == f"support-bot={cached}"


def test_an_existing_cache_claim_is_used_as_is() -> None:
    md = make_md(modelCache={"type": "PVC", "claimName": "shared-models"})
    children = build(md)
    assert children.cache_claim is None
    models = next(v for v in pod_of(children)["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "shared-models"}


def test_a_pvc_run_is_mounted_read_only_in_its_fetch_container() -> None:
    md = make_md(model={"uri": "pvc://team-artifacts/kubetune/ml-team/support-bot/4f702c671992"})
    found = artifact(run_uri="pvc://team-artifacts/kubetune/ml-team/support-bot/4f702c671992")
    children = build(md, Resolution(model=found))
    pod = pod_of(children)
    (fetch,) = pod["initContainers"]
    mount = next(m for m in fetch["volumeMounts"] if m["mountPath"].startswith("/mnt/kubetune"))
    assert mount == {
        "name": "pvc-0",
        "mountPath": "/mnt/kubetune/pvc/team-artifacts",
        "readOnly": True,
    }
    volume = next(v for v in pod["volumes"] if v["name"] == "pvc-0")
    assert volume["persistentVolumeClaim"] == {"claimName": "team-artifacts", "readOnly": True}
    assert not SECRET_ENV_NAMES & set(env_of(fetch)), "pvc:// needs no credentials"
    assert all(m["name"] != "pvc-0" for m in vllm_of(children)["volumeMounts"])


# --- Packaging ----------------------------------------------------------------------------


def test_the_flag_record_ships_with_the_package() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kubetune"]
    assert any(
        Path("operator/vllm_flags.json").match(p) or p in ("operator/*.json", "**/*.json")
        for p in patterns
    ), "add operator/*.json to [tool.setuptools.package-data] kubetune"
