"""The row format of benchmark suites, and loading a suite file with every row checked.

One JSON object per line; blank lines are skipped:

- `id` (optional, text or integer): shown in the report; default the line number. Unique.
- The prompt, exactly one of `question` (text, sent as the user's message) or `messages`
  (a chat: a list of `{"role": "system" | "user" | "assistant", "content": text}` ending
  with a user turn; earlier assistant turns make few-shot examples).
- MultipleChoice suites: `choices`, a list of at least two distinct non-empty texts, and
  `answer`, the 0-based index of the correct choice (an integer).
- Generation suites: `answer`, the expected text, or a list of acceptable texts.
- Other keys (e.g. `subject`) are allowed and ignored.

Every row is checked before any scoring; invalid rows stop the suite with one error that
lists them as `file:line: problem` (nothing is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import SuiteType
from kubetune.trainer.data.rows import BadRow
from kubetune.trainer.data.sources import SourceFile, read_rows
from kubetune.trainer.evaluate import EvaluationError

ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 20

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question."""

    id: str
    where: str
    messages: Messages
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenerationItem:
    """A question with one or more accepted answers."""

    id: str
    where: str
    messages: Messages
    answers: tuple[str, ...]


SuiteItem = ChoiceItem | GenerationItem


class _RowProblem(ValueError):
    """A suite row that cannot be used; the message says what to fix."""


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _RowProblem(f"{what} must be non-empty text")
    return value


def _messages(row: dict[str, Any]) -> Messages:
    if ("question" in row) == ("messages" in row):
        raise _RowProblem(
            'needs exactly one of "question" (text) or "messages" (a list of {role, content})'
        )
    if "question" in row:
        return [{"role": "user", "content": _text(row["question"], '"question"')}]
    turns = row["messages"]
    if not isinstance(turns, list) or not turns:
        raise _RowProblem('"messages" must be a non-empty list of {role, content} objects')
    messages: Messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise _RowProblem(f'"messages" turn {number} needs a role: system, user or assistant')
        messages.append(
            {"role": turn["role"], "content": _text(turn.get("content"), f"turn {number} content")}
        )
    if messages[-1]["role"] != "user":
        raise _RowProblem('"messages" must end with a user turn (the question to answer)')
    return messages


def _choice_fields(row: dict[str, Any]) -> tuple[tuple[str, ...], int]:
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise _RowProblem('"choices" must be a list of at least two texts')
    texts = tuple(_text(c, f"choice {i}") for i, c in enumerate(choices))
    if len(set(texts)) != len(texts):
        raise _RowProblem('"choices" has the same text twice')
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise _RowProblem(
            f'"answer" must be the 0-based index (an integer) of the correct choice, got {answer!r}'
        )
    if not 0 <= answer < len(texts):
        raise _RowProblem(f'"answer" {answer} is not an index of the {len(texts)} choices')
    return texts, answer


def _generation_answers(row: dict[str, Any]) -> tuple[str, ...]:
    answer = row.get("answer")
    if "choices" in row:
        raise _RowProblem('"choices" belongs to MultipleChoice suites; set the suite type')
    if isinstance(answer, str):
        return (_text(answer, '"answer"'),)
    if isinstance(answer, list) and answer:
        return tuple(_text(a, f'"answer" item {i}') for i, a in enumerate(answer))
    raise _RowProblem('"answer" must be the expected text (or a non-empty list of texts)')


def parse_row(data: Any, suite_type: SuiteType, line: int, where: str) -> SuiteItem:
    """One suite row as an item.

    Raises:
        ValueError: what is wrong with the row (without its location).
    """
    if not isinstance(data, dict):
        raise _RowProblem("a row must be a JSON object")
    raw_id = data.get("id", line)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
        raise _RowProblem('"id" must be text or an integer')
    messages = _messages(data)
    if suite_type == SuiteType.MULTIPLE_CHOICE:
        choices, answer = _choice_fields(data)
        return ChoiceItem(str(raw_id), where, messages, choices, answer)
    return GenerationItem(str(raw_id), where, messages, _generation_answers(data))


def load_suite(path: Path, suite_type: SuiteType, *, name: str = "") -> list[SuiteItem]:
    """Every row of a suite file, checked.

    Raises:
        EvaluationError: DatasetInvalid listing each bad row as `file:line: problem`,
            DatasetEmpty for a file without rows.
    """
    items: list[SuiteItem] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for row in read_rows(SourceFile(str(path), path, "jsonl")):
        if isinstance(row, BadRow):
            problems.append(f"{row.where}: {row.detail}")
            continue
        try:
            item = parse_row(row.data, suite_type, row.line, row.where)
        except _RowProblem as problem:
            problems.append(f"{row.where}: {problem}")
            continue
        if item.id in first_line:
            problems.append(
                f'{row.where}: "id" {item.id} is already used on line {first_line[item.id]}'
            )
            continue
        first_line[item.id] = row.line
        items.append(item)
    label = f"suite {name!r}" if name else "suite"
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  (and {more} more)" if more > 0 else ""
        raise EvaluationError(
            Reason.DATASET_INVALID,
            f"{label} ({suite_type.value}): {len(problems)} invalid row(s); fix them "
            f"(docs/evaluation.md describes the format):\n{listed}{tail}",
        )
    if not items:
        raise EvaluationError(Reason.DATASET_EMPTY, f"{label}: {path} has no rows")
    return items
