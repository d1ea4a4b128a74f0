"""`kubetune prepare` on the quickstart example, as a newcomer runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.cli import main

REPO = Path(__file__).parents[2]


def test_prepare_quickstart_writes_data_and_prints_the_run_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_model_dir: Path
) -> None:
    assert (
        main(["prepare", str(REPO / "examples" / "quickstart.yaml"), "--output", str(tmp_path)])
        == 0
    )
    run_uri = capsys.readouterr().out.strip().splitlines()[-1]
    run = Path(run_uri)
    assert run.parent == tmp_path / "local" / "quickstart"
    report = json.loads((run / "data" / "report.json").read_text())
    assert report["counts"]["rows"] == 2000
    assert (
        report["counts"]["train"] + report["counts"]["validation"] + report["counts"]["duplicates"]
        == 2000
    )
    assert (run / "data" / "train.jsonl").stat().st_size > 0
    # The same spec is the same run: the second call reuses the prepared data.
    assert (
        main(["prepare", str(REPO / "examples" / "quickstart.yaml"), "--output", str(tmp_path)])
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == run_uri
    assert "Data already prepared" in captured.err


def test_prepare_refuses_an_invalid_job_with_the_user_error_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text((REPO / "examples" / "quickstart.yaml").read_text().replace("LoRA\n", "Lora\n"))
    assert main(["prepare", str(job), "--output", str(tmp_path)]) == 10
    assert 'spec.method: Unsupported value: "Lora"' in capsys.readouterr().err


def test_prepare_reports_a_missing_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    text = (REPO / "examples" / "quickstart.yaml").read_text()
    job.write_text(text.replace("builtin://quickstart", str(tmp_path / "missing.jsonl")))
    assert main(["prepare", str(job), "--output", str(tmp_path)]) == 13
    assert "no file found" in capsys.readouterr().err
