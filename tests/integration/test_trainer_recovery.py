"""A trainer killed mid-run resumes from its last committed checkpoint and ends with the
same weights as an uninterrupted run; a corrupted checkpoint is refused; SIGTERM saves a
checkpoint and exits with the preemption code; failures still write a result."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from kubetune.api.contract import Reason, exit_code_for
from kubetune.storage import RunLayout, open_store
from kubetune.storage.checkpoints import checkpoint_steps
from support.trainer_process import run_trainer

REPO = Path(__file__).parents[2]


def write_config(tmp_path: Path, model: Path, output: Path, **training: Any) -> Path:
    spec = {
        "model": {"uri": str(model)},
        "dataset": {"uri": "builtin://quickstart", "maxExamples": 64, "validation": {"count": 8}},
        "method": "LoRA",
        "lora": {"rank": 4, "alpha": 8, "dropout": "0.1"},
        "training": {
            "maxSteps": 8,
            "batchSize": 4,
            "maxSeqLength": 128,
            "logEverySteps": 1,
            "checkpoint": {"everySteps": 2, "keep": 2},
            **training,
        },
        "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4},
    }
    config = {
        "run": {"namespace": "test", "jobName": "recover", "runId": "r1", "outputUri": str(output)},
        "spec": spec,
        "metricsPort": 0,
    }
    path = tmp_path / f"config-{output.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def adapter(output: Path) -> dict[str, Any]:
    return load_file(output / "test" / "recover" / "r1" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("reference")
    code, result = run_trainer(write_config(tmp, tiny_model_dir, tmp / "out"), tmp / "work")
    assert code == 0, result
    return {"weights": adapter(tmp / "out"), "result": result}


def test_kill_after_a_checkpoint_resumes_to_identical_weights(
    tmp_path: Path, tiny_model_dir: Path, reference: dict[str, Any]
) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, output)
    code, _ = run_trainer(config, tmp_path / "work1", fault="KILL@checkpoint-committed:4")
    assert code == -signal.SIGKILL
    layout = RunLayout(str(output), "test", "recover", "r1")
    assert sorted(checkpoint_steps(open_store(str(output)), layout)) == [2, 4]
    assert not (output / "test" / "recover" / "r1" / "manifest.json").exists()
    code, result = run_trainer(config, tmp_path / "work2")
    assert code == 0, result
    assert result["resumedFromStep"] == 4
    assert result["step"] == 8
    weights = adapter(output)
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in weights.items():
        assert tensor.equal(reference["weights"][name]), name
    assert result["metrics"] == reference["result"]["metrics"]


def test_corrupted_checkpoint_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, output)
    code, _ = run_trainer(config, tmp_path / "work1", fault="KILL@checkpoint-committed:4")
    assert code == -signal.SIGKILL
    newest = output / "test" / "recover" / "r1" / "checkpoints" / "step-000004"
    weights = newest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    code, result = run_trainer(config, tmp_path / "work2")
    assert code == 0, result
    assert result["resumedFromStep"] == 2


def test_sigterm_saves_a_checkpoint_and_exits_as_preempted(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, output, checkpoint={"everySteps": 100})
    code, result = run_trainer(config, tmp_path / "work1", fault="TERM@step-end:3")
    assert code == exit_code_for(Reason.PREEMPTED)
    assert result["reason"] == "Preempted"
    layout = RunLayout(str(output), "test", "recover", "r1")
    assert sorted(checkpoint_steps(open_store(str(output)), layout)) == [3]
    code, result = run_trainer(config, tmp_path / "work2")
    assert code == 0
    assert result["resumedFromStep"] == 3


def test_a_user_error_writes_its_result_and_exit_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "out")
    text = config.read_text().replace("builtin://quickstart", str(tmp_path / "missing.jsonl"))
    config.write_text(text)
    code, result = run_trainer(config, tmp_path / "work")
    assert code == exit_code_for(Reason.SOURCE_NOT_FOUND)
    assert result["reason"] == "SourceNotFound"
    assert "missing.jsonl" in result["message"]


def test_an_invalid_config_is_refused_before_torch(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"run": {}, "spec": {}, "surprise": 1}))
    code, result = run_trainer(config, tmp_path / "work")
    assert code == exit_code_for(Reason.INVALID_SPEC)
    assert result["reason"] == "InvalidSpec"
    assert "surprise" in result["message"]
