"""The trainer's memory preflight on a GPU (the device's properties stubbed): the log line,
the plan it returns, and the refusal, for SFT and for DPO stages sized by their data."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.trainer.pipeline import PipelineError, _preflight

GIB = 1024**3
MODEL = SimpleNamespace(path="llama-3.1-8b")  # `load_architecture` reads a table name too


def spec(**extra: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "builtin://random/llama-3.1-8b"},
            "dataset": {"uri": "data.jsonl"},
            "method": "QLoRA",
            "training": {"batchSize": 2, "gradientCheckpointing": "Enabled"},
            **extra,
        }
    )


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_memory(gib: float) -> None:
        props = SimpleNamespace(total_memory=int(gib * GIB))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    return set_memory


def run(job: FineTuneJobSpec, data_tokens: dict[int, int]) -> tuple[Any, list[str]]:
    lines: list[str] = []
    setup = _preflight(job, MODEL, True, True, data_tokens, "kubetune_varlen", lines.append)  # type: ignore[arg-type]
    return setup, lines


def test_sft_stage_logs_its_estimate_against_the_gpu(gpu: Any) -> None:
    gpu(139.8)
    setup, lines = run(spec(), {})
    assert setup is not None
    assert setup.data_tokens is None
    assert len(lines) == 1
    assert lines[0].startswith("Memory estimate: ")
    assert lines[0].endswith(" GiB per GPU of 139.8 GiB")
    assert "micro-batches" not in lines[0]


def test_dpo_stage_sized_by_its_data_says_so(gpu: Any) -> None:
    gpu(80.0)
    job = spec(stages=[{"type": "DPO"}])
    setup, lines = run(job, {0: 7087})
    assert setup is not None
    assert setup.data_tokens == 7087
    assert "(DPO: micro-batches of at most 7,087 tokens in its data)" in lines[0]


def test_a_job_larger_than_the_gpu_is_refused_with_advice(gpu: Any) -> None:
    gpu(4.0)
    with pytest.raises(PipelineError) as caught:
        run(spec(), {})
    assert caught.value.reason == Reason.INSUFFICIENT_GPU_MEMORY
    assert "4.0 GiB" in str(caught.value) or "4 GiB" in str(caught.value)


def test_offload_is_checked_against_the_host_memory(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu(139.8)
    job = spec(
        training={
            "batchSize": 4,
            "gradientCheckpointing": "Enabled",
            "activationOffload": "Enabled",
        }
    )
    monkeypatch.setenv("KUBETUNE_HOST_MEMORY_GIB", "64")
    setup, lines = run(job, {})
    assert setup is not None
    assert setup.offload_activations
    assert lines[1].startswith("Host memory for activation offload: ~2.0 GiB, of ")
    monkeypatch.setenv("KUBETUNE_HOST_MEMORY_GIB", "1")
    with pytest.raises(PipelineError) as caught:
        run(job, {})
    assert caught.value.reason == Reason.INSUFFICIENT_MEMORY
    assert str(caught.value).startswith(
        "activation offload needs ~2.0 GiB of host memory, 1.0 GiB available "
        "(KUBETUNE_HOST_MEMORY_GIB): raise resources.memory"
    )
