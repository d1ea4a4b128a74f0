"""Benchmark suites: a fixed set of questions in JSONL, scored on the base and the tuned model.

The row format is described in `suite_rows`. `evaluation.maxSamples` limits a suite to its
first rows (all rows are checked).

Scoring. MultipleChoice: each choice is scored by the sum of the log-probabilities of its
tokens as the assistant's answer (`choice_likelihood`), end-of-turn marker included (so a
choice that is a prefix of another is not favoured). The prediction is the choice with the
highest sum (`accuracy`, the suite's value) or the highest sum per UTF-8 byte of the choice
text (`accuracy_norm`, as lm-evaluation-harness's acc_norm, which does not favour short
choices). Generation: the model answers as for the other generation metrics
(evaluation.generation, greedy by default) and an answer is correct when it equals an
accepted answer after the normalization ExactMatch uses (case, runs of whitespace,
surrounding spaces and periods).

Metrics: `Suite/<name>` is a suite's accuracy (MultipleChoice also reports
`Suite/<name>/AccuracyNorm`); `SuiteAccuracy`, the gate metric, is the unweighted mean of
the suites' accuracies, so each suite counts the same whatever its size.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.uris import scheme
from kubetune.api.v1alpha1.evaluation import GateMetric, GenerationSpec, SuiteSpec, SuiteType
from kubetune.trainer.data.rows import BadRow
from kubetune.trainer.data.sources import DataSourceError, SourceFile, expand, read_rows
from kubetune.trainer.evaluate import EvaluationError, generate, normalize_answer
from kubetune.trainer.scoring.builtin_suites import builtin_suite, write_builtin_suite
from kubetune.trainer.scoring.choice_likelihood import choice_logprobs
from kubetune.trainer.scoring.suite_rows import (
    ChoiceItem,
    GenerationItem,
    Messages,
    load_suite,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SUITE_ACCURACY",
    "SuiteResult",
    "check_suite_names",
    "fetch_suite",
    "load_suite",
    "run_suite",
    "score_choices",
    "score_generations",
    "suite_metrics",
]

SUITE_ACCURACY = GateMetric.SUITE_ACCURACY.value
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SuiteResult:
    """One suite's score on one model.

    Attributes:
        name: the suite's name.
        type: how it was scored.
        accuracy: fraction of items answered correctly.
        n: items scored.
        total: items in the file (n is smaller when evaluation.maxSamples cuts it).
        accuracy_norm: MultipleChoice only: accuracy with length-normalized scores.
        predictions: one JSON-ready record per item, for the report.
    """

    name: str
    type: SuiteType
    accuracy: float
    n: int
    total: int
    accuracy_norm: float | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """`Suite/<name>` (and `Suite/<name>/AccuracyNorm` for MultipleChoice)."""
        out = {f"Suite/{self.name}": self.accuracy}
        if self.accuracy_norm is not None:
            out[f"Suite/{self.name}/AccuracyNorm"] = self.accuracy_norm
        return out


def _where(suite: SuiteSpec) -> str:
    return f"evaluation.suites[{suite.name}]"


def _local_name(suite: SuiteSpec) -> str:
    """A safe, distinct file name for a suite materialized in the work folder."""
    digest = hashlib.sha256(suite.name.encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('-', suite.name).strip('.-')[:40]}-{digest}.jsonl"


def check_suite_names(suites: Sequence[SuiteSpec]) -> None:
    """Refuse two suites with the same name (their metrics would collide)."""
    seen: set[str] = set()
    for suite in suites:
        if suite.name in seen:
            raise EvaluationError(
                Reason.INVALID_SPEC,
                f"evaluation.suites: the name {suite.name!r} is used twice; give each suite "
                "its own name",
            )
        seen.add(suite.name)


def fetch_suite(suite: SuiteSpec, work_dir: Path) -> Path:
    """The suite's JSONL file on local disk: a local file as is; a download (s3://,
    https://), a Hugging Face dataset or a built-in suite written under work_dir.

    Raises:
        EvaluationError: naming `evaluation.suites[<name>].uri`, when the URI names no
            file, several files, a file that is not JSONL, or a built-in suite scored the
            wrong way.
    """
    uri = suite.uri
    folder = work_dir
    if scheme(uri) == "builtin":
        builtin = builtin_suite(uri)
        if builtin.type != suite.type:
            raise EvaluationError(
                Reason.INVALID_SPEC,
                f"{_where(suite)}.type: {uri} is a {builtin.type.value} suite; set type: "
                f"{builtin.type.value}",
            )
        return write_builtin_suite(uri, folder / _local_name(suite))
    try:
        files = expand(uri, folder)
        if len(files) == 1 and files[0].kind == "hf":
            return _write_hf_rows(files[0], folder / _local_name(suite))
    except DataSourceError as err:
        raise EvaluationError(err.reason, f"{_where(suite)}.uri: {err}") from err
    if len(files) != 1:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{_where(suite)}.uri {uri} matches {len(files)} files; a suite is one JSONL file",
        )
    if files[0].kind != "jsonl" or files[0].path is None:
        raise EvaluationError(
            Reason.DATASET_INVALID,
            f"{_where(suite)}.uri {uri}: a suite must be a JSONL file (.jsonl, .ndjson, "
            "optionally .gz), one question per line",
        )
    return files[0].path


def _write_hf_rows(source: SourceFile, path: Path) -> Path:
    """A Hugging Face dataset's train split as JSONL (line N = record N)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in read_rows(source):
            if isinstance(row, BadRow):  # only JSONL sources yield these
                continue
            handle.write(json.dumps(row.data, ensure_ascii=False, default=str) + "\n")
    return path


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _prompt_text(messages: Messages) -> str:
    return messages[-1]["content"]


def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: SuiteSpec,
    items: Sequence[ChoiceItem],
    total: int,
    batch_size: int,
) -> SuiteResult:
    """Accuracy (sum of log-probs) and accuracy_norm (per UTF-8 byte) of MultipleChoice items."""
    logprobs = choice_logprobs(model, tokenizer, items, batch_size)
    predictions = []
    for item, sums in zip(items, logprobs, strict=True):
        normalized = [s / len(c.encode()) for s, c in zip(sums, item.choices, strict=True)]
        best, best_norm = _argmax(sums), _argmax(normalized)
        predictions.append(
            {
                "id": item.id,
                "question": _prompt_text(item.messages),
                "choices": list(item.choices),
                "answer": item.answer,
                "prediction": best,
                "predictionNorm": best_norm,
                "correct": best == item.answer,
                "correctNorm": best_norm == item.answer,
                "logprobs": [round(s, 4) for s in sums],
            }
        )
    return SuiteResult(
        name=suite.name,
        type=suite.type,
        accuracy=statistics.fmean(bool(p["correct"]) for p in predictions),
        accuracy_norm=statistics.fmean(bool(p["correctNorm"]) for p in predictions),
        n=len(items),
        total=total,
        predictions=predictions,
    )


def score_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: SuiteSpec,
    items: Sequence[GenerationItem],
    total: int,
    batch_size: int,
    generation: GenerationSpec,
) -> SuiteResult:
    """Exact-match accuracy (ExactMatch's normalization) of generated answers."""
    conversations = [
        {"messages": [*item.messages, {"role": "assistant", "content": item.answers[0]}]}
        for item in items
    ]
    answers = generate(model, tokenizer, conversations, generation, batch_size)
    predictions = []
    for item, answer in zip(items, answers, strict=True):
        correct = any(normalize_answer(answer) == normalize_answer(a) for a in item.answers)
        predictions.append(
            {
                "id": item.id,
                "question": _prompt_text(item.messages),
                "answer": list(item.answers),
                "prediction": answer,
                "correct": correct,
            }
        )
    return SuiteResult(
        name=suite.name,
        type=suite.type,
        accuracy=statistics.fmean(bool(p["correct"]) for p in predictions),
        n=len(items),
        total=total,
        predictions=predictions,
    )


def run_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: SuiteSpec,
    path: Path,
    *,
    batch_size: int,
    max_samples: int,
    generation: GenerationSpec | None,
    log: Callable[[str], None],
) -> SuiteResult:
    """Score one model on one suite (every row checked, the first max_samples scored).

    Args:
        model: the model (a PEFT model too).
        tokenizer: its tokenizer, with the chat template used in training.
        suite: the suite's spec.
        path: its JSONL file (`fetch_suite`).
        batch_size: sequences per forward pass (MultipleChoice: one per choice).
        max_samples: `evaluation.maxSamples`.
        generation: `evaluation.generation` (Generation suites; default greedy).
        log: progress lines.

    Raises:
        EvaluationError: invalid rows (DatasetInvalid, listing `file:line: problem`).
    """
    items = load_suite(path, suite.type, name=suite.name)
    chosen = items[:max_samples]
    if suite.type == SuiteType.MULTIPLE_CHOICE:
        result = score_choices(
            model,
            tokenizer,
            suite,
            [i for i in chosen if isinstance(i, ChoiceItem)],
            len(items),
            batch_size,
        )
        detail = f", accuracy_norm {result.accuracy_norm:.4f}"
    else:
        result = score_generations(
            model,
            tokenizer,
            suite,
            [i for i in chosen if isinstance(i, GenerationItem)],
            len(items),
            batch_size,
            generation or GenerationSpec(),
        )
        detail = ""
    log(f"Suite {suite.name}: accuracy {result.accuracy:.4f}{detail} ({result.n} of {len(items)})")
    return result


def suite_metrics(results: Sequence[SuiteResult]) -> dict[str, float]:
    """`SuiteAccuracy` (the unweighted mean of the suites' accuracies) and each suite's
    own values; empty without results."""
    if not results:
        return {}
    out = {SUITE_ACCURACY: statistics.fmean(r.accuracy for r in results)}
    for result in results:
        out.update(result.metrics())
    return out
