"""BERTScore with its embedding model in S3 (moto over real HTTP): fetched into the model
cache, checked like any model, and scoring as the built-in copy does."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.v1alpha1.evaluation import BERTScoreSpec
from kubetune.trainer.scoring.bertscore import bert_score, builtin_model_path
from support.s3 import moto_s3, s3_client, use_fake_aws


def test_bertscore_model_from_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    local = builtin_model_path("builtin://all-minilm-l6-v2")
    with moto_s3() as endpoint:
        use_fake_aws(monkeypatch, tmp_path, endpoint)
        client = s3_client(endpoint)
        client.create_bucket(Bucket="models")
        for path in local.rglob("*"):
            if path.is_file():
                key = f"minilm/{path.relative_to(local).as_posix()}"
                client.upload_file(str(path), "models", key)
        predictions = ["2031-04-08", "The date is April 8, 2031."]
        references = ["2031-04-08", "2031-04-08"]
        from_s3 = bert_score(
            predictions,
            references,
            BERTScoreSpec(model_uri="s3://models/minilm"),
            log=lambda _: None,
            cache_dir=tmp_path / "cache",
        )
    builtin = bert_score(predictions, references, None, log=lambda _: None)
    assert from_s3 == pytest.approx(builtin)
    assert from_s3["BERTScoreF1"] < 1.0  # the second answer differs from its reference
    assert any((tmp_path / "cache").iterdir())  # fetched once into the cache
