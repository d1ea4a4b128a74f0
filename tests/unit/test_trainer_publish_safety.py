"""The trainer's last lines of defence: credentials scrubbed from every log record and
failure message, and nothing outside a folder published through a symbolic link."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kubetune.api.contract import Reason
from kubetune.storage import RunLayout
from kubetune.storage.errors import InvalidKey
from kubetune.storage.local import LocalStore
from kubetune.trainer import pipeline, runner

CANARY = "kt-canary-0123456789abcdef01234567"


def test_log_records_and_failures_never_carry_a_credential(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_TOKEN", CANARY)
    logger = logging.getLogger("kubetune.test.redaction")
    caplog.handler.addFilter(runner.RedactingFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("GET https://hub.example/model?token=%s", CANARY)
        logger.info("nothing secret in %s", "this line")
    assert CANARY not in caplog.text
    assert "token=***" in caplog.text
    assert "nothing secret in this line" in caplog.text
    failure = runner._failure(Reason.SOURCE_UNAUTHORIZED, f"401 for Bearer {CANARY}")
    assert CANARY not in failure.message
    assert "Bearer ***" in failure.message


def test_a_link_out_of_the_folder_is_not_published(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("not part of the run")
    store = LocalStore(tmp_path / "store")
    layout = RunLayout(str(tmp_path / "store"), "ns", "job", "r1")
    (folder / "inside.json").symlink_to(folder / "adapter_config.json")
    published = pipeline._upload_folder(store, layout, folder, "adapter/")
    assert sorted(Path(o.key).name for o in published) == ["adapter_config.json", "inside.json"]
    (folder / "escape.txt").symlink_to(secret)
    with pytest.raises(InvalidKey, match="links outside"):
        pipeline._upload_folder(store, layout, folder, "adapter/")
