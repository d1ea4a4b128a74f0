"""Chained stages on a tiny random model: SFT then DPO in one job, each stage with its own
data, checkpoints and log; DPO raises the chosen-minus-rejected margin; a job killed in
its second stage resumes there."""

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


def chain_spec(model: Path, dpo_steps: int = 6, **dpo: Any) -> dict[str, Any]:
    return {
        "model": {"uri": str(model)},
        "dataset": {"uri": "builtin://quickstart", "maxExamples": 48, "validation": {"count": 8}},
        "method": "LoRA",
        "lora": {"rank": 8, "alpha": 16},
        "stages": [
            {"type": "SFT"},
            {
                "type": "DPO",
                "dataset": {
                    "uri": "builtin://quickstart-preference",
                    "maxExamples": 40,
                    "validation": {"count": 8},
                },
                "training": {"maxSteps": dpo_steps, "learningRate": "5e-3"},
            },
        ],
        "alignment": {"dpo": {"beta": "0.1", **dpo}},
        "training": {
            "maxSteps": 3,
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
        "run": {"namespace": "test", "jobName": "chain", "runId": "r1", "outputUri": str(output)},
        "spec": spec,
    }


def records(path: Path, stage: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if r["stage"] == stage]


def test_sft_then_dpo_raises_the_preference_margin(tmp_path: Path, tiny_model_dir: Path) -> None:
    output = tmp_path / "out"
    cfg = TrainerConfig.model_validate(config(output, chain_spec(tiny_model_dir)))
    logs: list[str] = []
    result = run_pipeline(cfg, work_dir=tmp_path / "work", log=logs.append)
    assert result.reason == Reason.SUCCEEDED, result.message
    layout = RunLayout(str(output), "test", "chain", "r1")
    store = open_store(str(output))
    manifest = verify_run(store, layout)
    paths = {f.path for f in manifest.files}
    assert {"data/1-dpo/train.jsonl", "data/1-dpo/report.json", "logs/train.jsonl"} <= paths
    # The adapter is the policy alone: TRL's frozen reference copy is not published.
    assert "adapter/ref/adapter_config.json" not in paths
    assert manifest.lineage["stages"] == ["SFT", "DPO"]
    stages = manifest.metrics["stages"]
    assert [s["name"] for s in stages] == ["0-sft", "1-dpo"]
    assert stages[1]["steps"] == 6
    # Each stage has its own checkpoints, and a completion record.
    assert sorted(checkpoint_steps(store, layout)) == [2, 3]
    assert sorted(checkpoint_steps(store, layout.for_stage(1, "DPO"))) == [4, 6]
    assert store.exists(layout.key("checkpoints/1-dpo/COMPLETE.json"))

    log = output / "test" / "chain" / "r1" / "logs" / "train.jsonl"
    dpo = [r for r in records(log, "DPO") if "rewards/margins" in r]
    assert [r["step"] for r in dpo] == [1, 2, 3, 4, 5, 6]
    # Step 1: the policy is the reference, so the margin starts at 0 and then grows.
    assert abs(dpo[0]["rewards/margins"]) < 1e-4
    assert dpo[-1]["rewards/margins"] > 0.05
    assert sum(r["rewards/margins"] for r in dpo[-2:]) > sum(r["rewards/margins"] for r in dpo[:2])
    assert any("eval_rewards/accuracies" in r for r in records(log, "DPO"))
    assert any("Stage 1-dpo: DPO" in line for line in logs)
    # The default packing: each batch's chosen and rejected answers in one row.
    assert any(line.startswith("DPO batches: packed") for line in logs), logs
    assert_preflight_bounds_what_trl_tokenizes(cfg, store, layout, tiny_model_dir, tmp_path)


def assert_preflight_bounds_what_trl_tokenizes(
    cfg: TrainerConfig, store: Any, layout: RunLayout, model_dir: Path, tmp_path: Path
) -> None:
    """The memory preflight sizes the DPO stage by the token counts of its prepared data;
    every sequence TRL builds from those rows fits the count it relies on."""
    from transformers import AutoTokenizer

    from kubetune.calc.preflight import SEQUENCE_MARGIN
    from kubetune.trainer import pipeline
    from kubetune.trainer.dpo import preference_rows
    from kubetune.trainer.stages import StageData

    train = tmp_path / "dpo-train.jsonl"
    train.write_bytes(store.get_bytes(layout.key("data/1-dpo/train.jsonl")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    counts = [json.loads(line) for line in train.read_text().splitlines()]
    for row, counted in zip(preference_rows(train), counts, strict=True):
        for side in ("chosen", "rejected"):
            # TRL's DPO tokenization: the chat template over prompt + answer
            ids = tokenizer.apply_chat_template(row["prompt"] + row[side], return_dict=False)
            assert len(ids) <= counted[f"{side}Tokens"] + SEQUENCE_MARGIN
            lengths.append(min(len(ids), 128))
    data = [StageData(train, train, "preference")] * 2
    bounds = pipeline._data_tokens(cfg.spec, data, "sdpa")
    assert list(bounds) == [1]  # the DPO stage only
    pairs = [a + b for a, b in zip(lengths[::2], lengths[1::2], strict=True)]
    assert sum(sorted(pairs)[-4:]) <= bounds[1] < 4 * 2 * 128
    padded = pipeline._data_tokens(cfg.spec, data, "eager")[1]
    assert 4 * 2 * max(lengths) <= padded <= 4 * 2 * 128


def test_dpo_stage_refuses_conversation_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = chain_spec(tiny_model_dir)
    del spec["stages"][1]["dataset"]  # DPO would train on spec.dataset: conversations
    cfg = TrainerConfig.model_validate(config(tmp_path / "out", spec))
    with pytest.raises(Exception, match="stage DPO trains on preference data") as info:
        run_pipeline(cfg, work_dir=tmp_path / "work", log=lambda _: None)
    assert getattr(info.value, "reason", None) == Reason.DATASET_INVALID
    # Refused before any training: no checkpoint was written.
    assert not (tmp_path / "out" / "test" / "chain" / "r1" / "checkpoints").exists()


def test_unavailable_stages_are_refused_before_any_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    spec = chain_spec(tiny_model_dir)
    spec["stages"] = [{"type": "SFT"}, {"type": "ORPO"}, {"type": "SimPO"}]
    del spec["alignment"]
    cfg = TrainerConfig.model_validate(config(tmp_path / "out", spec))
    with pytest.raises(Exception, match="ORPO, SimPO are not available") as info:
        run_pipeline(cfg, work_dir=tmp_path / "work", log=lambda _: None)
    assert getattr(info.value, "reason", None) == Reason.INVALID_SPEC
    assert "experimental" in str(info.value)
    assert "use DPO" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_chain_killed_in_its_second_stage_resumes_there(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    output = tmp_path / "out"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(output, chain_spec(tiny_model_dir))))
    code, _ = run_trainer(path, tmp_path / "work1", fault="KILL@DPO.checkpoint-committed:4")
    assert code == -signal.SIGKILL
    store = open_store(str(output))
    layout = RunLayout(str(output), "test", "chain", "r1")
    assert store.exists(layout.key("checkpoints/COMPLETE.json"))  # SFT finished
    assert not store.exists(layout.key("checkpoints/1-dpo/COMPLETE.json"))
    code, result = run_trainer(path, tmp_path / "work2")
    assert code == 0, result
    assert result["resumedFromStep"] == 4  # inside DPO, not from the start of the chain
    assert result["step"] == 6
    # The log carried over from the first pod: SFT's steps once each (it was not trained
    # again), DPO's steps up to the checkpoint from the first pod and the rest from the second.
    log = output / "test" / "chain" / "r1" / "logs" / "train.jsonl"
    sft_steps = [r["step"] for r in records(log, "SFT") if "loss" in r]
    assert sft_steps == [1, 2, 3]
    dpo_steps = [r["step"] for r in records(log, "DPO") if "loss" in r]
    assert dpo_steps == [1, 2, 3, 4, 5, 6]
