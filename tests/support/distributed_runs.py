"""Runs of one small job in one or several trainer processes, and the checks that they
trained alike (shared by the CPU and the GPU distributed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

LOSS_TOLERANCE = 2e-3
"""Largest per-step loss difference allowed against the one-process run (fp32 on CPU; the
sums run in a different order)."""
ADAPTER_TOLERANCE = 1e-4


def spec(model: Path, accumulation: int, **extra: Any) -> dict[str, Any]:
    """A LoRA job of 4 steps on 64 quickstart rows; `accumulation` 2 in one process sees
    the same rows per step as 1 in two processes."""
    return {
        "model": {"uri": str(model)},
        "dataset": {"uri": "builtin://quickstart", "maxExamples": 64, "validation": {"count": 8}},
        "method": "LoRA",
        "lora": {"rank": 4, "alpha": 8, "dropout": "0"},
        "training": {
            "maxSteps": 4,
            "batchSize": 4,
            "gradientAccumulationSteps": accumulation,
            "maxSeqLength": 128,
            "logEverySteps": 1,
            "checkpoint": {"everySteps": 2, "keep": 1},
        },
        "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4, "compareBase": False},
        **extra,
    }


def losses(run: Path) -> list[float]:
    lines = (run / "logs" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def adapter(run: Path) -> dict[str, Any]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_training(
    run: Path,
    reference: Path,
    loss_tolerance: float = LOSS_TOLERANCE,
    adapter_tolerance: float = ADAPTER_TOLERANCE,
) -> None:
    ours, theirs = losses(run), losses(reference)
    assert len(ours) == len(theirs) == 4
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < loss_tolerance
    mine, expected = adapter(run), adapter(reference)
    assert mine.keys() == expected.keys()
    assert any(t.abs().max() > 0 for t in expected.values())  # training moved the adapter
    for key, tensor in expected.items():
        assert (mine[key] - tensor).abs().max().item() < adapter_tolerance, key


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBETUNE_FAULT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def kubetune_run(
    tmp: Path, name: str, job_spec: dict[str, Any], processes: int, **env: str
) -> subprocess.CompletedProcess[str]:
    """`kubetune run` of a FineTuneJob named `name` in `processes` processes, output under
    tmp/out; its RUN_URI is the last line of stdout."""
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": job_spec,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    command = [sys.executable, "-m", "kubetune", "run", str(path), "--output", str(tmp / "out")]
    return subprocess.run(
        [*command, "--nproc-per-node", str(processes)],
        env={**environment(), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
