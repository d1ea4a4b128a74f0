"""SFT → RewardModel → RLHF in one job on a tiny random model (PPO, RLOO, GRPO), KTO after
SFT, and a job killed inside its RLHF stage resuming there."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.contract import Reason, TrainerConfig
from kubetune.storage import RunLayout, open_store
from kubetune.storage.checkpoints import checkpoint_steps
from kubetune.storage.manifest import verify_run
from kubetune.trainer.pipeline import run_pipeline
from support.trainer_process import run_trainer

PREFERENCE = {
    "uri": "builtin://quickstart-preference",
    "maxExamples": 40,
    "validation": {"count": 8},
}


def rlhf_spec(model: Path, algorithm: str = "PPO", rlhf_steps: int = 4) -> dict[str, Any]:
    return {
        "model": {"uri": str(model)},
        "dataset": {"uri": "builtin://quickstart", "maxExamples": 32, "validation": {"count": 8}},
        "method": "LoRA",
        "lora": {"rank": 8, "alpha": 16},
        "stages": [
            {"type": "SFT"},
            {"type": "RewardModel", "dataset": PREFERENCE, "training": {"maxSteps": 4}},
            {
                "type": "RLHF",
                "dataset": PREFERENCE,
                "training": {"maxSteps": rlhf_steps, "batchSize": 2, "learningRate": "1e-3"},
            },
        ],
        "alignment": {
            "rewardModel": {"evalFraction": "0.2"},
            "rlhf": {
                "algorithm": algorithm,
                "numGenerations": 2,
                "generation": {"maxNewTokens": 6},
            },
        },
        "training": {
            "maxSteps": 2,
            "batchSize": 4,
            "maxSeqLength": 128,
            "logEverySteps": 1,
            "learningRate": "1e-3",
            "checkpoint": {"everySteps": 2, "keep": 2},
        },
        "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4},
    }


def config(output: Path, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {"namespace": "test", "jobName": "rlhf", "runId": "r1", "outputUri": str(output)},
        "spec": spec,
    }


def records(output: Path, stage: str) -> list[dict[str, Any]]:
    log = output / "test" / "rlhf" / "r1" / "logs" / "train.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in lines if r["stage"] == stage]


def test_sft_reward_model_ppo_chain(tmp_path: Path, tiny_model_dir: Path) -> None:
    output = tmp_path / "out"
    cfg = TrainerConfig.model_validate(config(output, rlhf_spec(tiny_model_dir)))
    logs: list[str] = []
    result = run_pipeline(cfg, work_dir=tmp_path / "work", log=logs.append)
    assert result.reason == Reason.SUCCEEDED, result.message
    layout = RunLayout(str(output), "test", "rlhf", "r1")
    store = open_store(str(output))
    manifest = verify_run(store, layout)
    paths = {f.path for f in manifest.files}
    # The reward model is published (merged, safetensors) and listed in the manifest.
    assert {"reward-model/config.json", "reward-model/model.safetensors"} <= paths
    config_json = json.loads((output / "test/rlhf/r1/reward-model/config.json").read_text())
    assert config_json["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config_json["id2label"]) == 1  # one output: the reward
    stages = manifest.metrics["stages"]
    assert [s["name"] for s in stages] == ["0-sft", "1-rewardmodel", "2-rlhf"]
    reward = stages[1]["metrics"]
    assert {"eval_accuracy_before", "eval_accuracy_after", "train_pairs"} <= set(reward)
    ppo = stages[2]["metrics"]
    assert {"score", "kl", "value_loss", "policy_loss", "initial_score"} <= set(ppo)
    assert stages[2]["steps"] == 4
    assert sorted(checkpoint_steps(store, layout.for_stage(2, "RLHF"))) == [2, 4]
    steps = [r["step"] for r in records(output, "RLHF")]
    assert steps == [1, 2, 3, 4]
    # The reference is the policy as it entered the stage (the SFT adapter, frozen), not
    # the base: before the first update the two agree exactly.
    assert records(output, "RLHF")[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert stages[2]["metrics"]["algorithm"] == "PPO"
    assert all({"score", "kl", "value_loss"} <= set(r) for r in records(output, "RLHF"))
    assert any(line.startswith("PPO step 4/4") for line in logs)
    assert any("RewardModel after 4 steps" in line for line in logs)


@pytest.mark.parametrize("algorithm", ["RLOO", "GRPO"])
def test_rloo_and_grpo_log_reward_and_kl(
    tmp_path: Path, tiny_model_dir: Path, algorithm: str
) -> None:
    spec = rlhf_spec(tiny_model_dir, algorithm, rlhf_steps=2)
    spec["stages"] = spec["stages"][1:]  # RewardModel then RLHF, from the base model
    output = tmp_path / "out"
    cfg = TrainerConfig.model_validate(config(output, spec))
    result = run_pipeline(cfg, work_dir=tmp_path / "work", log=lambda _: None)
    assert result.reason == Reason.SUCCEEDED, result.message
    rlhf = records(output, "RLHF")
    assert [r["step"] for r in rlhf if "reward" in r] == [1, 2]
    assert all("kl" in r for r in rlhf if "reward" in r)
    manifest = verify_run(open_store(str(output)), RunLayout(str(output), "test", "rlhf", "r1"))
    # TRL's frozen reference adapter is not part of the published policy.
    assert not any(f.path.startswith("adapter/ref/") for f in manifest.files)


def test_rlhf_refuses_a_single_generation_for_grpo(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = rlhf_spec(tiny_model_dir, "GRPO")
    spec["alignment"]["rlhf"]["numGenerations"] = 1
    cfg = TrainerConfig.model_validate(config(tmp_path / "out", spec))
    with pytest.raises(Exception, match="numGenerations is 1") as info:
        run_pipeline(cfg, work_dir=tmp_path / "work", log=lambda _: None)
    assert getattr(info.value, "reason", None) == Reason.INVALID_SPEC


def test_sft_then_kto(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = rlhf_spec(tiny_model_dir)
    spec["stages"] = [
        {"type": "SFT"},
        {"type": "KTO", "dataset": PREFERENCE, "training": {"maxSteps": 3}},
    ]
    spec["alignment"] = {"kto": {"beta": "0.1"}}
    output = tmp_path / "out"
    cfg = TrainerConfig.model_validate(config(output, spec))
    result = run_pipeline(cfg, work_dir=tmp_path / "work", log=lambda _: None)
    assert result.reason == Reason.SUCCEEDED, result.message
    kto = [r for r in records(output, "KTO") if "loss" in r]
    assert [r["step"] for r in kto] == [1, 2, 3]
    assert any("kl" in r for r in kto)


def test_a_job_killed_in_rlhf_resumes_there(tmp_path: Path, tiny_model_dir: Path) -> None:
    output = tmp_path / "out"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(output, rlhf_spec(tiny_model_dir))))
    code, _ = run_trainer(path, tmp_path / "work1", fault="KILL@RLHF.checkpoint-committed:2")
    assert code == -signal.SIGKILL
    layout = RunLayout(str(output), "test", "rlhf", "r1")
    store = open_store(str(output))
    assert store.exists(layout.key("checkpoints/1-rewardmodel/COMPLETE.json"))
    assert not store.exists(layout.key("checkpoints/2-rlhf/COMPLETE.json"))
    code, result = run_trainer(path, tmp_path / "work2")
    assert code == 0, result
    assert result["resumedFromStep"] == 2
    # Each stage's steps appear once: nothing before the RLHF checkpoint was trained again.
    assert [r["step"] for r in records(output, "SFT") if "loss" in r] == [1, 2]
    assert [r["step"] for r in records(output, "RewardModel") if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records(output, "RLHF")] == [1, 2, 3, 4]
