"""A run publishes to S3 over real HTTP (moto on 127.0.0.1): data, adapter, evaluation and
a manifest that verifies against the bucket's objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import moto.server as moto_server
import pytest
from botocore.config import Config

from kubetune.api.contract import Reason, TrainerConfig
from kubetune.storage import RunLayout, open_store
from kubetune.storage.manifest import verify_run
from kubetune.trainer.pipeline import run_pipeline


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(key, value)
    config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required")
    boto3.client("s3", endpoint_url=endpoint, config=config).create_bucket(Bucket="artifacts")
    try:
        yield "s3://artifacts/kubetune"
    finally:
        server.stop()


def test_run_publishes_to_s3(bucket: str, tmp_path: Path, tiny_model_dir: Path) -> None:
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
                "export": {"merge": True},
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
        "data/train.jsonl",
    } <= paths
    # Checkpoints were committed to the bucket too (and are not part of the manifest).
    assert store.exists(layout.key(layout.checkpoint(2) + "COMMITTED"))
