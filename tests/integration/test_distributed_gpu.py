"""Training on two GPUs (DDP and FSDP, through `kubetune run --nproc-per-node 2`) against
one GPU on the same data and global batch, and a kill/resume across both ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support.distributed_runs import assert_same_training, kubetune_run, losses, spec

pytestmark = pytest.mark.gpu

BF16_LOSS_TOLERANCE = 0.05
"""bf16 on the GPU: the per-step losses of two ranks and of one GPU differ in the last bits
of every reduction."""
BF16_ADAPTER_TOLERANCE = 5e-3


def two_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


needs_two = pytest.mark.skipif("not two_gpus()", reason="needs two GPUs")
needs_deepspeed = pytest.mark.skipif(
    "not deepspeed_installed()", reason="needs the deepspeed package (extra `deepspeed`)"
)


def run(tmp: Path, name: str, job_spec: dict[str, Any], processes: int) -> Path:
    """A run that must succeed; its RUN_URI."""
    proc = kubetune_run(tmp, name, job_spec, processes)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return run(tmp_path_factory.mktemp("one"), "one-gpu", spec(tiny_model_dir, 2), 1)


@needs_two
@pytest.mark.parametrize(
    "strategy",
    [
        "DDP",
        "FSDP",
        pytest.param("DeepSpeedZeRO2", marks=needs_deepspeed),
        pytest.param("DeepSpeedZeRO3", marks=needs_deepspeed),
    ],
)
def test_two_gpus_train_like_one(
    tmp_path: Path, tiny_model_dir: Path, one_gpu: Path, strategy: str
) -> None:
    job_spec = spec(tiny_model_dir, 1, distributed={"strategy": strategy})
    two = run(tmp_path, f"two-{strategy.lower()}", job_spec, 2)
    assert (two / "manifest.json").is_file()
    assert_same_training(two, one_gpu, BF16_LOSS_TOLERANCE, BF16_ADAPTER_TOLERANCE)


@needs_two
def test_a_killed_fsdp_run_resumes_on_both_ranks(tmp_path: Path, tiny_model_dir: Path) -> None:
    job_spec = spec(tiny_model_dir, 1, distributed={"strategy": "FSDP"})
    (tmp_path / "ref").mkdir()
    reference = run(tmp_path / "ref", "fsdp-ref", job_spec, 2)
    fault = {"KUBETUNE_FAULT": "KILL@checkpoint-committed:2"}
    killed = kubetune_run(tmp_path, "killed", job_spec, 2, **fault)
    assert killed.returncode == 42, killed.stderr[-3000:]  # InfrastructureError: retried
    resumed = run(tmp_path, "killed", job_spec, 2)
    assert len(losses(resumed)) == 4  # every step logged once
    assert_same_training(resumed, reference, BF16_LOSS_TOLERANCE, BF16_ADAPTER_TOLERANCE)
