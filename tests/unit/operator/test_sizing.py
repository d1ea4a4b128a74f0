"""GPU sizing of training pods: `gpus: Auto` against the GPU classes of the operator
settings, refusals with the calculator's advice, and the SIGTERM grace period."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.calc import KNOWN_ARCHITECTURES, load_architecture, preflight
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.sizing import (
    MAX_GRACE_SECONDS,
    MIN_GRACE_SECONDS,
    SizingError,
    checkpoint_grace,
    size_gpus,
)

SETTINGS = OperatorSettings.model_validate(
    {
        "gpuClasses": [
            {"name": "l4-24gb", "memoryGiB": 22.5, "nodeSelector": {"gpu": "l4"}},
            {"name": "a100-40gb", "memoryGiB": 39.4, "nodeSelector": {"gpu": "a100"}},
            {
                "name": "h100-80gb",
                "memoryGiB": 79.6,
                "nodeSelector": {"gpu": "h100"},
                "resourceName": "nvidia.com/gpu.shared",
            },
        ]
    }
)
LLAMA_8B = "hf://meta-llama/Llama-3.1-8B-Instruct"


def make_spec(**fields: Any) -> FineTuneJobSpec:
    wire: dict[str, Any] = {
        "model": {"uri": LLAMA_8B},
        "dataset": {"uri": "s3://ml-data/train.jsonl"},
        "output": {"uri": "s3://ml-artifacts/kubetune"},
    }
    wire.update(fields)
    return FineTuneJobSpec.model_validate(wire)


FULL_FSDP = {
    "method": "Full",
    "distributed": {"strategy": "FSDP"},
    "training": {"batchSize": 4, "maxSeqLength": 4096},
}
# The plain Hugging Face layers (no fused kernels, PEFT's casts): ~42 GiB per GPU.
BIG_BATCH_LORA = {
    "training": {
        "batchSize": 8,
        "maxSeqLength": 4096,
        "fastPaths": {"fusedKernels": "Disabled", "leanAdapters": "Disabled"},
    }
}


@pytest.mark.parametrize(
    ("fields", "expected_gpus", "expected_class"),
    [
        pytest.param({}, 1, "a100-40gb", id="lora-8b-skips-l4"),
        pytest.param(
            {"method": "QLoRA", "model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"}},
            1,
            "l4-24gb",
            id="qlora-7b",
        ),
        pytest.param(BIG_BATCH_LORA, 1, "h100-80gb", id="big-batch-skips-small-classes"),
        pytest.param(
            {**FULL_FSDP, "resources": {"gpuClass": "h100-80gb"}}, 2, "h100-80gb", id="fsdp-h100"
        ),
        pytest.param(
            {**FULL_FSDP, "resources": {"gpuClass": "a100-40gb"}}, 8, "a100-40gb", id="fsdp-a100"
        ),
        pytest.param(FULL_FSDP, 8, "a100-40gb", id="fsdp-settings-order"),
    ],
)
def test_auto_takes_the_smallest_count_on_the_first_class_that_fits(
    fields: dict[str, Any], expected_gpus: int, expected_class: str
) -> None:
    spec = make_spec(**fields)
    sizing = size_gpus(spec, SETTINGS)
    assert sizing.gpu_class is not None
    assert (sizing.gpus, sizing.gpu_class.name) == (expected_gpus, expected_class)
    assert sizing.check is not None
    assert sizing.check.fits is True
    assert sizing.note == ""
    assert sizing.node_selector == sizing.gpu_class.node_selector
    # Smallest: the next smaller count of (1, 2, 4, 8) does not fit on that class.
    if expected_gpus > 1:
        arch = load_architecture(spec.model.uri)
        smaller = preflight(spec, arch, sizing.gpu_class.memory_gib, expected_gpus // 2)
        assert smaller.fits is False


def test_gpu_class_resource_name_is_requested() -> None:
    sizing = size_gpus(make_spec(resources={"gpuClass": "h100-80gb"}), SETTINGS)
    assert sizing.resource_name == "nvidia.com/gpu.shared"
    assert size_gpus(make_spec(), SETTINGS).resource_name == "nvidia.com/gpu"


def test_auto_refused_on_the_named_class_points_to_one_that_fits() -> None:
    with pytest.raises(SizingError) as caught:
        size_gpus(make_spec(**BIG_BATCH_LORA, resources={"gpuClass": "l4-24gb"}), SETTINGS)
    error = caught.value
    assert error.reason == Reason.INSUFFICIENT_GPU_MEMORY
    assert error.field == "spec.resources.gpus"
    assert "up to 8 GPUs of class l4-24gb (22.5 GiB each)" in error.message
    assert "needs ~42 GiB of GPU memory" in error.message
    assert "lower training.batchSize" in error.message
    # On the A100 only with its checkpointed inputs in host memory.
    assert "it fits on gpuClass a100-40gb or h100-80gb" in error.message


def test_auto_refused_everywhere_lists_the_classes_and_the_advice() -> None:
    with pytest.raises(SizingError) as caught:
        size_gpus(make_spec(method="Full"), SETTINGS)
    message = caught.value.message
    assert caught.value.reason == Reason.INSUFFICIENT_GPU_MEMORY
    assert "l4-24gb (22.5 GiB), a100-40gb (39.4 GiB), h100-80gb (79.6 GiB)" in message
    # Without sharding more GPUs never help: the advice names FSDP.
    assert "with distributed.strategy FSDP" in message


def test_auto_respects_gpus_per_node() -> None:
    settings = OperatorSettings.model_validate(
        {"gpuClasses": [{"name": "a100-40gb", "memoryGiB": 39.4, "gpusPerNode": 4}]}
    )
    with pytest.raises(SizingError, match="up to 4 GPUs of class a100-40gb"):
        size_gpus(make_spec(**FULL_FSDP, resources={"gpuClass": "a100-40gb"}), settings)


def test_unknown_gpu_class_names_the_known_ones() -> None:
    with pytest.raises(SizingError) as caught:
        size_gpus(make_spec(resources={"gpuClass": "b200"}), SETTINGS)
    assert caught.value.reason == Reason.INVALID_SPEC
    assert caught.value.field == "spec.resources.gpuClass"
    assert "l4-24gb, a100-40gb, h100-80gb" in caught.value.message


def test_auto_for_a_model_the_calculator_cannot_know() -> None:
    sizing = size_gpus(make_spec(model={"uri": "hf://acme/mystery-model"}), SETTINGS)
    assert sizing.gpus == 1
    assert sizing.check is None
    assert "cannot size hf://acme/mystery-model" in sizing.note
    assert "preflight" in sizing.note
    assert sizing.termination_grace_seconds == SETTINGS.default_termination_grace_seconds


def test_auto_without_gpu_classes_starts_with_one_gpu() -> None:
    sizing = size_gpus(make_spec(), OperatorSettings())
    assert (sizing.gpus, sizing.gpu_class, sizing.node_selector) == (1, None, {})
    assert "declare no GPU classes" in sizing.note
    assert sizing.check is not None
    assert sizing.check.fits is None


@pytest.mark.parametrize(
    ("resources", "expected_gpus", "checked"),
    [
        pytest.param({"gpus": 4}, 4, None, id="count-without-class"),
        pytest.param({"gpus": 2, "gpuClass": "h100-80gb"}, 2, True, id="count-on-class"),
        pytest.param({"gpus": 0}, 0, None, id="cpu"),
    ],
)
def test_fixed_counts(resources: dict[str, Any], expected_gpus: int, checked: bool | None) -> None:
    sizing = size_gpus(make_spec(resources=resources), SETTINGS)
    assert sizing.gpus == expected_gpus
    assert sizing.check is not None
    assert sizing.check.fits is checked


def test_fixed_count_that_cannot_fit_is_refused_early() -> None:
    with pytest.raises(SizingError) as caught:
        size_gpus(make_spec(method="Full", resources={"gpus": 1, "gpuClass": "l4-24gb"}), SETTINGS)
    assert caught.value.reason == Reason.INSUFFICIENT_GPU_MEMORY
    assert caught.value.message.startswith("1 GPU(s) of class l4-24gb: needs ~")


def test_grace_period_is_the_checkpoint_upload_time_plus_margin() -> None:
    spec = make_spec(method="Full", resources={"gpus": 8})
    sizing = size_gpus(spec, SETTINGS)
    assert sizing.checkpoint_bytes is not None
    # Full fine-tuning of 8B: bf16 weights + AdamW states, ~80 GB.
    assert 60e9 < sizing.checkpoint_bytes < 120e9
    slow = OperatorSettings.model_validate(
        {"uploadBandwidthMiBps": 500, "terminationGraceMarginSeconds": 30}
    )
    assert size_gpus(spec, slow).termination_grace_seconds == (
        math.ceil(sizing.checkpoint_bytes / (500 * 2**20)) + 30
    )


@pytest.mark.parametrize(
    ("model", "method", "bandwidth", "expected"),
    [
        pytest.param("builtin://smollm2-135m-instruct", "LoRA", 200, MIN_GRACE_SECONDS, id="floor"),
        pytest.param(
            "hf://meta-llama/Llama-3.1-70B-Instruct", "Full", 10, MAX_GRACE_SECONDS, id="ceiling"
        ),
    ],
)
def test_grace_period_is_clamped(model: str, method: str, bandwidth: int, expected: int) -> None:
    spec = make_spec(model={"uri": model}, method=method, resources={"gpus": 8})
    arch = load_architecture(model)
    estimate = preflight(spec, arch, None, 8).estimate
    settings = OperatorSettings.model_validate(
        {"uploadBandwidthMiBps": bandwidth, "terminationGraceMarginSeconds": 0}
    )
    grace, _ = checkpoint_grace(arch, estimate, settings)
    assert grace == expected


def test_auto_prefers_a_class_that_fits_without_activation_offload() -> None:
    # The default 8B LoRA job fits the L4 only with its checkpointed inputs in host memory
    # (slower steps): the A100 that fits without comes first.
    spec = make_spec()
    assert preflight(spec, KNOWN_ARCHITECTURES["llama-3.1-8b"], 22.5, 1).setup.offload_activations
    sizing = size_gpus(spec, SETTINGS)
    assert sizing.gpu_class is not None
    assert sizing.gpu_class.name == "a100-40gb"
    assert sizing.check is not None
    assert not sizing.check.setup.offload_activations


def test_auto_offloads_when_no_class_fits_without_it() -> None:
    spec = make_spec(training={"batchSize": 32, "maxSeqLength": 4096})
    sizing = size_gpus(spec, SETTINGS)
    assert sizing.gpu_class is not None
    assert (sizing.gpus, sizing.gpu_class.name) == (1, "h100-80gb")
    assert sizing.check is not None
    assert sizing.check.setup.offload_activations
    assert sizing.check.estimate.host_offload_gib > 30
