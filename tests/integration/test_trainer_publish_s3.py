"""A run publishes to S3 over real HTTP (moto on 127.0.0.1): data, adapter, merged and
quantized weights, evaluation files, the report and a manifest that verifies against the
bucket's objects; `kubetune report` reads it back from the bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api.contract import Reason, TrainerConfig
from kubetune.cli import main
from kubetune.storage import RunLayout, open_store
from kubetune.storage.manifest import verify_run
from kubetune.trainer.pipeline import run_pipeline
from support.s3 import moto_s3, s3_client, use_fake_aws


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    with moto_s3() as endpoint:
        use_fake_aws(monkeypatch, tmp_path, endpoint)
        s3_client(endpoint).create_bucket(Bucket="artifacts")
        yield "s3://artifacts/kubetune"


def test_run_publishes_to_s3(
    bucket: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = TrainerConfig.model_validate(
        {
            "run": {
                "namespace": "team",
                "jobName": "s3-job",
                "runId": "abc123",
                "outputUri": bucket,
            },
            "spec": {
                "model": {"uri": str(tiny_model_dir)},
                "dataset": {
                    "uri": "builtin://quickstart",
                    "maxExamples": 40,
                    "validation": {"count": 8},
                },
                "training": {
                    "maxSteps": 2,
                    "batchSize": 4,
                    "maxSeqLength": 128,
                    "checkpoint": {"everySteps": 1},
                },
                "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4},
                "export": {"merge": True, "quantize": ["FP8"]},
            },
        }
    )
    result = run_pipeline(config, work_dir=tmp_path / "work", log=lambda _: None)
    assert result.reason == Reason.SUCCEEDED
    assert result.run_uri == "s3://artifacts/kubetune/team/s3-job/abc123"
    layout = RunLayout(bucket, "team", "s3-job", "abc123")
    store = open_store(bucket)
    manifest = verify_run(store, layout)
    assert manifest.digest == result.manifest_digest
    paths = {f.path for f in manifest.files}
    assert {
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "quantized/FP8/config.json",
        "data/train.jsonl",
        "eval/metrics.json",
        "eval/report.html",
    } <= paths
    # Checkpoints were committed to the bucket too (and are not part of the manifest).
    assert store.exists(layout.key(layout.checkpoint(2) + "COMMITTED"))

    # The report of a run in S3: read back over HTTP, written locally, the bucket untouched.
    before = {o.key: o.size for o in store.list(layout.prefix)}
    monkeypatch.chdir(tmp_path)
    assert main(["report", result.run_uri or ""]) == 0
    out = capsys.readouterr().out
    assert "quantized/FP8" in out
    assert "published with the run" in out
    assert (tmp_path / "report-abc123.html").read_text().startswith("<!DOCTYPE html>")
    assert {o.key: o.size for o in store.list(layout.prefix)} == before
