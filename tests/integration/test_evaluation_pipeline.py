"""Evaluation and export through the real pipeline on a tiny random model: every metric
family, the judge against a scripted OpenAI-compatible server, suites, a separate
evaluation set, the gate, quantized variants, the report and the lineage."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import JUDGE_API_KEY_ENV, Reason, TrainerConfig
from kubetune.storage import RunLayout, open_store
from kubetune.storage.manifest import verify_run
from kubetune.trainer.pipeline import run_pipeline
from support.openai_server import OpenAIServer

SECRET = "sk-test-never-logged"


def judge_reply(body: dict[str, Any]) -> str:
    """A deterministic judge: an answer containing the reference scores 9, else 3;
    pairwise prefers the answer that contains the reference."""
    system = body["messages"][0]["content"]
    user = body["messages"][-1]["content"]
    reference = re.search(r"\[Reference answer\]\n(.*?)\n\[End", user, re.S)
    ref = reference.group(1).strip() if reference else ""
    if "Verdict" in system:
        a = re.search(r"\[Answer A\]\n(.*?)\n\[End", user, re.S)
        b = re.search(r"\[Answer B\]\n(.*?)\n\[End", user, re.S)
        a_ok = bool(a and ref and ref in a.group(1))
        b_ok = bool(b and ref and ref in b.group(1))
        verdict = "A" if a_ok and not b_ok else "B" if b_ok and not a_ok else "tie"
        return f"Both answers considered.\nVerdict: {verdict}"
    answer = re.search(r"\[Answer\]\n(.*?)\n\[End", user, re.S)
    score = 9 if answer and ref and ref in answer.group(1) else 3
    return f"Judged against the reference.\nScore: {score}"


def write_eval_set(path: Path) -> Path:
    rows = [
        {
            "instruction": f"Write the date 2031-01-{d:02d} in ISO 8601.",
            "output": f"2031-01-{d:02d}",
        }
        for d in range(1, 7)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path: Path, spec: dict[str, Any], logs: list[str]) -> tuple[Any, RunLayout]:
    config = TrainerConfig.model_validate(
        {
            "run": {
                "namespace": "test",
                "jobName": "eval",
                "runId": "r1",
                "outputUri": str(tmp_path / "out"),
            },
            "spec": spec,
        }
    )
    result = run_pipeline(config, work_dir=tmp_path / "work", log=logs.append)
    return result, RunLayout(str(tmp_path / "out"), "test", "eval", "r1")


def base_spec(model: Path) -> dict[str, Any]:
    return {
        "model": {"uri": str(model)},
        "dataset": {"uri": "builtin://quickstart", "maxExamples": 40, "validation": {"count": 8}},
        "method": "LoRA",
        "lora": {"rank": 4},
        "training": {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 128, "logEverySteps": 1},
    }


def test_every_metric_family_with_judge_suite_and_eval_set(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(JUDGE_API_KEY_ENV, SECRET)
    logs: list[str] = []
    with OpenAIServer(judge_reply) as server:
        spec = base_spec(tiny_model_dir)
        spec["evaluation"] = {
            "metrics": [
                "Perplexity",
                "ExactMatch",
                "ROUGE",
                "BLEU",
                "BERTScore",
                "Judge",
                "Suite",
                "LMEval",
            ],
            "evalDataset": {"uri": str(write_eval_set(tmp_path / "eval.jsonl"))},
            "maxSamples": 4,
            "generation": {"maxNewTokens": 6},
            "judge": {"endpoint": server.url, "model": "judge-1", "maxConcurrency": 2},
            "suites": [{"name": "dates", "uri": "builtin://quickstart-suite"}],
            "lmEvalTasks": ["hellaswag"],
            "gate": [
                {"metric": "JudgeScore", "operator": ">=", "value": "1"},
                {"metric": "SuiteAccuracy", "operator": ">=", "value": "0"},
                {"metric": "BERTScoreF1", "operator": ">", "value": "-1"},
            ],
        }
        result, layout = run(tmp_path, spec, logs)
        requests = list(server.requests)

    assert result.reason == Reason.SUCCEEDED, result.message
    assert result.gate_passed is True
    store = open_store(layout.output_uri)
    manifest = verify_run(store, layout)
    paths = {f.path for f in manifest.files}
    assert {"eval/metrics.json", "eval/samples.jsonl", "eval/report.html"} <= paths
    assert {"eval/suites.jsonl", "data/eval.jsonl", "data/eval-report.json"} <= paths

    metrics = json.loads(store.get_bytes(layout.key("eval/metrics.json")))
    assert metrics["source"] == "evalDataset"
    assert metrics["examples"] == 4
    for side in ("base", "tuned"):
        values = metrics[side]
        for key in ("Perplexity", "EvalLoss", "ExactMatch", "ROUGEL", "BLEU", "BERTScoreF1"):
            assert key in values, (side, key)
        assert 1 <= values["JudgeScore"] <= 10
        assert 0 <= values["SuiteAccuracy"] <= 1
        assert values["Suite/dates"] == values["SuiteAccuracy"]
    assert 0 <= metrics["tuned"]["JudgeWinRate"] <= 1
    assert metrics["base"]["JudgeWinRate"] == 0.5
    # 4 examples: rubric for tuned and base (8) + both orders of each pair (8).
    assert len(requests) == 16
    assert all(r.headers.get("Authorization") == f"Bearer {SECRET}" for r in requests)
    assert metrics["judge"]["requests"] == 16
    assert metrics["suites"]["dates"]["tuned"]["n"] == 4
    assert metrics["skipped"] == {
        "LMEval/hellaswag": "lm-evaluation-harness (the lm_eval package) is not installed in "
        "the trainer image"
    }
    assert all(g["passed"] for g in metrics["gate"])

    samples = [
        json.loads(line) for line in store.get_bytes(layout.key("eval/samples.jsonl")).splitlines()
    ]
    assert len(samples) == 4
    assert samples[0]["reference"].startswith("2031-01-")
    assert {"base", "tuned", "pairwise"} <= set(samples[0]["judge"])
    assert set(samples[0]["exactMatch"]) == {"base", "tuned"}

    lineage = manifest.lineage
    assert re.fullmatch(r"[0-9a-f]{64}", lineage["specHash"])
    assert lineage["dataset"]["digest"]
    assert lineage["method"] == "LoRA"
    assert lineage["gatePassed"] is True

    html = store.get_bytes(layout.key("eval/report.html")).decode()
    assert "JudgeScore" in html
    assert html.count("<img") >= 3
    everything = "\n".join(logs) + html + json.dumps(metrics) + json.dumps(samples)
    assert SECRET not in everything


def test_a_gate_on_a_metric_that_could_not_be_computed_fails(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    logs: list[str] = []
    with OpenAIServer(lambda _body: "I would rather not say.") as server:
        spec = base_spec(tiny_model_dir)
        spec["evaluation"] = {
            "metrics": ["Judge"],
            "maxSamples": 2,
            "generation": {"maxNewTokens": 4},
            "judge": {"endpoint": server.url, "model": "judge-1", "mode": "Rubric"},
            "gate": [{"metric": "JudgeScore", "operator": ">=", "value": "1"}],
        }
        result, layout = run(tmp_path, spec, logs)
    assert result.reason == Reason.EVALUATION_GATE_FAILED
    assert "JudgeScore = not computed >= 1: FAILED" in result.message
    metrics = json.loads(open_store(layout.output_uri).get_bytes(layout.key("eval/metrics.json")))
    assert metrics["judge"]["rubric"]["tuned"]["unparseable"] == 2
    assert metrics["gate"][0]["value"] is None


def test_quantized_variants_are_published_measured_and_loadable(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    logs: list[str] = []
    spec = base_spec(tiny_model_dir)
    spec["evaluation"] = {"metrics": ["Perplexity"], "maxSamples": 4, "compareBase": False}
    spec["export"] = {"merge": True, "quantize": ["W4A16", "W8A8", "FP8"], "calibrationSamples": 4}
    result, layout = run(tmp_path, spec, logs)
    assert result.reason == Reason.SUCCEEDED, result.message
    store = open_store(layout.output_uri)
    manifest = verify_run(store, layout)
    metrics = json.loads(store.get_bytes(layout.key("eval/metrics.json")))
    # On a CPU the merge is exact (fp32): the merged model scores what base + adapter did.
    assert metrics["merged"]["perplexity"] == pytest.approx(metrics["tuned"]["Perplexity"], 1e-4)
    formats = {"W4A16": "pack-quantized", "W8A8": "int-quantized", "FP8": "float-quantized"}
    for scheme, fmt in formats.items():
        variant = metrics["quantized"][scheme]
        if "skipped" in variant:  # a CPU without fp8 support: said, not hidden
            assert scheme == "FP8"
            assert variant["skipped"]
            continue
        assert variant["format"] == fmt
        assert variant["sizeBytes"] > 0
        assert variant["referencePerplexity"] == metrics["merged"]["perplexity"]
        assert variant["perplexityDelta"] == pytest.approx(
            variant["perplexity"] - metrics["merged"]["perplexity"]
        )
        folder = Path(layout.output_uri) / "test/eval/r1" / f"quantized/{scheme}"
        assert any(f.path == f"quantized/{scheme}/config.json" for f in manifest.files)
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert AutoModelForCausalLM.from_pretrained(folder) is not None
    assert manifest.metrics["quantized"] == metrics["quantized"]
