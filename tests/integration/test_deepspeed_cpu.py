"""Full fine-tuning under DeepSpeed ZeRO, with the trainer's arguments, trains like plain
full fine-tuning: one process on CPUs (DeepSpeed's CPU accelerator, gloo), the same small
Llama, data and seed.

DeepSpeed's own bf16 mode fails this check: it starts the fp32 master weights from
bf16-rounded ones, and its loss lags by 0.017 at step 3 and 0.024 at step 9 here. The
trainer runs fp32 weights under torch autocast instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="the dev environment installs deepspeed (make dev)")
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tests" / "support" / "deepspeed_cpu.py"
LOSS_TOLERANCE = 2e-3
"""Per-step loss difference allowed (measured: under 3e-4; the sums run in another order)."""


def train(tmp: Path, strategy: str, port: int) -> dict[str, object]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "2",
    }
    command = [sys.executable, str(SCRIPT), "--strategy", strategy, "--output", str(tmp)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return train(tmp_path_factory.mktemp("plain"), "None", 29541)


@pytest.mark.parametrize(
    ("strategy", "port"), [("DeepSpeedZeRO2", 29542), ("DeepSpeedZeRO3", 29543)]
)
def test_full_fine_tuning_under_deepspeed_trains_like_one_process(
    tmp_path: Path, plain: dict[str, object], strategy: str, port: int
) -> None:
    zero = train(tmp_path, strategy, port)
    assert zero["parameter_dtypes"] == ["torch.float32"]  # fp32 weights, as on one GPU
    ours, reference = zero["losses"], plain["losses"]
    assert isinstance(ours, list)
    assert isinstance(reference, list)
    assert len(ours) == len(reference) == 9
    assert reference[-1] < reference[0]  # the run trains
    for step, (a, b) in enumerate(zip(ours, reference, strict=True), start=1):
        assert abs(a - b) < LOSS_TOLERANCE, f"step {step}: {a} under {strategy}, {b} plainly"
