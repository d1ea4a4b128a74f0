"""The files of RUN_URI/eval/: metrics.json, samples.jsonl and report.html.

metrics.json holds every number (base, tuned, delta, gate, judge counts, suites, quantized
variants, what was skipped and why); samples.jsonl one record per evaluated conversation
with both models' answers side by side (the human-review aid); report.html renders both
with the training log and the data report. docs/evaluation.md documents the schemas.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.v1alpha1.evaluation import EvaluationSpec
from kubetune.report import render_unpublished
from kubetune.storage import ObjectInfo, RunLayout, Store
from kubetune.trainer import faults
from kubetune.trainer.eval_stage import BASE_SCORES, EvalInputs, ModelScores, lm_eval_skipped
from kubetune.trainer.evaluate import GateOutcome, normalize_answer
from kubetune.trainer.export_stage import ExportResult

if TYPE_CHECKING:
    from kubetune.trainer.scoring.judge import JudgeResult

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EvalRecord:
    """Everything evaluation and export measured in one run."""

    inputs: EvalInputs
    base: ModelScores
    tuned: ModelScores
    gate: list[GateOutcome]
    judged: JudgeResult | None
    exported: ExportResult
    lineage: dict[str, Any]
    evaluation: EvaluationSpec


def metrics_document(record: EvalRecord) -> dict[str, Any]:
    """The content of eval/metrics.json."""
    base, tuned = record.base.metrics, record.tuned.metrics
    document: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "source": record.inputs.source,
        "examples": len(record.inputs.examples),
        "base": base,
        "tuned": tuned,
        "delta": {k: tuned[k] - base[k] for k in tuned if k in base},
        "gate": [
            {
                "rule": o.rule.model_dump(by_alias=True, mode="json"),
                "value": o.value,
                "passed": o.passed,
            }
            for o in record.gate
        ],
        "gatePassed": record.lineage.get("gatePassed"),
    }
    if record.judged is not None:
        document["judge"] = record.judged.counts()
    suites = {
        name: {"base": record.base.suites.get(name), "tuned": result}
        for name, result in record.tuned.suites.items()
    }
    if suites:
        document["suites"] = {
            name: {side: _suite_summary(r) for side, r in sides.items() if r}
            for name, sides in suites.items()
        }
    if record.exported.quantized:
        document["quantized"] = record.exported.quantized
    if record.exported.merged:
        document["merged"] = record.exported.merged
    skipped = {f"LMEval/{task}": why for task, why in lm_eval_skipped(record.evaluation).items()}
    if skipped:
        document["skipped"] = skipped
    return document


def _suite_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "predictions"}


def sample_records(record: EvalRecord) -> Iterator[dict[str, Any]]:
    """One record per evaluated conversation: prompt, reference, both answers."""
    base, tuned = record.base.answers, record.tuned.answers
    for index, example in enumerate(record.inputs.conversations):
        reference = example["messages"][-1]["content"]
        out: dict[str, Any] = {
            "id": example.get("id"),
            "prompt": example["messages"][:-1],
            "reference": reference,
            "base": base[index] if index < len(base) else None,
            "tuned": tuned[index] if index < len(tuned) else None,
        }
        out["exactMatch"] = {
            side: normalize_answer(answer) == normalize_answer(reference)
            for side in ("base", "tuned")
            if isinstance(answer := out[side], str)
        }
        if record.judged is not None:
            out["judge"] = record.judged.sample_details(index)
        yield out


def publish_eval(
    store: Store,
    layout: RunLayout,
    work_dir: Path,
    record: EvalRecord,
    local_files: dict[str, Path],
    *,
    uploaded: list[ObjectInfo],
    created_at: datetime,
    stages: list[dict[str, Any]] | None = None,
) -> list[ObjectInfo]:
    """Write and upload eval/metrics.json, eval/samples.jsonl, eval/suites.jsonl (per-item
    suite predictions) and eval/report.html; `local_files` maps run-relative paths the
    report reads (logs/train.jsonl, data/…) to local copies; those are uploaded too
    unless already in the store. `uploaded` (the run's files so far) and `created_at` (the
    manifest's time) go into the report's artifacts table and header; `stages` (the chain's
    per-stage records) into its Stages section."""
    folder = work_dir / "eval"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with (folder / "samples.jsonl").open("w", encoding="utf-8") as handle:
        for sample in sample_records(record):
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    names = ["samples.jsonl", "metrics.json"]
    if record.tuned.suites:
        names.append("suites.jsonl")
        with (folder / "suites.jsonl").open("w", encoding="utf-8") as handle:
            for side, scores in (("base", record.base), ("tuned", record.tuned)):
                for name, result in scores.suites.items():
                    for item in result.get("predictions", []):
                        line = {"suite": name, "model": side, **item}
                        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    document = metrics_document(record)
    (folder / "metrics.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    uploads = [(folder / name, f"eval/{name}") for name in names]
    uploads += [
        (path, relative) for relative, path in local_files.items() if relative.startswith("logs/")
    ]
    infos = [
        _upload(store, layout, path, relative, index)
        for index, (path, relative) in enumerate(uploads)
    ]
    paths = {f"eval/{name}": folder / name for name in names} | local_files
    html = render_unpublished(
        layout,
        paths,
        lineage=record.lineage,
        created_at=created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        files=[*uploaded, *infos],
        stages=stages,
    )
    (folder / "report.html").write_text(html, encoding="utf-8")
    infos.append(_upload(store, layout, folder / "report.html", layout.EVAL_REPORT, len(infos)))
    # `list` takes a folder: eval/base.json is found by listing eval/.
    base_key = layout.key(BASE_SCORES)
    infos += [info for info in store.list(layout.key("eval/")) if info.key == base_key]
    faults.reach("manifest", 0)
    return infos


def _upload(store: Store, layout: RunLayout, path: Path, relative: str, index: int) -> ObjectInfo:
    """One file of the evaluation (`index`: files of this publication already uploaded)."""
    faults.reach("publish", index)
    return store.put_file(path, layout.key(relative))
