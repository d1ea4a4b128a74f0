"""The objects the operator creates for a FineTuneJob, rendered by the pure builders.

Every rendered manifest is validated against the Kubernetes 1.30 and 1.36 schemas in strict
mode (unknown fields and wrong types fail), plus the rules the schemas cannot express
(DNS-label names, podFailurePolicy limits, restartPolicy Never, ownership).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.api.contract import (
    EXIT_CODES,
    JUDGE_API_KEY_ENV,
    FailureClass,
    Reason,
    TrainerConfig,
)
from kubetune.api.uris import is_local
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import names
from kubetune.operator.children import (
    Children,
    build_children,
    build_cleanup_pod,
    owner_reference,
    pod_failure_policy,
)
from kubetune.operator.pod import CONFIG_KEY, SpecError, spec_uris
from kubetune.operator.settings import OperatorSettings
from kubetune.storage import run_id_for

K8S_VERSIONS = ("1.30.0", "1.36.0")
RUN_ID = "0123456789ab"
NAMESPACE = "ml-team"
UID = "6f1c7d2e-0000-4000-8000-000000000001"
EXAMPLES = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SETTINGS = OperatorSettings.model_validate(
    {
        "trainerImage": "registry.example.com/kubetune/trainer:1.0.0",
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
            },
        ],
    }
)
SECRET_ENV_NAMES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "KUBETUNE_HTTPS_TOKEN",
    JUDGE_API_KEY_ENV,
}


def make_job(
    name: str = "support-bot",
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> FineTuneJob:
    wire: dict[str, Any] = {
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"uri": "s3://ml-data/train.jsonl"},
        "output": {"uri": "s3://ml-artifacts/kubetune"},
    }
    wire.update(spec)
    metadata: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "uid": UID}
    if labels:
        metadata["labels"] = labels
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": metadata,
            "spec": wire,
        }
    )


def build(job: FineTuneJob, settings: OperatorSettings = SETTINGS) -> Children:
    children = build_children(job, settings, RUN_ID)
    for obj in children.objects:
        assert_valid(obj, job)
    return children


def pod_spec(children: Children) -> dict[str, Any]:
    spec: dict[str, Any] = children.job["spec"]["template"]["spec"]
    return spec


def trainer(children: Children) -> dict[str, Any]:
    container: dict[str, Any] = pod_spec(children)["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def config_of(children: Children) -> TrainerConfig:
    return TrainerConfig.model_validate_json(children.config_map["data"][CONFIG_KEY])


def assert_schema_valid(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} invalid for Kubernetes {version}: {path}: {exc.message}")


def assert_pod_locked_down(pod: dict[str, Any]) -> None:
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] >= 1
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        assert container["securityContext"] == {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        for env in container["env"]:
            if env["name"] in SECRET_ENV_NAMES:
                assert "value" not in env, f"{env['name']} must come from a Secret reference"
                assert set(env["valueFrom"]) == {"secretKeyRef"}


def assert_valid(obj: dict[str, Any], job: FineTuneJob) -> None:
    """Strict schemas of both Kubernetes versions, plus what the schemas cannot check."""
    assert_schema_valid(obj)
    metadata = obj["metadata"]
    assert metadata["namespace"] == NAMESPACE
    assert len(metadata["name"]) <= 253
    assert metadata["ownerReferences"] == [owner_reference(job)]
    assert metadata["ownerReferences"][0]["controller"] is True
    assert metadata["ownerReferences"][0]["blockOwnerDeletion"] is True
    assert metadata["labels"][names.LABEL_FINETUNEJOB] == job.metadata.name
    assert metadata["annotations"][names.ANNOTATION_SPEC_HASH] == names.spec_hash(job.spec)
    if obj["kind"] in ("Job", "Service", "PersistentVolumeClaim"):
        assert metadata["labels"][names.LABEL_RUN_ID] == RUN_ID
    if obj["kind"] == "Service":
        assert DNS_LABEL.match(metadata["name"])
        assert metadata["name"][0].isalpha()
    if obj["kind"] == "Job":
        spec = obj["spec"]
        assert DNS_LABEL.match(metadata["name"])
        # Indexed pods are called <job>-<index>: that hostname must be a DNS label too.
        assert len(f"{metadata['name']}-{spec['completions'] - 1}") <= 63
        # A podFailurePolicy needs restartPolicy Never; its replacement policy must be Failed.
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        assert spec["podReplacementPolicy"] == "Failed"
        for rule in spec["podFailurePolicy"]["rules"]:
            values = rule.get("onExitCodes", {}).get("values")
            if values is not None:
                assert 0 < len(values) <= 255
                assert 0 not in values
                assert values == sorted(set(values))
        labels = spec["template"]["metadata"]["labels"]
        assert labels.items() >= names.labels(job.metadata.name or "", RUN_ID).items()
        assert_pod_locked_down(spec["template"]["spec"])


# --- one node, several nodes ------------------------------------------------------------


def test_single_node_job() -> None:
    job = make_job(resources={"gpus": 1, "gpuClass": "h100-80gb", "cpu": 16, "memory": "128Gi"})
    children = build(job)
    assert [o["kind"] for o in children.objects] == ["ConfigMap", "Job"]
    assert children.service is None
    assert children.job["metadata"]["name"] == names.job_name("support-bot", RUN_ID)
    spec = children.job["spec"]
    assert (spec["completions"], spec["parallelism"]) == (1, 1)
    assert "completionMode" not in spec
    pod = pod_spec(children)
    container = trainer(children)
    assert container["name"] == "trainer"
    assert container["image"] == SETTINGS.trainer_image
    assert container["command"] == ["python"]
    assert container["args"] == [
        "-m",
        "kubetune.trainer",
        "--config",
        "/etc/kubetune/trainer-config.json",
        "--result-file",
        "/dev/termination-log",
        "--work-dir",
        "/scratch/work",
    ]
    amounts = {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "1"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert 60 <= pod["terminationGracePeriodSeconds"] <= 3600
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == children.config_map["metadata"]["name"]
    assert {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True} in container[
        "volumeMounts"
    ]


def test_multi_node_indexed_job_with_headless_service() -> None:
    job = make_job(
        model={"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
        method="Full",
        distributed={"nodes": 3, "strategy": "DeepSpeedZeRO3"},
        resources={"gpus": 8, "gpuClass": "h100-80gb"},
    )
    children = build(job)
    assert [o["kind"] for o in children.objects] == ["ConfigMap", "Service", "Job"]
    spec = children.job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (3, 3, "Indexed")
    service = children.service
    assert service is not None
    service_name = service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == names.labels("support-bot", RUN_ID)
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = pod_spec(children)
    assert pod["subdomain"] == service_name
    env = env_of(trainer(children))
    job_name = children.job["metadata"]["name"]
    assert env["MASTER_ADDR"]["value"] == f"{job_name}-0.{service_name}"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["NNODES"]["value"] == "3"
    assert env["NPROC_PER_NODE"]["value"] == "8"
    assert env["NODE_RANK"]["valueFrom"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    container = trainer(children)
    assert container["command"] == ["python", "-m", "kubetune.trainer.launch"]
    assert container["args"][:5] == [
        "--nnodes=$(NNODES)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
    ]
    # Variables used in args are defined (Kubernetes expands only those).
    for variable in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert variable in env
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]
    # The strategy reaches the trainer through the TrainerConfig.
    distributed = config_of(children).spec.distributed
    assert distributed is not None
    assert distributed.strategy.value == "DeepSpeedZeRO3"


@pytest.mark.parametrize(
    ("resources", "distributed", "command", "first_args", "gpu_limit"),
    [
        pytest.param({"gpus": 0}, None, ["python"], ["-m"], None, id="cpu"),
        pytest.param({"gpus": 1}, None, ["python"], ["-m"], "1", id="one-gpu"),
        pytest.param(
            {"gpus": 4},
            None,
            ["python", "-m", "kubetune.trainer.launch"],
            ["--standalone", "--nproc-per-node=$(NPROC_PER_NODE)", "--", "--config"],
            "4",
            id="one-node-four-gpus",
        ),
        pytest.param(
            {"gpus": 0},
            {"nodes": 2, "strategy": "DDP"},
            ["python", "-m", "kubetune.trainer.launch"],
            ["--nnodes=$(NNODES)"],
            None,
            id="two-cpu-nodes",
        ),
    ],
)
def test_launch_command(
    resources: dict[str, Any],
    distributed: dict[str, Any] | None,
    command: list[str],
    first_args: list[str],
    gpu_limit: str | None,
) -> None:
    extra: dict[str, Any] = {"distributed": distributed} if distributed else {}
    container = trainer(build(make_job(resources=resources, **extra)))
    assert container["command"] == command
    assert container["args"][: len(first_args)] == first_args
    assert container["resources"]["limits"].get("nvidia.com/gpu") == gpu_limit


# --- GPU sizing ----------------------------------------------------------------------------


def test_qlora_with_auto_gpus_lands_on_the_smallest_class() -> None:
    job = make_job(model={"uri": "hf://Qwen/Qwen2.5-7B-Instruct"}, method="QLoRA")
    children = build(job)
    assert children.plan.sizing.gpus == 1
    assert pod_spec(children)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert trainer(children)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert children.notes == ()


def test_activation_offload_adds_its_host_memory_to_the_pod() -> None:
    big = {"batchSize": 32, "maxSeqLength": 4096}
    job = make_job(model={"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, training=big)
    children = build(job)
    check = children.plan.sizing.check
    assert check is not None
    assert check.setup.offload_activations  # the H100 fits it only with offload
    # 32 layers x 131,072 tokens x 4,096 x 2 bytes of layer inputs
    extra = math.ceil(check.estimate.host_offload_gib)
    assert extra == 32
    memory = f"{64 + extra}Gi"
    amounts = trainer(children)["resources"]
    assert amounts["requests"]["memory"] == amounts["limits"]["memory"] == memory
    assert children.notes == (
        f"activation offload keeps ~{extra} GiB of checkpointed activations in host memory: "
        f"the pod's memory is 64Gi + {extra}Gi (set resources.memory to choose it)",
    )
    chosen = make_job(
        model={"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
        training=big,
        resources={"memory": "48Gi"},
    )
    children = build(chosen)
    assert trainer(children)["resources"]["limits"]["memory"] == "48Gi"
    assert children.notes == ()


def test_auto_that_fits_nowhere_is_refused_with_advice() -> None:
    job = make_job(model={"uri": "hf://meta-llama/Llama-3.1-70B-Instruct"}, method="Full")
    with pytest.raises(SpecError) as caught:
        build_children(job, SETTINGS, RUN_ID)
    assert caught.value.reason == Reason.INSUFFICIENT_GPU_MEMORY
    problem = caught.value.problems[0]
    assert problem.field == "spec.resources.gpus"
    assert "needs ~" in problem.message
    assert "GiB of GPU memory" in problem.message


def test_auto_for_an_unknown_model_gets_one_gpu_and_a_note() -> None:
    children = build(make_job(model={"uri": "hf://acme/house-model-v7"}))
    assert children.plan.sizing.gpus == 1
    assert len(children.notes) == 1
    assert "preflight" in children.notes[0]
    assert pod_spec(children)["terminationGracePeriodSeconds"] == (
        SETTINGS.default_termination_grace_seconds
    )


def test_unknown_gpu_class_is_an_invalid_spec() -> None:
    with pytest.raises(SpecError) as caught:
        build_children(make_job(resources={"gpuClass": "tpu-v5"}), SETTINGS, RUN_ID)
    assert caught.value.reason == Reason.INVALID_SPEC
    assert caught.value.problems[0].field == "spec.resources.gpuClass"


# --- lifecycle: Kueue, suspend, deadlines, failure policy -----------------------------------


@pytest.mark.parametrize(
    ("queue", "suspend", "job_suspended"),
    [
        pytest.param(None, False, False, id="runs"),
        pytest.param(None, True, True, id="suspended"),
        pytest.param("gpu-queue", False, True, id="kueue-admits"),
        pytest.param("gpu-queue", True, True, id="kueue-and-suspended"),
    ],
)
def test_kueue_and_suspend(queue: str | None, suspend: bool, job_suspended: bool) -> None:
    extra: dict[str, Any] = {"queueName": queue} if queue else {}
    k8s_job = build(make_job(suspend=suspend, **extra)).job
    assert k8s_job["spec"]["suspend"] is job_suspended
    assert k8s_job["metadata"]["labels"].get(names.LABEL_KUEUE_QUEUE) == queue


def test_deadlines_backoff_and_ttl() -> None:
    spec = build(
        make_job(activeDeadlineSeconds=7200, backoffLimit=5, ttlSecondsAfterFinished=600)
    ).job["spec"]
    assert (
        spec["activeDeadlineSeconds"],
        spec["backoffLimit"],
        spec["ttlSecondsAfterFinished"],
    ) == (
        7200,
        5,
        600,
    )
    defaults = build(make_job()).job["spec"]
    assert defaults["backoffLimit"] == 3
    assert "activeDeadlineSeconds" not in defaults
    assert "ttlSecondsAfterFinished" not in defaults


def test_pod_failure_policy_follows_the_exit_code_table() -> None:
    rules = pod_failure_policy()["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    expected = {
        FailureClass.USER: "FailJob",
        FailureClass.OUT_OF_MEMORY: "FailJob",
        FailureClass.INFRASTRUCTURE: "Count",
    }
    for row in EXIT_CODES:
        matching = [r for r in rules if row.code in r.get("onExitCodes", {}).get("values", [])]
        assert len(matching) == 1, row
        assert matching[0]["action"] == expected[row.failure_class], row
        assert matching[0]["onExitCodes"]["containerName"] == "trainer"
        assert matching[0]["onExitCodes"]["operator"] == "In"


def test_the_documented_exit_code_table_matches_the_contract() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "operator.md").read_text()
    actions = {
        FailureClass.USER: "FailJob",
        FailureClass.OUT_OF_MEMORY: "FailJob",
        FailureClass.INFRASTRUCTURE: "Count",
    }
    for row in EXIT_CODES:
        line = (
            f"| {row.code} | `{row.reason.value}` | {row.failure_class.value} | "
            f"{actions[row.failure_class]} | {row.meaning} |"
        )
        assert line in doc


# --- scheduling -----------------------------------------------------------------------------


def test_tolerations_affinity_and_node_selector_merge() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}
                ]
            }
        }
    }
    job = make_job(
        resources={
            "gpus": 1,
            "gpuClass": "h100-80gb",
            "nodeSelector": {"pool": "training"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
            ],
            "affinity": affinity,
            "priorityClassName": "training-low",
        }
    )
    pod = pod_spec(build(job))
    assert pod["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "pool": "training",
    }
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "spot",
            "operator": "Equal",
            "value": "true",
            "effect": "NoExecute",
            "tolerationSeconds": 60,
        },
    ]
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "training-low"


def test_node_selector_contradicting_the_gpu_class_is_refused() -> None:
    job = make_job(
        resources={
            "gpuClass": "h100-80gb",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        }
    )
    with pytest.raises(SpecError) as caught:
        build_children(job, SETTINGS, RUN_ID)
    assert caught.value.problems[0].field == "spec.resources.nodeSelector.nvidia.com/gpu.product"
    assert "contradicts GPU class h100-80gb" in caught.value.problems[0].message


def test_service_account_image_and_pull_secrets() -> None:
    settings = SETTINGS.model_copy(update={"image_pull_secrets": ["registry-creds"]})
    job = make_job(resources={"serviceAccountName": "s3-reader", "image": "my/trainer:dev"})
    pod = pod_spec(build(job, settings))
    assert pod["serviceAccountName"] == "s3-reader"
    assert "automountServiceAccountToken" not in pod
    assert pod["containers"][0]["image"] == "my/trainer:dev"
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]


# --- volumes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scratch", "nodes", "volume", "claim"),
    [
        pytest.param(None, 1, {"emptyDir": {"sizeLimit": "200Gi"}}, None, id="default"),
        pytest.param(
            {"size": "500Gi"}, 1, {"emptyDir": {"sizeLimit": "500Gi"}}, None, id="emptydir-size"
        ),
        pytest.param(
            {"type": "PVC", "claimName": "team-cache"},
            1,
            {"persistentVolumeClaim": {"claimName": "team-cache"}},
            None,
            id="existing-claim",
        ),
        pytest.param(
            {"type": "PVC", "size": "1Ti", "storageClassName": "fast-ssd"},
            1,
            {"persistentVolumeClaim": {"claimName": f"support-bot-{RUN_ID}-scratch"}},
            {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Ti"}},
                "storageClassName": "fast-ssd",
            },
            id="new-claim",
        ),
        pytest.param(
            {"type": "PVC", "size": "1Ti"},
            2,
            {
                "ephemeral": {
                    "volumeClaimTemplate": {
                        "metadata": {"labels": names.labels("support-bot", RUN_ID)},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Ti"}},
                        },
                    }
                }
            },
            None,
            id="claim-per-node",
        ),
    ],
)
def test_scratch_volume(
    scratch: dict[str, Any] | None,
    nodes: int,
    volume: dict[str, Any],
    claim: dict[str, Any] | None,
) -> None:
    resources: dict[str, Any] = {"gpus": 1}
    if scratch:
        resources["scratch"] = scratch
    extra: dict[str, Any] = {}
    if nodes > 1:
        extra["distributed"] = {"nodes": nodes, "strategy": "FSDP"}
    children = build(make_job(resources=resources, **extra))
    volumes = {v["name"]: v for v in pod_spec(children)["volumes"]}
    assert volumes["scratch"] == {"name": "scratch", **volume}
    if claim is None:
        assert children.scratch_claim is None
    else:
        assert children.scratch_claim is not None
        assert children.scratch_claim["spec"] == claim
        assert children.objects.index(children.scratch_claim) < children.objects.index(children.job)


def test_every_writable_path_is_a_volume() -> None:
    children = build(make_job(resources={"gpus": 1, "shmSize": "32Gi"}))
    container = trainer(children)
    env = env_of(container)
    for variable in ("HOME", "TMPDIR", "HF_HOME", "KUBETUNE_CACHE_DIR"):
        assert env[variable]["value"].startswith("/scratch/")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/scratch"]["name"] == "scratch"
    assert mounts["/tmp"] == {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"}
    assert env["TMPDIR"]["value"] == "/scratch/tmp"
    assert mounts["/dev/shm"]["name"] == "shm"
    shm = next(v for v in pod_spec(children)["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}


def test_pvc_uris_are_mounted_where_the_trainer_looks() -> None:
    job = make_job(
        dataset={"uri": "pvc://datasets/support/train.jsonl"},
        output={"uri": "pvc://artifacts/kubetune"},
    )
    children = build(job)
    container = trainer(children)
    assert env_of(container)["KUBETUNE_PVC_ROOT"]["value"] == "/mnt/kubetune/pvc"
    volumes = {v["name"]: v for v in pod_spec(children)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    datasets = mounts["/mnt/kubetune/pvc/datasets"]
    artifacts = mounts["/mnt/kubetune/pvc/artifacts"]
    assert datasets["readOnly"] is True
    assert artifacts["readOnly"] is False
    assert volumes[datasets["name"]]["persistentVolumeClaim"] == {
        "claimName": "datasets",
        "readOnly": True,
    }
    assert volumes[artifacts["name"]]["persistentVolumeClaim"] == {"claimName": "artifacts"}


# --- credentials ----------------------------------------------------------------------------


def secret_env(children: Children) -> dict[str, tuple[str, str, bool]]:
    found = {}
    for env in trainer(children)["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            found[env["name"]] = (ref["name"], ref["key"], ref.get("optional", False))
    return found


def test_credentials_come_from_secret_references() -> None:
    job = make_job(
        model={"uri": "hf://meta-llama/Llama-3.2-1B", "credentialsSecretRef": {"name": "hf-token"}},
        dataset={"uri": "s3://ml-data/train.jsonl", "credentialsSecretRef": {"name": "s3-creds"}},
        output={"uri": "s3://ml-artifacts/kubetune", "credentialsSecretRef": {"name": "s3-creds"}},
        evaluation={
            "metrics": ["Perplexity", "Judge"],
            "judge": {
                "endpoint": "https://api.openai.com/v1",
                "model": "gpt-4o-mini",
                "apiKeySecretRef": {"name": "openai", "key": "api-key"},
            },
        },
    )
    children = build(job)
    env = secret_env(children)
    assert env["HF_TOKEN"] == ("hf-token", "HF_TOKEN", False)
    assert env["HF_ENDPOINT"] == ("hf-token", "HF_ENDPOINT", True)
    assert env["AWS_ACCESS_KEY_ID"] == ("s3-creds", "AWS_ACCESS_KEY_ID", False)
    assert env["AWS_SECRET_ACCESS_KEY"] == ("s3-creds", "AWS_SECRET_ACCESS_KEY", False)
    assert env["AWS_SESSION_TOKEN"] == ("s3-creds", "AWS_SESSION_TOKEN", True)
    assert env[JUDGE_API_KEY_ENV] == ("openai", "api-key", False)
    names_in_env = [e["name"] for e in trainer(children)["env"]]
    assert len(names_in_env) == len(set(names_in_env))


def test_the_trainer_config_holds_secret_names_only() -> None:
    job = make_job(
        model={"uri": "hf://meta-llama/Llama-3.2-1B", "credentialsSecretRef": {"name": "hf-token"}},
        output={"uri": "s3://ml-artifacts/kubetune", "credentialsSecretRef": {"name": "s3-creds"}},
    )
    children = build(job)
    data = json.loads(children.config_map["data"][CONFIG_KEY])

    def refs(value: Any) -> list[Any]:
        if isinstance(value, dict):
            found = [v for k, v in value.items() if k.endswith("SecretRef")]
            return found + [r for v in value.values() for r in refs(v)]
        if isinstance(value, list):
            return [r for v in value for r in refs(v)]
        return []

    assert refs(data) == [{"name": "hf-token"}, {"name": "s3-creds"}]
    assert "valueFrom" not in children.config_map["data"][CONFIG_KEY]


def test_https_dataset_token() -> None:
    job = make_job(
        dataset={
            "uri": "https://datasets.example.com/train.csv",
            "credentialsSecretRef": {"name": "data-portal"},
        }
    )
    assert secret_env(build(job))["KUBETUNE_HTTPS_TOKEN"] == (
        "data-portal",
        "KUBETUNE_HTTPS_TOKEN",
        False,
    )


def test_default_output_credentials_from_settings() -> None:
    settings = SETTINGS.model_copy(update={"default_output_credentials_secret": "team-s3"})
    assert secret_env(build(make_job(), settings))["AWS_ACCESS_KEY_ID"][0] == "team-s3"
    assert secret_env(build(make_job())) == {}


def test_two_secrets_for_one_variable_are_refused() -> None:
    job = make_job(
        dataset={"uri": "s3://ml-data/train.jsonl", "credentialsSecretRef": {"name": "data-s3"}},
        output={"uri": "s3://ml-artifacts/kubetune", "credentialsSecretRef": {"name": "out-s3"}},
    )
    with pytest.raises(SpecError) as caught:
        build_children(job, SETTINGS, RUN_ID)
    assert [p.field for p in caught.value.problems] == ["spec.output.credentialsSecretRef"]
    assert "data-s3" in caught.value.problems[0].message
    assert "out-s3" in caught.value.problems[0].message


# --- what a cluster refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"model": {"uri": "/models/llama"}}, "spec.model.uri", id="model-path"),
        pytest.param(
            {"dataset": {"uris": ["s3://ml-data/a.jsonl", "file:///data/b.jsonl"]}},
            "spec.dataset.uris[1]",
            id="dataset-file-uri",
        ),
        pytest.param(
            {"dataset": {"uri": "s3://ml-data/a.jsonl", "validation": {"uri": "./val.jsonl"}}},
            "spec.dataset.validation.uri",
            id="validation-path",
        ),
        pytest.param(
            {
                "stages": [
                    {"type": "SFT"},
                    {"type": "DPO", "dataset": {"uri": "data/pairs.jsonl"}},
                ]
            },
            "spec.stages[1].dataset.uri",
            id="stage-dataset",
        ),
        pytest.param({"output": {"uri": "./artifacts"}}, "spec.output.uri", id="output"),
    ],
)
def test_local_uris_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_children(make_job(**spec), SETTINGS, RUN_ID)
    assert caught.value.reason == Reason.LOCAL_URI_IN_CLUSTER
    assert [p.field for p in caught.value.problems] == [field]
    assert "local path" in caught.value.problems[0].message


def test_every_problem_is_reported_at_once() -> None:
    job = make_job(
        model={"uri": "file:///models/llama"},
        dataset={"uri": "./train.jsonl"},
        output={"uri": "/tmp/out"},
    )
    with pytest.raises(SpecError) as caught:
        build_children(job, SETTINGS, RUN_ID)
    fields = [p.field for p in caught.value.problems]
    assert fields == ["spec.model.uri", "spec.dataset.uri", "spec.output.uri"]
    assert "spec.dataset.uri: ./train.jsonl is a local path" in str(caught.value)


def test_missing_output_is_refused() -> None:
    job = make_job()
    job.spec.output = None
    with pytest.raises(SpecError) as caught:
        build_children(job, SETTINGS, RUN_ID)
    assert caught.value.problems[0].field == "spec.output"
    assert caught.value.reason == Reason.INVALID_SPEC


def test_builtin_random_needs_the_settings_permission() -> None:
    job = make_job(model={"uri": "builtin://random/llama-3.2-1b"})
    with pytest.raises(SpecError) as caught:
        build_children(job, SETTINGS, RUN_ID)
    assert caught.value.reason == Reason.INVALID_SPEC
    assert caught.value.problems[0].field == "spec.model.uri"
    assert "allowBuiltinRandom" in caught.value.problems[0].message
    allowed = SETTINGS.model_copy(update={"allow_builtin_random": True})
    assert config_of(build(job, allowed)).allow_builtin_random is True


def test_a_job_without_uid_cannot_own_children() -> None:
    job = make_job()
    job.metadata = job.metadata.model_copy(update={"uid": None})
    with pytest.raises(ValueError, match=r"metadata\.uid"):
        build_children(job, SETTINGS, RUN_ID)


# --- names, labels, the TrainerConfig -------------------------------------------------------


def test_long_names_are_cut_deterministically() -> None:
    long_name = "customer-support-assistant-llama-8b-lora-v2-prod"
    assert len(long_name) == 48
    first = names.job_name(long_name, RUN_ID)
    assert first == names.job_name(long_name, RUN_ID)
    assert len(first) <= names.MAX_CHILD_NAME
    assert DNS_LABEL.match(first)
    assert re.search(r"-[0-9a-f]{8}$", first)
    assert first != names.job_name(long_name, "ba9876543210")
    assert names.job_name(long_name[:-1] + "3", RUN_ID) != first
    children = build(make_job(name=long_name, distributed={"nodes": 2, "strategy": "FSDP"}))
    assert children.job["metadata"]["name"] == first
    assert children.config_map["metadata"]["name"] == f"{first}-config"
    assert children.job["metadata"]["labels"][names.LABEL_FINETUNEJOB] == long_name


@pytest.mark.parametrize(
    ("ftj_name", "job_name", "service_name"),
    [
        pytest.param("support-bot", f"support-bot-{RUN_ID}", f"support-bot-{RUN_ID}", id="plain"),
        pytest.param("team.bot", f"team-bot-{RUN_ID}", f"team-bot-{RUN_ID}", id="dots"),
        pytest.param("7b-tune", f"7b-tune-{RUN_ID}", f"kt-7b-tune-{RUN_ID}", id="digit-first"),
    ],
)
def test_child_names(ftj_name: str, job_name: str, service_name: str) -> None:
    assert names.job_name(ftj_name, RUN_ID) == job_name
    assert names.config_map_name(ftj_name, RUN_ID) == f"{job_name}-config"
    assert names.service_name(ftj_name, RUN_ID) == service_name
    build(make_job(name=ftj_name, distributed={"nodes": 2, "strategy": "FSDP"}))


def test_labels_and_user_labels() -> None:
    children = build(make_job(labels={"team": "ml", names.LABEL_RUN_ID: "spoofed"}))
    expected = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "app.kubernetes.io/component": "trainer",
        "kubetune.io/finetunejob": "support-bot",
        "kubetune.io/run-id": RUN_ID,
    }
    assert names.labels("support-bot", RUN_ID) == expected
    for obj in children.objects:
        assert obj["metadata"]["labels"] == {"team": "ml", **expected}
    assert children.job["spec"]["template"]["metadata"]["labels"] == {"team": "ml", **expected}


def test_spec_hash_follows_every_field_unlike_the_run_id() -> None:
    job = make_job()
    tolerant = make_job(resources={"tolerations": [{"key": "spot", "operator": "Exists"}]})
    assert run_id_for(job.spec) == run_id_for(tolerant.spec)
    assert names.spec_hash(job.spec) != names.spec_hash(tolerant.spec)
    assert names.spec_hash(job.spec) == names.spec_hash(make_job().spec)


def test_config_map_holds_the_trainer_config() -> None:
    settings = SETTINGS.model_copy(update={"metrics_port": 9500})
    children = build(make_job(), settings)
    config = config_of(children)
    assert config.run.namespace == NAMESPACE
    assert config.run.job_name == "support-bot"
    assert config.run.run_id == RUN_ID
    assert config.run.output_uri == "s3://ml-artifacts/kubetune"
    assert config.spec == make_job().spec
    assert config.metrics_port == 9500
    assert trainer(children)["ports"][0]["containerPort"] == 9500


def test_metrics_port_zero_opens_no_port() -> None:
    settings = SETTINGS.model_copy(update={"metrics_port": 0})
    assert "ports" not in trainer(build(make_job(), settings))


# --- the cleanup pod ------------------------------------------------------------------------


def test_cleanup_pod_deletes_runs_with_the_output_credentials_only() -> None:
    job = make_job(
        model={"uri": "hf://meta-llama/Llama-3.2-1B", "credentialsSecretRef": {"name": "hf-token"}},
        output={
            "uri": "s3://ml-artifacts/kubetune",
            "credentialsSecretRef": {"name": "s3-creds"},
            "endpoint": "https://minio.example.com",
            "region": "eu-west-1",
            "deletePolicy": "Delete",
        },
    )
    run_uri = f"s3://ml-artifacts/kubetune/{NAMESPACE}/support-bot/{RUN_ID}"
    pod = build_cleanup_pod(job, SETTINGS, [run_uri])
    assert_schema_valid(pod)
    assert pod["metadata"]["name"] == "support-bot-cleanup"
    assert pod["metadata"]["labels"][names.LABEL_COMPONENT] == "cleanup"
    assert pod["metadata"]["ownerReferences"] == [owner_reference(job)]
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python"]
    assert container["args"] == [
        "-m",
        "kubetune.storage.delete",
        run_uri,
        "--endpoint-url",
        "https://minio.example.com",
        "--region",
        "eu-west-1",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "HF_TOKEN" not in env
    assert_pod_locked_down(pod["spec"])
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_cleanup_pod_mounts_a_pvc_output() -> None:
    job = make_job(output={"uri": "pvc://artifacts/runs", "deletePolicy": "Delete"})
    pod = build_cleanup_pod(job, SETTINGS, [f"pvc://artifacts/runs/{NAMESPACE}/support-bot"])
    assert_schema_valid(pod)
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/kubetune/pvc/artifacts"]["readOnly"] is False


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("s3://ml-artifacts/kubetune", id="store-root"),
        pytest.param(f"s3://ml-artifacts/kubetune/{NAMESPACE}/support-bot-2/x", id="other-job"),
        pytest.param("s3://other-bucket/ml-team/support-bot/x", id="other-bucket"),
    ],
)
def test_cleanup_pod_refuses_uris_outside_the_job(uri: str) -> None:
    with pytest.raises(ValueError, match="is not inside"):
        build_cleanup_pod(make_job(), SETTINGS, [uri])


# --- the examples ---------------------------------------------------------------------------


def example_jobs() -> list[Any]:
    params = []
    for path in EXAMPLES:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document and document.get("kind") == "FineTuneJob":
                params.append(pytest.param(document, id=f"{path.stem}-{index}"))
    return params


@pytest.mark.parametrize("document", example_jobs())
def test_every_example_renders_valid_manifests(document: dict[str, Any]) -> None:
    document = copy.deepcopy(document)
    document["metadata"]["namespace"] = NAMESPACE
    document["metadata"]["uid"] = UID
    output = document["spec"].setdefault("output", {"uri": "s3://ml-artifacts/kubetune"})
    if is_local(output["uri"]):
        output["uri"] = "s3://ml-artifacts/kubetune"
    job = FineTuneJob.model_validate(document)
    assert not [uri for _, uri in spec_uris(job.spec) if is_local(uri)]
    children = build(job, SETTINGS.model_copy(update={"allow_builtin_random": True}))
    nodes = job.spec.distributed.nodes if job.spec.distributed else 1
    assert (children.service is not None) == (nodes > 1)
    root = f"{job.spec.output.uri if job.spec.output else ''}/{NAMESPACE}/{job.metadata.name}"
    cleanup = build_cleanup_pod(job, SETTINGS, [f"{root}/{RUN_ID}"])
    assert_schema_valid(cleanup)
