"""`kubetune fetch MODEL_URI DIR --model`: the base model of LoRA adapters for the serving
pod's init container, resolved as the trainer resolves it and linked as DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.cli import main
from support.s3 import moto_s3, s3_client, use_fake_aws


def test_s3_model_is_resolved_and_linked(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with moto_s3() as endpoint:
        use_fake_aws(monkeypatch, tmp_path, endpoint)
        client = s3_client(endpoint)
        client.create_bucket(Bucket="models")
        for path in sorted(tiny_model_dir.iterdir()):
            if path.is_file():
                client.upload_file(str(path), "models", f"base/tiny/{path.name}")
        target = tmp_path / "models" / "base"
        assert main(["fetch", "s3://models/base/tiny", str(target), "--model"]) == 0
        assert capsys.readouterr().out.strip().endswith(str(target))
        assert target.is_symlink()
        assert not os.path.isabs(os.readlink(target))  # valid wherever the volume is mounted
        assert (target / "config.json").read_bytes() == (
            tiny_model_dir / "config.json"
        ).read_bytes()
        assert any(target.glob("*.safetensors"))
        # A second fetch (a restarted pod) finds the link in place.
        assert main(["fetch", "s3://models/base/tiny", str(target), "--model"]) == 0
        assert "already links" in capsys.readouterr().err


def test_pickle_only_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "pytorch_model.bin").write_bytes(b"not safetensors")
    code = main(["fetch", str(model), str(tmp_path / "models" / "base"), "--model"])
    assert code != 0
    assert "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "models" / "base").exists()


def test_revision_without_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "s3://b/ns/job/run", "/tmp/x", "--revision", "abc"]) == 2
    assert "--revision applies to --model only" in capsys.readouterr().err
