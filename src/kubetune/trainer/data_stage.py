"""The data stage of a run: prepare `spec.dataset` and publish it under RUN_URI/data/.

Idempotent: a run whose `data/report.json` exists (it is uploaded last) is not prepared
again, so a restarted pod goes straight to training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1.dataset import DatasetSpec
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.training import TrainingSpec
from kubetune.storage import RunLayout, Store
from kubetune.trainer import faults
from kubetune.trainer.data.prepare import PreparedData, prepare_dataset
from kubetune.trainer.resolve.checks import check_sequence_length

DATA_FILES = ("data/train.jsonl", "data/val.jsonl", "data/token-lengths.png")


@dataclass(frozen=True)
class DataStageResult:
    """Where the prepared data is, and its report."""

    train_uri: str
    validation_uri: str
    report: dict[str, Any]
    reused: bool


def run_data_stage(
    spec: FineTuneJobSpec,
    layout: RunLayout,
    store: Store,
    *,
    tokenizer_dir: Path,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> DataStageResult:
    """Prepare the dataset once per run and publish it (report.json last). A
    `training.maxSeqLength` over the model's context length (its config.json next to the
    tokenizer) is refused first: SequenceTooLong."""
    check_context(spec, tokenizer_dir)
    report_key = layout.key(layout.DATA_REPORT)
    if store.exists(report_key):
        log(f"Data already prepared: {layout.uri_for(layout.DATA_REPORT)}")
        report = json.loads(store.get_bytes(report_key))
        return DataStageResult(
            layout.uri_for(layout.DATA_TRAIN), layout.uri_for(layout.DATA_VAL), report, True
        )
    prepared = _prepare(spec, spec.dataset, "data", tokenizer_dir, work_dir, log)
    _publish(
        store,
        layout,
        (prepared.train, layout.DATA_TRAIN),
        (prepared.validation, layout.DATA_VAL),
        (prepared.histogram, "data/token-lengths.png"),
        (prepared.report, layout.DATA_REPORT),
    )
    counts = prepared.summary["counts"]
    log(
        f"Prepared {counts['train']} training and {counts['validation']} validation examples "
        f"from {counts['rows']} rows ({counts['invalid']} invalid, {counts['filtered']} "
        f"filtered, {counts['duplicates']} duplicates)"
    )
    log_skipped(prepared.summary, layout.uri_for(layout.DATA_REPORT), log)
    return DataStageResult(
        layout.uri_for(layout.DATA_TRAIN), layout.uri_for(layout.DATA_VAL), prepared.summary, False
    )


def check_context(spec: FineTuneJobSpec, model_dir: Path) -> None:
    """Refuse a `training.maxSeqLength` the model's positions cannot hold, before any data
    is read or weight loaded (the model folder's config.json; none: nothing to check)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # model resolution reports a broken config.json
    if isinstance(config, dict):
        max_seq_length = (spec.training or TrainingSpec()).max_seq_length
        check_sequence_length(config, max_seq_length, spec.model.uri)


EVAL_DATA = "data/eval.jsonl"
EVAL_REPORT = "data/eval-report.json"


def run_eval_data_stage(
    spec: FineTuneJobSpec,
    layout: RunLayout,
    store: Store,
    *,
    tokenizer_dir: Path,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> bool:
    """Prepare `evaluation.evalDataset` (same cleaning, every kept row, no split) once per
    run and publish it as data/eval.jsonl (its report last). False when there is none."""
    evaluation = spec.evaluation
    if evaluation is None or evaluation.eval_dataset is None:
        return False
    if store.exists(layout.key(EVAL_REPORT)):
        return True
    prepared = _prepare(spec, evaluation.eval_dataset, "eval-data", tokenizer_dir, work_dir, log)
    # The preparation splits off a validation part; an evaluation set wants every row.
    combined = work_dir / "eval-data" / "eval.jsonl"
    with combined.open("wb") as out:
        for part in (prepared.train, prepared.validation):
            out.write(part.read_bytes())
    _publish(store, layout, (combined, EVAL_DATA), (prepared.report, EVAL_REPORT))
    counts = prepared.summary["counts"]
    log(
        f"Prepared {counts['train'] + counts['validation']} evaluation examples from "
        f"{counts['rows']} rows of evaluation.evalDataset"
    )
    return True


def run_stage_data_stage(
    spec: FineTuneJobSpec,
    index: int,
    name: str,
    layout: RunLayout,
    store: Store,
    *,
    tokenizer_dir: Path,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[str, str, dict[str, Any]]:
    """Prepare `spec.stages[index].dataset` once per run under data/<name>/ (report last);
    returns the run-relative train and validation paths and the report."""
    stage = spec.stages[index]
    assert stage.dataset is not None
    folder = f"data/{name}/"
    train, validation, report_key = (
        folder + "train.jsonl",
        folder + "val.jsonl",
        folder + "report.json",
    )
    if store.exists(layout.key(report_key)):
        return train, validation, json.loads(store.get_bytes(layout.key(report_key)))
    prepared = _prepare(spec, stage.dataset, f"data-{name}", tokenizer_dir, work_dir, log)
    _publish(
        store,
        layout,
        (prepared.train, train),
        (prepared.validation, validation),
        (prepared.report, report_key),
    )
    counts = prepared.summary["counts"]
    log(
        f"Prepared {counts['train']} training and {counts['validation']} validation examples "
        f"for stage {name} (spec.stages[{index}].dataset)"
    )
    log_skipped(prepared.summary, layout.uri_for(report_key), log)
    return train, validation, prepared.summary


SKIPPED_SHOWN = 5
"""Skipped rows shown in the log; data/report.json counts them all and lists the first."""


def log_skipped(summary: dict[str, Any], report_uri: str, log: Callable[[str], None]) -> None:
    """The first rows the data stage skipped (invalid or filtered), each with its file:line,
    so that no row disappears without a word."""
    shown = (summary.get("problems") or [])[:SKIPPED_SHOWN]
    for problem in shown:
        log(f"  skipped {problem}")
    counts = summary.get("counts") or {}
    more = int(counts.get("invalid", 0)) + int(counts.get("filtered", 0)) - len(shown)
    if more > 0:
        log(f"  … and {more} more (counted in {report_uri})")


def _prepare(
    spec: FineTuneJobSpec,
    dataset: DatasetSpec,
    folder: str,
    tokenizer_dir: Path,
    work_dir: Path,
    log: Callable[[str], None],
) -> PreparedData:
    """One dataset through the data stage, into work_dir/<folder>."""
    return prepare_dataset(
        dataset,
        tokenizer_dir=tokenizer_dir,
        max_seq_length=(spec.training or TrainingSpec()).max_seq_length,
        out_dir=work_dir / folder,
        work_dir=work_dir / f"{folder}-work",
        log=log,
    )


def _publish(store: Store, layout: RunLayout, *files: tuple[Path, str]) -> None:
    """Upload (local file, run-relative key) pairs in order: the report goes last."""
    for index, (local, key) in enumerate(files):
        faults.reach("data", index)
        store.put_file(local, layout.key(key))
