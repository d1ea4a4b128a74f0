"""The quickstart, end to end, as `make demo` runs it: the tuned model must be better at
the task than the base model, and the run must be complete and verifiable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.storage import open_store, parse_run_uri
from kubetune.storage.manifest import verify_run

REPO = Path(__file__).parents[2]


@pytest.mark.slow
def test_quickstart_improves_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_model_dir: Path
) -> None:
    code = main(["run", str(REPO / "examples" / "quickstart.yaml"), "--output", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    run_uri = captured.out.strip().splitlines()[-1]
    layout = parse_run_uri(run_uri)
    manifest = verify_run(open_store(layout.output_uri), layout)
    assert manifest.lineage["gatePassed"] is True
    paths = {f.path for f in manifest.files}
    assert {
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "quantized/W4A16/config.json",
        "eval/report.html",
        "eval/samples.jsonl",
    } <= paths
    metrics = json.loads((Path(run_uri) / "eval" / "metrics.json").read_text())
    base, tuned = metrics["base"], metrics["tuned"]
    assert tuned["EvalLoss"] < base["EvalLoss"]
    assert tuned["ExactMatch"] >= base["ExactMatch"] + 0.3
    assert tuned["ROUGEL"] > base["ROUGEL"]
    assert tuned["BERTScoreF1"] > base["BERTScoreF1"]
    assert tuned["SuiteAccuracy"] >= base["SuiteAccuracy"]
    w4a16 = metrics["quantized"]["W4A16"]
    assert w4a16["format"] == "pack-quantized"
    assert w4a16["sizeBytes"] < metrics["merged"]["sizeBytes"] / 2
    assert abs(w4a16["perplexityDelta"]) < 0.1
    assert "ExactMatch" in captured.err  # the base-vs-tuned table
    assert "gate      passed" in captured.err
    assert "Loading weights" not in captured.err  # no library progress bars in the log
