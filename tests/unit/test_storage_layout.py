"""Run layout and run identity: the same spec resumes the same run, a changed
hyperparameter starts a new one, and names can never escape the run directory."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.storage.errors import InvalidKey
from kubetune.storage.layout import (
    RunLayout,
    canonical_spec,
    checkpoint_step,
    new_run_id,
    parse_run_uri,
    run_id_for,
)

BASE: dict[str, Any] = {
    "model": {"uri": "builtin://smollm2-135m-instruct"},
    "dataset": {"uri": "data/train.jsonl"},
}


def spec(**sections: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({**copy.deepcopy(BASE), **sections})


def with_path(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with `value` set at the dotted `path` (list indexes allowed)."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


# --- RunLayout ---------------------------------------------------------------------------


def test_run_uri_is_output_namespace_job_run() -> None:
    layout = RunLayout("s3://ml-artifacts/kubetune/", "ml-team", "support-bot", "0123456789ab")
    assert layout.run_uri == "s3://ml-artifacts/kubetune/ml-team/support-bot/0123456789ab"
    assert layout.prefix == "ml-team/support-bot/0123456789ab/"
    assert layout.key(RunLayout.MANIFEST) == "ml-team/support-bot/0123456789ab/manifest.json"
    assert layout.uri_for("eval/report.html") == layout.run_uri + "/eval/report.html"


def test_layout_keys_follow_the_design() -> None:
    layout = RunLayout("./artifacts", "local", "quickstart", "abc")
    assert [
        RunLayout.DATA_TRAIN,
        RunLayout.DATA_VAL,
        RunLayout.DATA_REPORT,
        RunLayout.ADAPTER,
        RunLayout.MERGED,
        RunLayout.EVAL_METRICS,
        RunLayout.EVAL_SAMPLES,
        RunLayout.EVAL_REPORT,
        RunLayout.MANIFEST,
    ] == [
        "data/train.jsonl",
        "data/val.jsonl",
        "data/report.json",
        "adapter/",
        "merged/",
        "eval/metrics.json",
        "eval/samples.jsonl",
        "eval/report.html",
        "manifest.json",
    ]
    assert layout.checkpoint(200) == "checkpoints/step-000200/"
    assert layout.checkpoint(0) == "checkpoints/step-000000/"
    assert layout.checkpoint(12_345_678) == "checkpoints/step-12345678/"
    assert layout.quantized("W4A16") == "quantized/W4A16/"
    assert checkpoint_step("checkpoints/step-000200/") == 200
    assert checkpoint_step("step-12345678") == 12_345_678
    assert checkpoint_step("step-200") is None


def test_checkpoint_folders_sort_by_step() -> None:
    layout = RunLayout("/tmp/x", "local", "job", "abc")
    folders = [layout.checkpoint(s) for s in (5, 200, 40, 999_999)]
    assert sorted(folders) == [layout.checkpoint(s) for s in (5, 40, 200, 999_999)]


@pytest.mark.parametrize(
    ("namespace", "job", "run_id"),
    [
        pytest.param("Local", "job", "abc", id="namespace-uppercase"),
        pytest.param("..", "job", "abc", id="namespace-dotdot"),
        pytest.param("a/b", "job", "abc", id="namespace-slash"),
        pytest.param("-a", "job", "abc", id="namespace-leading-dash"),
        pytest.param("a" * 64, "job", "abc", id="namespace-too-long"),
        pytest.param("local", "..", "abc", id="job-dotdot"),
        pytest.param("local", "a..b", "abc", id="job-empty-label"),
        pytest.param("local", "a/../../etc", "abc", id="job-traversal"),
        pytest.param("local", "", "abc", id="job-empty"),
        pytest.param("local", "job", "ABC", id="run-uppercase"),
        pytest.param("local", "job", "a_b", id="run-underscore"),
        pytest.param("local", "job", "a.b", id="run-dot"),
        pytest.param("local", "job", "../x", id="run-traversal"),
    ],
)
def test_invalid_names_are_refused(namespace: str, job: str, run_id: str) -> None:
    with pytest.raises(InvalidKey, match="invalid"):
        RunLayout("s3://bucket/p", namespace, job, run_id)


@pytest.mark.parametrize(
    "relative",
    ["../other-run/manifest.json", "/etc/passwd", "data//x", "data/../../x", "", "adapter//"],
)
def test_run_relative_keys_cannot_escape_the_run(relative: str) -> None:
    layout = RunLayout("s3://bucket", "ns", "job", "abc")
    with pytest.raises(InvalidKey):
        layout.key(relative)


@pytest.mark.parametrize("bad", [-1, True, "200", 1.5])
def test_checkpoint_step_must_be_a_natural_number(bad: Any) -> None:
    with pytest.raises(InvalidKey):
        RunLayout("/x", "local", "job", "abc").checkpoint(bad)


@pytest.mark.parametrize("scheme", ["../W4A16", "W4A16/x", "", "w 4"])
def test_quantized_scheme_is_validated(scheme: str) -> None:
    with pytest.raises(InvalidKey):
        RunLayout("/x", "local", "job", "abc").quantized(scheme)


@pytest.mark.parametrize(
    "output",
    [
        "s3://ml-artifacts",
        "s3://ml-artifacts/kubetune",
        "pvc://artifacts/runs",
        "file:///srv/artifacts",
        "/srv/artifacts",
        "artifacts",
        "./artifacts",
        "/",
    ],
)
def test_parse_run_uri_inverts_run_uri(output: str) -> None:
    layout = RunLayout(output, "ml-team", "support-bot.v2", "0123456789ab-1f2e3d4c")
    parsed = parse_run_uri(layout.run_uri)
    assert parsed.run_uri == layout.run_uri
    assert (parsed.namespace, parsed.job_name, parsed.run_id) == (
        "ml-team",
        "support-bot.v2",
        "0123456789ab-1f2e3d4c",
    )
    assert parse_run_uri(layout.run_uri + "/") == parsed


@pytest.mark.parametrize(
    "uri",
    ["s3://ns/job/run", "s3://bucket/job/run", "job/run", "s3://bucket/ns/job/RUN", ""],
)
def test_parse_run_uri_refuses_what_is_not_a_run(uri: str) -> None:
    with pytest.raises(InvalidKey):
        parse_run_uri(uri)


# --- run identity --------------------------------------------------------------------------


def test_run_id_is_12_hex_characters_and_deterministic() -> None:
    run_id = run_id_for(spec())
    assert re.fullmatch(r"[0-9a-f]{12}", run_id)
    assert run_id_for(spec()) == run_id


def test_run_id_is_stable_across_processes(repo_root: Path) -> None:
    code = (
        "from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec as S;"
        "from kubetune.storage.layout import run_id_for;"
        f"print(run_id_for(S.model_validate({BASE!r})))"
    )
    ids = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(repo_root / "src")}
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
        )
        ids.add(out.stdout.strip())
    assert ids == {run_id_for(spec())}


def test_key_order_does_not_matter(repo_root: Path) -> None:
    doc = yaml.safe_load((repo_root / "examples/finetunejob-lora.yaml").read_text())["spec"]

    def reverse(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reverse(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reverse(v) for v in value]
        return value

    assert list(reverse(doc)) != list(doc)
    assert run_id_for(FineTuneJobSpec.model_validate(reverse(doc))) == run_id_for(
        FineTuneJobSpec.model_validate(doc)
    )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("lora", {}),
        ("lora", {"rank": 16, "alpha": 32}),
        ("training", {}),
        ("training", {"learningRate": "2e-4", "seed": 42}),
        ("training", {"fastPaths": {}}),
        ("training", {"fastPaths": {"attention": "Auto"}}),
        ("evaluation", {}),
        ("evaluation", {"metrics": ["Perplexity"], "generation": {}}),
        ("evaluation", {"bertScore": {}}),
        ("export", {}),
        ("export", {"merge": False, "quantize": []}),
        ("distributed", {"nodes": 1}),
        ("alignment", {}),
        ("stages", [{"type": "SFT"}]),
        ("stages", [{"type": "SFT", "training": {}}]),
        ("dataset.filters", {}),
        ("dataset.filters", {"dedup": "Exact"}),
        ("dataset.validation", {"seed": 42}),
        ("dataset.chatTemplate", {"preset": "Model"}),
        ("dataset.columns", {}),
    ],
)
def test_absent_section_equals_its_defaults_written_out(path: str, value: Any) -> None:
    assert run_id_for(FineTuneJobSpec.model_validate(with_path(BASE, path, value))) == run_id_for(
        spec()
    )


def test_absent_method_settings_equal_their_defaults() -> None:
    assert run_id_for(spec(method="QLoRA")) == run_id_for(
        spec(method="QLoRA", qlora={"quantType": "NF4", "doubleQuant": True})
    )
    dpo = {"stages": [{"type": "SFT"}, {"type": "DPO"}]}
    assert run_id_for(spec(**dpo)) == run_id_for(spec(**dpo, alignment={"dpo": {"beta": "0.1"}}))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.uri", "hf://org/other-model"),
        ("model.revision", "abc123"),
        ("model.trustRemoteCode", True),
        ("dataset.uri", "data/other.jsonl"),
        ("dataset.format", "Alpaca"),
        ("dataset.validation", {"fraction": "0.1"}),
        ("dataset.validation", {"seed": 7}),
        ("dataset.filters", {"dedup": "Near"}),
        ("method", "Full"),
        ("lora", {"rank": 8}),
        ("lora", {"targetModules": ["q_proj", "v_proj"]}),
        ("stages", [{"type": "SFT"}, {"type": "DPO"}]),
        ("stages", [{"type": "SFT", "training": {"learningRate": "1e-5"}}]),
        ("training", {"learningRate": "1e-4"}),
        ("training", {"seed": 7}),
        ("training", {"maxSteps": 10}),
        ("training", {"fastPaths": {"attention": "Eager"}}),
        ("distributed", {"nodes": 2, "strategy": "FSDP"}),
        ("evaluation", {"metrics": ["Perplexity", "ROUGE"]}),
        ("evaluation", {"maxSamples": 50}),
        ("export", {"merge": True}),
        ("export", {"merge": True, "quantize": ["W4A16"]}),
    ],
)
def test_changing_a_training_relevant_value_changes_the_id(path: str, value: Any) -> None:
    changed = FineTuneJobSpec.model_validate(with_path(BASE, path, value))
    assert run_id_for(changed) != run_id_for(spec())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("output", {"uri": "s3://other-bucket/x"}),
        ("resources", {"gpus": 2, "gpuClass": "h100-80gb"}),
        ("resources", {"tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        ("tracking", {"tensorBoard": {"enabled": True}}),
        ("suspend", True),
        ("queueName", "team-a"),
        ("activeDeadlineSeconds", 3600),
        ("backoffLimit", 7),
        ("ttlSecondsAfterFinished", 60),
        ("model.credentialsSecretRef", {"name": "hf-token"}),
        ("dataset.credentialsSecretRef", {"name": "s3-creds"}),
        ("training", {"checkpoint": {"everySteps": 50, "keep": 5}}),
        ("training", {"logEverySteps": 1}),
    ],
)
def test_changing_a_non_training_field_keeps_the_id(path: str, value: Any) -> None:
    changed = FineTuneJobSpec.model_validate(with_path(BASE, path, value))
    assert run_id_for(changed) == run_id_for(spec())


def test_canonical_form_holds_only_training_fields() -> None:
    canonical = canonical_spec(spec(output={"uri": "s3://bucket/p"}, suspend=True))
    assert set(canonical) == {
        "model",
        "dataset",
        "method",
        "lora",
        "qlora",
        "prefixTuning",
        "promptTuning",
        "stages",
        "alignment",
        "training",
        "distributed",
        "evaluation",
        "export",
    }
    assert canonical["lora"]["rank"] == 16  # defaults are written out


def test_every_example_job_has_a_distinct_run_id(repo_root: Path) -> None:
    ids = {}
    for path in sorted((repo_root / "examples").glob("finetunejob-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        ids[path.name] = run_id_for(FineTuneJobSpec.model_validate(doc["spec"]))
    assert len(ids) >= 2
    assert len(set(ids.values())) == len(ids), ids


def test_new_run_id_adds_a_unique_valid_suffix() -> None:
    base = run_id_for(spec())
    first, second = new_run_id(base), new_run_id(base)
    assert first != second
    assert first.startswith(base + "-")
    assert RunLayout("/x", "local", "job", first).run_id == first


def test_new_run_id_refuses_an_invalid_base() -> None:
    with pytest.raises(InvalidKey):
        new_run_id("../x")


@pytest.mark.parametrize("module", ["kubetune.storage.layout", "kubetune.storage"])
def test_layout_imports_neither_boto3_nor_torch(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    heavy = {"boto3", "botocore", "s3transfer", "torch", "transformers", "kopf", "kubernetes"}
    assert not heavy & {name.split(".")[0] for name in out}
