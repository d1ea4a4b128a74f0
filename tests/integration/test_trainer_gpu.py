"""On a GPU: QLoRA (bitsandbytes NF4 kernels) and LoRA in bf16 through the pipeline, with
peak memory recorded. Skipped on machines without CUDA (marker `gpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.contract import Reason, TrainerConfig
from kubetune.trainer.pipeline import run_pipeline


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["QLoRA", "LoRA"])
def test_gpu_training_records_peak_memory(
    tmp_path: Path, tiny_model_dir: Path, method: str
) -> None:
    import json

    config = TrainerConfig.model_validate(
        {
            "run": {
                "namespace": "gpu",
                "jobName": "t",
                "runId": "r1",
                "outputUri": str(tmp_path / "out"),
            },
            "spec": {
                "model": {"uri": str(tiny_model_dir)},
                "dataset": {
                    "uri": "builtin://quickstart",
                    "maxExamples": 40,
                    "validation": {"count": 8},
                },
                "method": method,
                "training": {
                    "maxSteps": 3,
                    "batchSize": 4,
                    "maxSeqLength": 128,
                    "precision": "BF16",
                },
                "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4},
            },
        }
    )
    result = run_pipeline(config, work_dir=tmp_path / "work", log=print)
    assert result.reason == Reason.SUCCEEDED
    manifest = json.loads((Path(result.run_uri or "") / "manifest.json").read_text())
    assert manifest["metrics"]["training"]["peak_memory_allocated_gib"] > 0
