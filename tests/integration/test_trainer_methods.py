"""Every fine-tuning method through the real pipeline, on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kubetune.api.contract import Reason, TrainerConfig
from kubetune.storage import RunLayout, open_store
from kubetune.storage.manifest import verify_run
from kubetune.trainer.pipeline import run_pipeline


def job_spec(model: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": str(model)},
        "dataset": {"uri": "builtin://quickstart", "maxExamples": 48, "validation": {"count": 8}},
        "method": "LoRA",
        "training": {
            "maxSteps": 3,
            "batchSize": 4,
            "maxSeqLength": 128,
            "logEverySteps": 1,
            "checkpoint": {"everySteps": 2},
        },
        "evaluation": {
            "metrics": ["Perplexity", "ExactMatch", "ROUGE"],
            "maxSamples": 4,
            "generation": {"maxNewTokens": 8},
        },
    }
    spec.update(overrides)
    return spec


def config(tmp_path: Path, spec: dict[str, Any], name: str = "t") -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "run": {
                "namespace": "test",
                "jobName": name,
                "runId": "r1",
                "outputUri": str(tmp_path / "out"),
            },
            "spec": spec,
            "metricsPort": 0,
        }
    )


def run(tmp_path: Path, spec: dict[str, Any], name: str = "t") -> tuple[Any, RunLayout]:
    cfg = config(tmp_path, spec, name)
    result = run_pipeline(cfg, work_dir=tmp_path / f"work-{name}", log=lambda _: None)
    layout = RunLayout(str(tmp_path / "out"), "test", name, "r1")
    return result, layout


@pytest.mark.parametrize(
    ("method", "extra", "folder", "weights"),
    [
        (
            "LoRA",
            {"lora": {"rank": 4, "alpha": 8}, "export": {"merge": True}},
            "adapter",
            "adapter_model.safetensors",
        ),
        (
            "LoRA",
            {"lora": {"rank": 4, "useDoRA": True, "useRSLoRA": True}},
            "adapter",
            "adapter_model.safetensors",
        ),
        (
            "QLoRA",
            {"lora": {"rank": 4}, "qlora": {"computeDtype": "FP32"}},
            "adapter",
            "adapter_model.safetensors",
        ),
        (
            "Full",
            {
                "training": {
                    "maxSteps": 3,
                    "batchSize": 4,
                    "maxSeqLength": 128,
                    "learningRate": "1e-4",
                    "logEverySteps": 1,
                }
            },
            "merged",
            "model.safetensors",
        ),
        (
            "PrefixTuning",
            {"prefixTuning": {"numVirtualTokens": 4}},
            "adapter",
            "adapter_model.safetensors",
        ),
        (
            "PromptTuning",
            {
                "promptTuning": {
                    "numVirtualTokens": 4,
                    "init": "Text",
                    "initText": "Convert the date",
                }
            },
            "adapter",
            "adapter_model.safetensors",
        ),
    ],
    ids=["lora-merge", "dora-rslora", "qlora-cpu", "full", "prefix", "prompt"],
)
def test_method_trains_and_publishes(
    tmp_path: Path,
    tiny_model_dir: Path,
    method: str,
    extra: dict[str, Any],
    folder: str,
    weights: str,
) -> None:
    spec = job_spec(tiny_model_dir, method=method, **extra)
    result, layout = run(tmp_path, spec)
    assert result.reason == Reason.SUCCEEDED, result.message
    assert result.step == 3
    store = open_store(layout.output_uri)
    manifest = verify_run(store, layout)
    paths = {f.path for f in manifest.files}
    assert f"{folder}/{weights}" in paths
    assert {
        "data/train.jsonl",
        "eval/metrics.json",
        "eval/samples.jsonl",
        "logs/train.jsonl",
    } <= paths
    assert not any(p.startswith("checkpoints/") for p in paths)
    if spec.get("export", {}).get("merge"):
        assert "merged/model.safetensors" in paths
        merged = load_file(Path(layout.run_uri) / "merged" / "model.safetensors")
        assert not any("lora" in name for name in merged)
    metrics = json.loads((Path(layout.run_uri) / "eval" / "metrics.json").read_text())
    assert set(metrics["tuned"]) >= {"EvalLoss", "Perplexity", "ExactMatch", "ROUGEL"}
    log = [
        json.loads(line)
        for line in (Path(layout.run_uri) / "logs" / "train.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log if "loss" in r][:3] == [1, 2, 3]


def test_tensorboard_events_are_published(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = job_spec(tiny_model_dir, tracking={"tensorBoard": {"enabled": True}})
    result, layout = run(tmp_path, spec)
    assert result.reason == Reason.SUCCEEDED
    manifest = verify_run(open_store(layout.output_uri), layout)
    assert any(f.path.startswith("tensorboard/") and "tfevents" in f.path for f in manifest.files)


def test_gate_failure_still_publishes(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = job_spec(tiny_model_dir)
    spec["evaluation"]["gate"] = [{"metric": "ExactMatch", "operator": ">=", "value": "0.99"}]
    result, layout = run(tmp_path, spec)
    assert result.reason == Reason.EVALUATION_GATE_FAILED
    assert result.gate_passed is False
    assert "ExactMatch" in result.message
    manifest = verify_run(open_store(layout.output_uri), layout)
    assert manifest.lineage["gatePassed"] is False


def test_a_complete_run_is_not_repeated(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = job_spec(tiny_model_dir)
    first, _ = run(tmp_path, spec)
    again, _ = run(tmp_path, spec)
    assert again.manifest_digest == first.manifest_digest
    assert again.message == "the run was already complete"


def test_unavailable_features_are_refused_before_any_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    spec = job_spec(tiny_model_dir, stages=[{"type": "SFT"}, {"type": "ORPO"}])
    with pytest.raises(Exception, match="ORPO are not available") as info:
        run(tmp_path, spec)
    assert getattr(info.value, "reason", None) == Reason.INVALID_SPEC
    assert not (tmp_path / "out").exists()


def test_mlflow_run_records_the_training_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    from support.mlflow_server import mlflow_server

    with mlflow_server(tmp_path / "mlflow") as url:
        tracking = {"mlflow": {"trackingUri": url, "experimentName": "kubetune-test"}}
        result, _ = run(tmp_path, job_spec(tiny_model_dir, tracking=tracking))
        assert result.reason == Reason.SUCCEEDED
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("kubetune-test")
        assert experiment is not None
        (logged,) = client.search_runs([experiment.experiment_id])
        history = client.get_metric_history(logged.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3]
        assert logged.data.params["learning_rate"]
