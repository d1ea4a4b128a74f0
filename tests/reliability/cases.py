"""The bad-input catalog: every way a user's input can be wrong, and what each must report.

Each case builds its input in a fresh folder and names what every surface must say: the
contract's reason (`kubetune.api.contract.Reason`), the exit code of `kubetune run` /
`kubetune prepare` and of the trainer (the `EXIT_CODES` table), and a message that names
the field or the file:line (`where`) and says what to do (`fix`). The surfaces are the
command line, the trainer's result file (the termination message), the FineTuneJob status
the operator computes from it, and the ModelDeployment status for serving refusals.

Invalid FineTuneJob manifests on the API server have their own catalog (tests/catalog.py);
this one covers what passes the schema and fails later: data, sources, credentials,
models, stages, evaluation, cluster sizing and serving.

`tests/integration/test_bad_input_catalog.py` runs it; `tests.reliability.catalog_table`
renders it into docs/reliability.md.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason

from .workspace import (
    Workspace,
    alpaca,
    conversations,
    edit_json,
    preference,
)


class Surface(str, Enum):
    """Where a user sees a failure."""

    CLI = "CLI"
    """`kubetune run` / `kubetune prepare`: exit code and the error line on stderr."""

    RESULT = "TrainerResult"
    """The result file of `python -m kubetune.trainer` (the pod's termination message)."""

    STATUS = "FineTuneJob status"
    """The `Succeeded` condition the operator computes (`operator.status.compute_status`)."""

    SERVING = "ModelDeployment status"
    """The `Ready` condition of a ModelDeployment the operator refuses to serve."""


TRAINER = (Surface.CLI, Surface.RESULT, Surface.STATUS)
"""A job that passes the schema and fails when it runs: all three job surfaces."""
SPEC = (Surface.CLI, Surface.RESULT)
"""A spec the schema refuses: the API server refuses it too, so no pod and no status."""
CONFIG = (Surface.RESULT, Surface.STATUS)
"""A trainer config the operator rendered badly (no command line involved)."""
OPERATOR = (Surface.STATUS,)
"""A job the operator refuses before any pod runs."""
SERVING = (Surface.SERVING,)
"""A ModelDeployment the operator refuses to serve."""


@dataclass(frozen=True)
class JobInput:
    """A FineTuneJob run by `kubetune run` / `kubetune prepare` and by the trainer."""

    spec: dict[str, Any]
    """The FineTuneJob's spec (wire form)."""

    env: Mapping[str, str] = field(default_factory=dict)
    """Environment of both runs (e.g. S3 endpoint and credentials)."""

    s3_auth: bool = False
    """The S3 server checks credentials (and refuses the fake ones) during the runs."""

    job_text: str | None = None
    """The job file exactly as written (instead of one made from `spec`)."""

    config_text: str | None = None
    """The trainer config exactly as written (instead of one made from `spec`)."""

    allow_random: bool = True
    """`allowBuiltinRandom` of the trainer config (the operator's settings decide it)."""


@dataclass(frozen=True)
class OperatorInput:
    """A FineTuneJob as the operator reconciles it."""

    spec: dict[str, Any]
    """The FineTuneJob's spec (wire form)."""

    settings: Mapping[str, Any] = field(default_factory=dict)
    """Operator settings (wire form, e.g. gpuClasses)."""

    secrets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Secrets of the job's namespace: name → keys."""


@dataclass(frozen=True)
class ServingInput:
    """A ModelDeployment of the FineTuneJob `support-bot`, whose last run succeeded."""

    spec: dict[str, Any]
    """The ModelDeployment's spec (wire form)."""

    job: dict[str, Any]
    """The FineTuneJob's spec (wire form)."""


Input = JobInput | OperatorInput | ServingInput


@dataclass(frozen=True)
class Case:
    """One bad input and what every surface must report."""

    id: str
    """Stable name (also the FineTuneJob's name)."""

    input: str
    """What is wrong with the input."""

    reason: Reason
    """The contract reason every surface reports."""

    exit_code: int | None
    """Exit code of the command line and the trainer; None when no process exits."""

    where: str
    """What the message names: the field, or the file and line."""

    fix: str
    """What the message tells the user to do (a substring of it)."""

    build: Callable[[Workspace], Input]
    """Writes the case's files and returns its input."""

    surfaces: tuple[Surface, ...] = TRAINER
    """Where the failure is checked."""

    cli: str = "run"
    """`kubetune run` or `kubetune prepare`."""

    keeps_progress: bool = False
    """The run got past its data stage: what it published (data, checkpoints) stays for the
    retry to resume from. It still publishes no manifest."""

    counted: int | None = None
    """For a run that succeeds: the invalid rows its data report must count (and list)."""

    gap: str = ""
    """A known shortfall in code this catalog may not change: the case is expected to fail
    (strictly: once fixed, the test says so) until the change described here is made."""

    processes: tuple[Surface, ...] = ()
    """Surfaces also checked with a real process (`python -m kubetune …`,
    `python -m kubetune.trainer`), not only in-process."""


# --- Shared inputs ----------------------------------------------------------------------


def job_spec(ws: Workspace, dataset: str | dict[str, Any] | None = None, **spec: Any) -> JobInput:
    """A LoRA job on the tiny model (1 step, sequences of 128) with `spec` merged in."""
    data = {"uri": dataset} if isinstance(dataset, str) else dataset
    wire: dict[str, Any] = {
        "model": {"uri": str(ws.model)},
        "dataset": data or {"uri": ws.jsonl("train.jsonl", alpaca(20))},
        "method": "LoRA",
        "training": {"maxSteps": 1, "maxSeqLength": 128, "batchSize": 2},
        "output": {"uri": str(ws.output)},
    }
    wire.update(spec)
    return JobInput(wire)


def _lines_with(rows: list[dict[str, Any]], at: int, raw: bytes) -> bytes:
    """JSONL bytes with `raw` as line `at` (1-based) among the rows."""
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(at - 1, raw)
    return b"".join(line + b"\n" for line in lines)


def _break_json(text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / "config.json").write_text(text, encoding="utf-8")

    return edit


def _remove(*names: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return edit


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded: refused before")


def _remote_code(folder: Path) -> None:
    edit_json(
        folder / "config.json",
        lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"}),
    )


# --- Data -------------------------------------------------------------------------------


def jsonl_bad_utf8(ws: Workspace) -> JobInput:
    raw = b'{"instruction": "caf\xe9 in Latin-1", "output": "x"}'
    return job_spec(ws, ws.write("latin1.jsonl", _lines_with(alpaca(20), 6, raw)))


def jsonl_bad_utf8_within_budget(ws: Workspace) -> JobInput:
    raw = b'{"instruction": "caf\xe9 in Latin-1", "output": "x"}'
    return job_spec(ws, ws.write("mostly-fine.jsonl", _lines_with(alpaca(150), 42, raw)))


def jsonl_broken_line(ws: Workspace) -> JobInput:
    raw = b'{"instruction": "unterminated", "output": '
    return job_spec(ws, ws.write("broken.jsonl", _lines_with(alpaca(20), 6, raw)))


def jsonl_broken_line_fail(ws: Workspace) -> JobInput:
    raw = b'{"instruction": "unterminated", "output": '
    uri = ws.write("strict.jsonl", _lines_with(alpaca(150), 101, raw))
    return job_spec(ws, {"uri": uri, "onInvalid": "Fail"})


def too_many_invalid(ws: Workspace) -> JobInput:
    rows: list[Any] = alpaca(17) + [{"instruction": f"no answer {i}"} for i in range(3)]
    uri = ws.jsonl("partly.jsonl", rows)
    return job_spec(ws, {"uri": uri, "maxInvalidFraction": "0.1"})


def alpaca_missing_column(ws: Workspace) -> JobInput:
    rows = [{"instruction": r["instruction"], "response": r["output"]} for r in alpaca(20)]
    return job_spec(ws, {"uri": ws.jsonl("renamed.jsonl", rows), "format": "Alpaca"})


def column_wrong_type(ws: Workspace) -> JobInput:
    rows = [{"instruction": f"List {i}.", "output": ["a", "b"]} for i in range(20)]
    return job_spec(ws, ws.jsonl("lists.jsonl", rows))


def columns_undetectable(ws: Workspace) -> JobInput:
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(20)]
    return job_spec(ws, ws.jsonl("qa.jsonl", rows))


def empty_file(ws: Workspace) -> JobInput:
    return job_spec(ws, ws.write("empty.jsonl", ""))


def empty_directory_files(ws: Workspace) -> JobInput:
    ws.write("shards/part-0.jsonl", "\n\n")
    ws.write("shards/part-1.jsonl", "")
    return job_spec(ws, str(ws.root / "shards"))


def all_too_long(ws: Workspace) -> JobInput:
    uri = ws.jsonl("long.jsonl", alpaca(20))
    return job_spec(ws, {"uri": uri, "filters": {"maxTokens": 4}})


def all_too_short(ws: Workspace) -> JobInput:
    uri = ws.jsonl("short.jsonl", alpaca(20))
    return job_spec(ws, {"uri": uri, "filters": {"minTokens": 100}})


def preference_missing_rejected(ws: Workspace) -> JobInput:
    uri = ws.jsonl("pairs.jsonl", preference(20, rejected=False))
    return job_spec(ws, {"uri": uri, "format": "Preference"})


def preference_identical(ws: Workspace) -> JobInput:
    return job_spec(ws, ws.jsonl("same.jsonl", preference(20, same=True)))


def conversation_unknown_role(ws: Workspace) -> JobInput:
    return job_spec(ws, ws.jsonl("bot.jsonl", conversations(20, ("user", "bot"))))


def conversation_ends_with_user(ws: Workspace) -> JobInput:
    rows = conversations(20, ("user", "assistant", "user"))
    return job_spec(ws, ws.jsonl("dangling.jsonl", rows))


def conversation_misplaced_system(ws: Workspace) -> JobInput:
    rows = conversations(20, ("user", "system", "assistant"))
    return job_spec(ws, ws.jsonl("system.jsonl", rows))


def lone_surrogate(ws: Workspace) -> JobInput:
    raw = b'{"instruction": "broken \\ud800 escape", "output": "x"}'
    return job_spec(ws, ws.write("surrogate.jsonl", _lines_with(alpaca(20), 4, raw)))


def csv_missing_column(ws: Workspace) -> JobInput:
    text = "instruction,response\n" + "".join(f"Say {i},It is {i}\n" for i in range(20))
    return job_spec(ws, {"uri": ws.write("table.csv", text), "format": "Alpaca"})


def csv_bad_utf8(ws: Workspace) -> JobInput:
    lines = [b"instruction,output"] + [f"Say {i},It is {i}".encode() for i in range(10)]
    lines.insert(7, b"Say caf\xe9,It is Latin-1")
    return job_spec(ws, ws.write("latin1.csv", b"\n".join(lines) + b"\n"))


def parquet_corrupt(ws: Workspace) -> JobInput:
    return job_spec(ws, ws.write("table.parquet", b"PAR1 truncated by a failed upload"))


def parquet_missing_column(ws: Workspace) -> JobInput:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": r["instruction"], "answer": r["output"]} for r in alpaca(20)]
    path = ws.root / "renamed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return job_spec(ws, {"uri": str(path), "format": "Alpaca"})


def gzip_corrupt(ws: Workspace) -> JobInput:
    body = b"".join(json.dumps(r).encode() + b"\n" for r in alpaca(20))
    return job_spec(ws, ws.write("train.jsonl.gz", body))  # named .gz, never compressed


def gzip_truncated(ws: Workspace) -> JobInput:
    body = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in alpaca(200)))
    return job_spec(ws, ws.write("cut.jsonl.gz", body[: len(body) // 2]))


def unknown_file_type(ws: Workspace) -> JobInput:
    return job_spec(ws, ws.write("train.xlsx", b"PK\x03\x04 a spreadsheet"))


def json_array_broken(ws: Workspace) -> JobInput:
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": }\n]\n'
    return job_spec(ws, ws.write("array.json", text))


def json_not_records(ws: Workspace) -> JobInput:
    return job_spec(ws, ws.write("object.json", '{"name": "not a dataset", "size": 3}'))


def validation_other_kind(ws: Workspace) -> JobInput:
    dataset = {
        "uri": ws.jsonl("train.jsonl", alpaca(20)),
        "validation": {"uri": ws.jsonl("pairs.jsonl", preference(5))},
    }
    return job_spec(ws, dataset)


def template_syntax_error(ws: Workspace) -> JobInput:
    dataset = {
        "uri": ws.jsonl("train.jsonl", alpaca(20)),
        "chatTemplate": {"jinja": "{% for m in messages %}{{ m.content }"},
    }
    return job_spec(ws, dataset)


ALTERNATING = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
)


def template_refuses_rows(ws: Workspace) -> JobInput:
    rows = conversations(20, ("user", "user", "assistant"))
    dataset = {"uri": ws.jsonl("double.jsonl", rows), "chatTemplate": {"jinja": ALTERNATING}}
    return job_spec(ws, dataset)


# --- Sources ----------------------------------------------------------------------------


def dataset_path_missing(ws: Workspace) -> JobInput:
    return job_spec(ws, str(ws.root / "missing" / "train.jsonl"))


def dataset_glob_no_match(ws: Workspace) -> JobInput:
    ws.jsonl("data/train.json.txt", ["not matched"])
    return job_spec(ws, str(ws.root / "data" / "*.jsonl"))


def dataset_pvc_missing(ws: Workspace) -> JobInput:
    (ws.root / "pvc" / "team-data").mkdir(parents=True)
    spec = job_spec(ws, "pvc://team-data/sets/train.jsonl")
    return JobInput(spec.spec, env={"KUBETUNE_PVC_ROOT": str(ws.root / "pvc")})


def dataset_s3_bucket_missing(ws: Workspace) -> JobInput:
    return JobInput(job_spec(ws, "s3://no-such-bucket/train.jsonl").spec, env=ws.s3_env())


def dataset_s3_key_missing(ws: Workspace) -> JobInput:
    ws.s3_put("sets/other.jsonl", b'{"instruction": "a", "output": "b"}\n')
    uri = "s3://bad-input/sets/train.jsonl"
    return JobInput(job_spec(ws, uri).spec, env=ws.s3_env())


def dataset_s3_unauthorized(ws: Workspace) -> JobInput:
    body = b"".join(json.dumps(r).encode() + b"\n" for r in alpaca(20))
    uri = ws.s3_put("sets/train.jsonl", body)
    return JobInput(job_spec(ws, uri).spec, env=ws.s3_env(secret="wrong"), s3_auth=True)


def output_s3_unauthorized(ws: Workspace) -> JobInput:
    spec = job_spec(ws, output={"uri": "s3://bad-input/runs"}).spec
    return JobInput(spec, env=ws.s3_env(secret="wrong"), s3_auth=True)


def dataset_hf_offline(ws: Workspace) -> JobInput:
    return job_spec(ws, "hf://acme/support-chats")


def dataset_builtin_unknown(ws: Workspace) -> JobInput:
    return job_spec(ws, "builtin://support-chats")


# --- Models -----------------------------------------------------------------------------


def model_at(uri: str) -> Callable[[Workspace], JobInput]:
    def build(ws: Workspace) -> JobInput:
        return job_spec(ws, model={"uri": uri})

    return build


def model_edited(edit: Callable[[Path], None]) -> Callable[[Workspace], JobInput]:
    def build(ws: Workspace) -> JobInput:
        return job_spec(ws, model={"uri": ws.model_copy("model", edit)})

    return build


def model_path_missing(ws: Workspace) -> JobInput:
    return job_spec(ws, model={"uri": str(ws.root / "models" / "tiny")})


def model_s3_empty(ws: Workspace) -> JobInput:
    ws.s3_put("models/other/config.json", b"{}")
    spec = job_spec(ws, model={"uri": "s3://bad-input/models/tiny"}).spec
    return JobInput(spec, env=ws.s3_env())


def model_random_not_allowed(ws: Workspace) -> JobInput:
    spec = job_spec(ws, model={"uri": "builtin://random/smollm2-135m"}).spec
    return JobInput(spec, allow_random=False)


def sequence_too_long(ws: Workspace) -> JobInput:
    return job_spec(ws, training={"maxSteps": 1, "maxSeqLength": 1024})


def cpu_memory_insufficient(ws: Workspace) -> JobInput:
    """4,096 rows of 512 tokens per step without checkpointing, on a CPU run capped at 2 GiB
    (the cap makes the verdict the same on every machine)."""
    training = {
        "maxSteps": 1,
        "maxSeqLength": 512,
        "batchSize": 4096,
        "gradientCheckpointing": "Disabled",
    }
    spec = job_spec(ws, training=training).spec
    return JobInput(spec, env={"KUBETUNE_HOST_MEMORY_GIB": "2"})


def model_unknown_builtin(ws: Workspace) -> JobInput:
    return job_spec(ws, model={"uri": "builtin://smollm3-3b"})


def revision_not_hf(ws: Workspace) -> JobInput:
    return job_spec(ws, model={"uri": str(ws.model), "revision": "v1"})


# --- Stages and evaluation --------------------------------------------------------------


def dpo_on_sft_data(ws: Workspace) -> JobInput:
    return job_spec(ws, stages=[{"type": "SFT"}, {"type": "DPO"}])


def dpo_unknown_loss(ws: Workspace) -> JobInput:
    return job_spec(ws, stages=[{"type": "DPO"}], alignment={"dpo": {"lossType": "Hinge2"}})


def dpo_with_prefix_tuning(ws: Workspace) -> JobInput:
    pairs = {"uri": ws.jsonl("pairs.jsonl", preference(20)), "format": "Preference"}
    return job_spec(
        ws, method="PrefixTuning", stages=[{"type": "SFT"}, {"type": "DPO", "dataset": pairs}]
    )


def gate_unknown_metric(ws: Workspace) -> JobInput:
    gate = [{"metric": "Accuracy", "operator": ">=", "value": "0.5"}]
    return job_spec(ws, evaluation={"metrics": ["Perplexity"], "gate": gate})


def gate_not_computed(ws: Workspace) -> JobInput:
    gate = [{"metric": "ROUGEL", "operator": ">=", "value": "0.2"}]
    return job_spec(ws, evaluation={"metrics": ["Perplexity"], "gate": gate})


def suite_malformed(ws: Workspace) -> JobInput:
    suite = ws.jsonl(
        "suite.jsonl",
        [
            {"messages": [{"role": "user", "content": "2+2?"}], "choices": ["4", "5"], "answer": 0},
            '{"messages": [{"role": "user", "content": "3+3?"}], "choices": ["6", ',
        ],
    )
    evaluation = {"metrics": ["Suite"], "suites": [{"name": "arith", "uri": suite}]}
    return job_spec(ws, evaluation=evaluation)


def suite_missing(ws: Workspace) -> JobInput:
    suite = str(ws.root / "suites" / "arith.jsonl")
    evaluation = {"metrics": ["Suite"], "suites": [{"name": "arith", "uri": suite}]}
    return job_spec(ws, evaluation=evaluation)


def judge_unreachable(ws: Workspace) -> JobInput:
    evaluation = {
        "metrics": ["Judge"],
        "maxSamples": 2,
        "compareBase": False,
        "generation": {"maxNewTokens": 4},
        "judge": {
            "endpoint": "http://127.0.0.1:9/v1",  # the discard port: refused at once
            "model": "judge",
            "maxRetries": 0,
            "timeoutSeconds": 5,
        },
    }
    return job_spec(ws, evaluation=evaluation)


# --- Trainer config and job files --------------------------------------------------------


def config_unknown_key(ws: Workspace) -> JobInput:
    spec = job_spec(ws).spec
    run = {"namespace": "ml", "jobName": "config-unknown-key", "runId": "r1"}
    config = {
        "schemaVersion": 1,
        "run": {**run, "outputUri": str(ws.output)},
        "spec": spec,
        "metricsPort": 0,
        "gpuMemoryGiB": 80,
    }
    return JobInput(spec, config_text=json.dumps(config))


def config_not_yaml(ws: Workspace) -> JobInput:
    return JobInput(job_spec(ws).spec, config_text="run: {namespace: ml\nspec: [")


def job_file_empty(ws: Workspace) -> JobInput:
    return JobInput(job_spec(ws).spec, job_text="# nothing here yet\n")


def job_file_two_jobs(ws: Workspace) -> JobInput:
    spec = job_spec(ws).spec
    one = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "first"},
        "spec": spec,
    }
    two = {**one, "metadata": {"name": "second"}}
    return JobInput(spec, job_text=json.dumps(one) + "\n---\n" + json.dumps(two) + "\n")


# --- Operator: Secrets, cluster URIs, GPU sizing -----------------------------------------


def cluster_spec(**spec: Any) -> dict[str, Any]:
    """A job as a cluster runs it: hf:// model, s3:// data and output."""
    wire: dict[str, Any] = {
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"uri": "s3://ml-data/support/train.jsonl"},
        "method": "LoRA",
        "output": {"uri": "s3://ml-artifacts/kubetune"},
    }
    wire.update(spec)
    return wire


def secret_missing(ws: Workspace) -> OperatorInput:
    output = {"uri": "s3://ml-artifacts/kubetune", "credentialsSecretRef": {"name": "s3-creds"}}
    return OperatorInput(cluster_spec(output=output))


def secret_key_missing(ws: Workspace) -> OperatorInput:
    output = {"uri": "s3://ml-artifacts/kubetune", "credentialsSecretRef": {"name": "s3-creds"}}
    return OperatorInput(
        cluster_spec(output=output), secrets={"s3-creds": frozenset({"AWS_ACCESS_KEY_ID"})}
    )


def local_uri_in_cluster(ws: Workspace) -> OperatorInput:
    return OperatorInput(cluster_spec(dataset={"uri": "./data/train.jsonl"}))


GPU_CLASSES = {
    "gpuClasses": [
        {"name": "l4-24gb", "memoryGiB": 22.5, "gpusPerNode": 8},
        {"name": "a100-40gb", "memoryGiB": 39.5, "gpusPerNode": 4},
    ]
}


def gpu_memory_insufficient(ws: Workspace) -> OperatorInput:
    spec = cluster_spec(
        model={"uri": "builtin://random/llama-3.1-70b"},
        method="Full",
        training={"maxSeqLength": 8192, "batchSize": 8},
        resources={"gpus": "Auto", "gpuClass": "l4-24gb"},
    )
    return OperatorInput(spec, settings={**GPU_CLASSES, "allowBuiltinRandom": True})


def gpu_class_unknown(ws: Workspace) -> OperatorInput:
    spec = cluster_spec(resources={"gpus": 1, "gpuClass": "h100-80gb"})
    return OperatorInput(spec, settings=GPU_CLASSES)


# --- Serving ----------------------------------------------------------------------------


SERVED_JOB = "support-bot"
ADAPTER_REF = {"fineTuneJobRef": {"name": SERVED_JOB}, "variant": "Adapter"}


def adapter_dora(ws: Workspace) -> ServingInput:
    return ServingInput({"model": ADAPTER_REF}, cluster_spec(lora={"useDoRA": True}))


def adapter_modules_to_save(ws: Workspace) -> ServingInput:
    return ServingInput({"model": ADAPTER_REF}, cluster_spec(lora={"modulesToSave": ["lm_head"]}))


def adapter_rank_over_limit(ws: Workspace) -> ServingInput:
    spec = {"model": ADAPTER_REF, "vllm": {"maxLoraRank": 16}}
    return ServingInput(spec, cluster_spec(lora={"rank": 64}))


def adapter_other_base(ws: Workspace) -> ServingInput:
    spec = {
        "baseModel": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"},
        "adapters": [{"name": "support", "fineTuneJobRef": {"name": SERVED_JOB}}],
    }
    return ServingInput(spec, cluster_spec())


def prefix_not_servable(ws: Workspace) -> ServingInput:
    return ServingInput({"model": ADAPTER_REF}, cluster_spec(method="PrefixTuning"))


def variant_not_exported(ws: Workspace) -> ServingInput:
    model = {"fineTuneJobRef": {"name": SERVED_JOB}, "variant": "W4A16"}
    return ServingInput({"model": model}, cluster_spec(export={"merge": True}))


def serving_local_run(ws: Workspace) -> ServingInput:
    model = {"uri": "./artifacts/local/support-bot/4f702c671992", "variant": "Merged"}
    return ServingInput({"model": model}, cluster_spec())


# --- The catalog ------------------------------------------------------------------------

INVALID, EMPTY = Reason.DATASET_INVALID, Reason.DATASET_EMPTY
NOT_FOUND, UNAUTHORIZED = Reason.SOURCE_NOT_FOUND, Reason.SOURCE_UNAUTHORIZED
RAISE_BUDGET = "raise dataset.maxInvalidFraction"

CASES: tuple[Case, ...] = (
    # Malformed data.
    Case("jsonl-bad-utf8-line", "a Latin-1 byte on line 6 of 21 (JSONL)", INVALID, 11,
         "latin1.jsonl:6: not valid UTF-8", "re-encode the file as UTF-8", jsonl_bad_utf8,
         cli="prepare", processes=(Surface.CLI,)),
    Case("jsonl-bad-utf8-counted", "one Latin-1 line of 151, within maxInvalidFraction",
         Reason.SUCCEEDED, 0, "mostly-fine.jsonl:42: not valid UTF-8",
         "re-encode the file as UTF-8", jsonl_bad_utf8_within_budget, surfaces=(Surface.CLI,),
         cli="prepare", counted=1),
    Case("jsonl-broken-line", "unterminated JSON on line 6 of 21", INVALID, 11,
         "broken.jsonl:6: invalid JSON", RAISE_BUDGET, jsonl_broken_line),
    Case("jsonl-broken-line-strict", "one broken line of 151 with onInvalid: Fail", INVALID, 11,
         "strict.jsonl:101: invalid JSON", "set it to Skip", jsonl_broken_line_fail),
    Case("too-many-invalid-rows", "3 of 20 rows lack output, maxInvalidFraction 0.1", INVALID,
         11, "partly.jsonl:18: missing column 'output'", RAISE_BUDGET, too_many_invalid),
    Case("alpaca-missing-column", "format Alpaca, answers in a column named response", INVALID,
         11, "renamed.jsonl:1: missing column 'output'", "set dataset.format and dataset.columns",
         alpaca_missing_column),
    Case("column-wrong-type", "output holds lists, not text", INVALID, 11,
         "lists.jsonl:1: column 'output' must be text", "fix or remove them", column_wrong_type),
    Case("columns-undetectable", "columns question/answer with format Auto", INVALID, 11,
         "qa.jsonl: cannot tell the format from the columns (answer, question)",
         "set dataset.format", columns_undetectable),
    Case("empty-file", "an empty JSONL file", EMPTY, 12, "empty.jsonl holds no records",
         "point dataset.uri at the data", empty_file, cli="prepare"),
    Case("empty-directory", "a directory of empty shards", EMPTY, 12,
         "part-1.jsonl hold no records", "point dataset.uri at the data", empty_directory_files),
    Case("all-rows-too-long", "filters.maxTokens 4: every row is longer", EMPTY, 12,
         "filtered {'too-long': 20}", "raise dataset.filters.maxTokens", all_too_long),
    Case("all-rows-too-short", "filters.minTokens 100: every row is shorter", EMPTY, 12,
         "filtered {'too-short': 20}", "lower dataset.filters.minTokens", all_too_short),
    Case("preference-missing-rejected", "format Preference, no rejected column", INVALID, 11,
         "pairs.jsonl:1: missing column 'rejected'", RAISE_BUDGET, preference_missing_rejected),
    Case("preference-identical-pair", "chosen == rejected in every pair", INVALID, 11,
         "same.jsonl:1: chosen and rejected are identical", RAISE_BUDGET, preference_identical),
    Case("conversation-unknown-role", "turns with role bot", INVALID, 11,
         "bot.jsonl:1: turn 2 has unknown role 'bot'", RAISE_BUDGET, conversation_unknown_role),
    Case("conversation-ends-with-user", "conversations end on a user turn", INVALID, 11,
         "dangling.jsonl:1: the conversation does not end with an assistant turn", RAISE_BUDGET,
         conversation_ends_with_user),
    Case("conversation-misplaced-system", "a system turn in the middle", INVALID, 11,
         "system.jsonl:1: a system message is only allowed as the first turn", RAISE_BUDGET,
         conversation_misplaced_system),
    Case("lone-surrogate", "a lone UTF-16 surrogate escape on line 4", INVALID, 11,
         "surrogate.jsonl:4: lone UTF-16 surrogate", "fix the encoding of the source",
         lone_surrogate),
    Case("csv-missing-column", "CSV with format Alpaca and no output column", INVALID, 11,
         "table.csv:2: missing column 'output'", "set dataset.format and dataset.columns",
         csv_missing_column),
    Case("csv-bad-utf8", "CSV with a Latin-1 byte on line 8", INVALID, 11,
         "latin1.csv:8: not valid UTF-8", "re-encode the file as UTF-8", csv_bad_utf8),
    Case("parquet-corrupt", "a truncated Parquet file", INVALID, 11,
         "table.parquet: not a readable Parquet file", "re-export it", parquet_corrupt),
    Case("parquet-missing-column", "Parquet with format Alpaca and no output column", INVALID,
         11, "renamed.parquet:1: missing column 'output'", "set dataset.format and dataset.columns",
         parquet_missing_column),
    Case("gzip-not-compressed", "train.jsonl.gz that is plain text", INVALID, 11,
         "train.jsonl.gz: not a readable gzip file", "remove the .gz suffix", gzip_corrupt),
    Case("gzip-truncated", "a .jsonl.gz cut in half", INVALID, 11,
         "cut.jsonl.gz: not a readable gzip file", "re-compress it with gzip", gzip_truncated),
    Case("unknown-file-type", "a .xlsx file", INVALID, 11, "train.xlsx: unknown file type",
         "use one of .jsonl", unknown_file_type),
    Case("json-array-broken", "a JSON array with a syntax error on line 3", INVALID, 11,
         "array.json:3: invalid JSON", "convert it to JSONL", json_array_broken),
    Case("json-not-records", "a JSON object that holds no list", INVALID, 11,
         "object.json:", "must hold a list of records", json_not_records),
    Case("validation-other-kind", "validation.uri holds preference pairs", INVALID, 11,
         "dataset.validation.uri holds preference data", "point validation.uri at data of the "
         "same kind", validation_other_kind),
    Case("chat-template-syntax", "dataset.chatTemplate.jinja does not compile", Reason.INVALID_SPEC,
         10, "dataset.chatTemplate.jinja does not compile (line 1", "fix the template",
         template_syntax_error),
    Case("chat-template-refuses-rows", "the template raises on user, user, assistant", INVALID,
         11, "double.jsonl:1: the chat template refuses this conversation",
         "set dataset.chatTemplate", template_refuses_rows),
    # Sources.
    Case("dataset-path-missing", "dataset.uri names no file", NOT_FOUND, 13,
         "missing/train.jsonl: no file found", "fix the URI", dataset_path_missing,
         cli="prepare"),
    Case("dataset-glob-no-match", "a glob that matches nothing", NOT_FOUND, 13,
         "data/*.jsonl: no file found", "fix the URI", dataset_glob_no_match),
    Case("dataset-pvc-path-missing", "pvc:// path missing on the mounted claim", NOT_FOUND, 13,
         "pvc://team-data/sets/train.jsonl: no file found", "fix the URI",
         dataset_pvc_missing),
    Case("dataset-s3-bucket-missing", "s3:// bucket that does not exist", NOT_FOUND, 13,
         "dataset s3://no-such-bucket/train.jsonl: bucket no-such-bucket does not exist",
         "create it or fix the URI", dataset_s3_bucket_missing),
    Case("dataset-s3-key-missing", "s3:// key that does not exist", NOT_FOUND, 13,
         "s3://bad-input/sets/train.jsonl: no object matches", "fix the URI",
         dataset_s3_key_missing),
    Case("dataset-s3-unauthorized", "s3:// dataset with a wrong secret key", UNAUTHORIZED, 14,
         "dataset s3://bad-input/sets/train.jsonl", "check AWS_ACCESS_KEY_ID and "
         "AWS_SECRET_ACCESS_KEY", dataset_s3_unauthorized),
    Case("output-s3-unauthorized", "s3:// output with a wrong secret key", UNAUTHORIZED, 14,
         "s3://bad-input/runs", "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
         output_s3_unauthorized),
    Case("dataset-hf-offline", "hf:// dataset with the Hub disabled", NOT_FOUND, 13,
         "hf://acme/support-chats: cannot load Hugging Face dataset",
         "mirror it to s3:// or a volume", dataset_hf_offline),
    Case("dataset-builtin-unknown", "builtin:// dataset that does not exist", NOT_FOUND, 13,
         "builtin://support-chats: no such built-in dataset", "known: builtin://quickstart",
         dataset_builtin_unknown),
    # Models.
    Case("model-needs-remote-code", "config.json with auto_map", Reason.MODEL_NEEDS_REMOTE_CODE,
         15, "config.json has auto_map", "set spec.model.trustRemoteCode: true",
         model_edited(_remote_code)),
    Case("model-pickle-only", "only pytorch_model.bin, no safetensors", Reason.PICKLE_REFUSED,
         16, "only pickle weights (pytorch_model.bin)", "convert them to safetensors",
         model_edited(_pickle_only), processes=(Surface.CLI,)),
    Case("model-missing-config", "a model folder without config.json", NOT_FOUND, 13,
         "no config.json", "point spec.model.uri at the folder holding config.json",
         model_edited(_remove("config.json"))),
    Case("model-without-weights", "config.json but no weights", NOT_FOUND, 13,
         "has a config.json but no weights", "upload the weights next to it",
         model_edited(_remove("model.safetensors"))),
    Case("model-config-not-json", "config.json is not JSON", NOT_FOUND, 13,
         "config.json is not valid JSON", "re-upload the model folder",
         model_edited(_break_json("{'model_type': 'llama'"))),
    Case("model-without-tokenizer", "no tokenizer files", NOT_FOUND, 13,
         "cannot load a tokenizer from", "upload them next to config.json",
         model_edited(_remove("tokenizer.json", "tokenizer_config.json"))),
    Case("model-path-missing", "spec.model.uri names no folder", NOT_FOUND, 13,
         "models/tiny does not exist", "fix spec.model.uri", model_path_missing, cli="prepare"),
    Case("model-s3-prefix-empty", "s3:// model prefix with no objects", NOT_FOUND, 13,
         "s3://bad-input/models/tiny holds no objects", "upload the model folder",
         model_s3_empty),
    Case("model-hf-offline", "hf:// model with the Hub unreachable (offline)",
         Reason.DOWNLOAD_FAILED, 41, "acme/tiny-chat@main", "mirror it to s3:// / pvc://",
         model_at("hf://acme/tiny-chat")),
    Case("model-random-not-allowed", "builtin://random/<arch> where the settings forbid it",
         Reason.INVALID_SPEC, 10, "spec.model.uri builtin://random/smollm2-135m",
         "use a real model", model_random_not_allowed, surfaces=CONFIG),
    Case("model-builtin-unknown", "builtin:// model name that does not exist",
         Reason.INVALID_SPEC, 10, "spec.model", "builtin://smollm2-135m-instruct",
         model_unknown_builtin, surfaces=SPEC),
    Case("model-revision-not-hf", "spec.model.revision on a local model", Reason.INVALID_SPEC,
         10, "spec.model.revision", "remove spec.model.revision", revision_not_hf),
    Case("sequence-longer-than-context", "maxSeqLength 1024, the model's context is 512",
         Reason.SEQUENCE_TOO_LONG, 17, "training.maxSeqLength (1024)",
         "lower training.maxSeqLength to 512", sequence_too_long, processes=(Surface.RESULT,)),
    Case("cpu-memory-insufficient", "a CPU run whose step needs more memory than it may take",
         Reason.INSUFFICIENT_MEMORY, 19, "2 GiB available (KUBETUNE_HOST_MEMORY_GIB)",
         "lower training.batchSize to", cpu_memory_insufficient, keeps_progress=True),
    # Stages and evaluation.
    Case("dpo-on-sft-data", "a DPO stage on conversation data", INVALID, 11,
         "spec.dataset", "give the stage its own dataset", dpo_on_sft_data, keeps_progress=True),
    Case("dpo-unknown-loss-type", "alignment.dpo.lossType Hinge2", Reason.INVALID_SPEC, 10,
         "spec.alignment.dpo.lossType", "Sigmoid", dpo_unknown_loss, surfaces=SPEC),
    Case("dpo-with-prefix-tuning", "a DPO stage with method PrefixTuning", Reason.INVALID_SPEC,
         10, "spec.stages", "LoRA, QLoRA or Full", dpo_with_prefix_tuning),
    Case("gate-unknown-metric", "gate on metric Accuracy", Reason.INVALID_SPEC, 10,
         "spec.evaluation.gate", "SuiteAccuracy", gate_unknown_metric, surfaces=SPEC),
    Case("gate-metric-not-computed", "gate on ROUGEL without metric ROUGE", Reason.INVALID_SPEC,
         10, "spec.evaluation", "add its family", gate_not_computed, surfaces=SPEC),
    Case("suite-malformed", "a suite file with a broken line", INVALID, 11,
         "suite.jsonl:2: invalid JSON", "fix them", suite_malformed, keeps_progress=True),
    Case("suite-missing", "a suite URI that names no file", NOT_FOUND, 13,
         "evaluation.suites[arith].uri", "fix the URI", suite_missing, keeps_progress=True),
    Case("judge-endpoint-unreachable", "evaluation.judge.endpoint refuses connections (after "
         "training)", Reason.INFRASTRUCTURE_ERROR, 42, "evaluation.judge.endpoint",
         "that the judge is running and reachable", judge_unreachable, keeps_progress=True),
    # Trainer config and job files.
    Case("trainer-config-unknown-key", "a trainer config with an unknown key",
         Reason.INVALID_SPEC, 10, "gpuMemoryGiB", "Extra inputs are not permitted",
         config_unknown_key, surfaces=CONFIG),
    Case("trainer-config-not-yaml", "a trainer config that is not YAML", Reason.INVALID_SPEC, 10,
         "trainer-config.yaml", "fix its syntax", config_not_yaml, surfaces=CONFIG),
    Case("job-file-empty", "a job file with no document", Reason.INVALID_SPEC, 10,
         "job.yaml", "the file is empty", job_file_empty, surfaces=(Surface.CLI,)),
    Case("job-file-two-jobs", "a job file with two FineTuneJobs", Reason.INVALID_SPEC, 10,
         "job.yaml", "expected one FineTuneJob, found 2", job_file_two_jobs,
         surfaces=(Surface.CLI,)),
    # Operator.
    Case("secret-missing", "credentialsSecretRef names a Secret that does not exist",
         Reason.SECRET_NOT_FOUND, None, "spec.output.credentialsSecretRef: Secret 's3-creds'",
         "kubectl create secret generic s3-creds", secret_missing, surfaces=OPERATOR),
    Case("secret-key-missing", "the Secret lacks AWS_SECRET_ACCESS_KEY", Reason.SECRET_NOT_FOUND,
         None, "has no key 'AWS_SECRET_ACCESS_KEY'", "add the key", secret_key_missing,
         surfaces=OPERATOR),
    Case("local-uri-in-cluster", "a local dataset path in a cluster job",
         Reason.LOCAL_URI_IN_CLUSTER, None, "spec.dataset.uri", "upload it to s3://",
         local_uri_in_cluster, surfaces=OPERATOR),
    Case("gpu-memory-insufficient", "Full fine-tuning of a 70B model on 24 GB GPUs",
         Reason.INSUFFICIENT_GPU_MEMORY, None, "needs ~1195 GiB of GPU memory",
         "ask for a GPU class with more memory",
         gpu_memory_insufficient, surfaces=OPERATOR),
    Case("gpu-class-unknown", "resources.gpuClass not in the operator settings",
         Reason.INVALID_SPEC, None, "spec.resources.gpuClass", "use one of them",
         gpu_class_unknown, surfaces=OPERATOR),
    # Serving.
    Case("adapter-dora", "serve a DoRA adapter as a LoRA adapter", Reason.ADAPTER_INCOMPATIBLE,
         None, "spec.model.variant", "deploy variant Merged", adapter_dora, surfaces=SERVING),
    Case("adapter-modules-to-save", "serve an adapter with modules_to_save",
         Reason.ADAPTER_INCOMPATIBLE, None, "modules_to_save (lora.modulesToSave)",
         "deploy variant Merged", adapter_modules_to_save, surfaces=SERVING),
    Case("adapter-rank-over-limit", "adapter rank 64 with vllm.maxLoraRank 16",
         Reason.ADAPTER_INCOMPATIBLE, None, "rank 64", "raise spec.vllm.maxLoraRank to 64",
         adapter_rank_over_limit, surfaces=SERVING),
    Case("adapter-other-base", "a multi-LoRA adapter trained on another base model",
         Reason.ADAPTER_INCOMPATIBLE, None, "spec.adapters[0].fineTuneJobRef",
         "retrain it on this one", adapter_other_base, surfaces=SERVING),
    Case("prefix-tuning-not-servable", "serve a prefix-tuning run", Reason.METHOD_NOT_SERVABLE,
         None, "method PrefixTuning", "retrain with LoRA, QLoRA or Full", prefix_not_servable,
         surfaces=SERVING),
    Case("variant-not-exported", "serve W4A16 from a run that was not quantized",
         Reason.VARIANT_NOT_AVAILABLE, None, "spec.model.variant", "add it to the job's export",
         variant_not_exported, surfaces=SERVING),
    Case("serving-local-run", "serve a run from a local path", Reason.LOCAL_URI_IN_CLUSTER,
         None, "spec.model.uri", "upload the run to s3://", serving_local_run, surfaces=SERVING),
)  # fmt: skip
"""Every case, in the order of docs/reliability.md."""


def case_ids() -> list[str]:
    return [case.id for case in CASES]
