"""`kubetune validate` and `kubetune crds` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.api.crd import build_crds
from kubetune.cli import main

BAD = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: typo
spec:
  model:
    uri: builtin://smollm2-135m-instruct
  dataset:
    uri: data.jsonl
  method: Lora
  lora:
    rank: "8"
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_problem_with_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "job.yaml", BAD)
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert f'{path}:10: FineTuneJob/typo: spec.method: Unsupported value: "Lora"' in err
    assert f'{path}:12: FineTuneJob/typo: spec.lora.rank: Invalid value: "string"' in err
    assert "problem(s) in 1 file(s)" in err


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "job.yaml", BAD)
    assert main(["validate", "--json", path]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 1
    assert {(p["line"], p["path"]) for p in report["problems"]} >= {
        (10, "spec.method"),
        (12, "spec.lora.rank"),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("---\n---\n", "the file is empty"),
        ("apiVersion: v1\nkind: ConfigMap\n", "no kubetune manifest"),
        ("spec: [\n", "invalid YAML"),
    ],
    ids=["empty", "only-separators", "no-kubetune-manifest", "broken-yaml"],
)
def test_files_without_a_valid_manifest_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    assert main(["validate", write(tmp_path, "f.yaml", text)]) == 1
    assert expected in capsys.readouterr().err


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "/nonexistent/job.yaml"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_multi_document_file_with_other_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = Path(__file__).parents[2] / "examples" / "modeldeployment-merged.yaml"
    text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n" + good.read_text()
    assert main(["validate", write(tmp_path, "all.yaml", text)]) == 0
    assert "1 manifest(s) valid" in capsys.readouterr().out


def test_wrong_api_version_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BAD.replace("v1alpha1", "v1beta1")
    assert main(["validate", write(tmp_path, "v.yaml", text)]) == 1
    assert 'apiVersion: Unsupported value: "kubetune.io/v1beta1"' in capsys.readouterr().err


def test_crds_prints_both_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == build_crds()


def test_crds_output_dir(tmp_path: Path) -> None:
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kubetune.io_finetunejobs.yaml",
        "kubetune.io_modeldeployments.yaml",
    ]


def test_console_script_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubetune", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("kubetune ")
