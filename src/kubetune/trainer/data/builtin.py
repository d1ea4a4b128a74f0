"""Datasets that ship with kubetune, generated deterministically (no download, no files).

`builtin://quickstart`: rewrite a date written in everyday English as ISO 8601
(`YYYY-MM-DD`). SmolLM2-135M-Instruct answers in sentences and often gets the digits
wrong; a few minutes of LoRA make it answer exactly, which exact match and ROUGE show.

`builtin://quickstart-preference`: the same task as preference pairs for DPO and reward
models: the chosen answer is the ISO date, the rejected one a typical mistake (a sentence,
day and month swapped, another format, a wrong year). Its dates are drawn with another
seed, so the pairs are not the quickstart's training rows.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
from collections.abc import Callable, Iterator

from kubetune.api.contract import Reason
from kubetune.trainer.data.rows import RawRow

QUICKSTART_ROWS = 2000
QUICKSTART_SEED = 20261129

_INSTRUCTIONS = (
    "Convert the date to ISO 8601 format (YYYY-MM-DD).",
    "Write this date in ISO 8601 form, YYYY-MM-DD.",
    "Rewrite the date as YYYY-MM-DD.",
    "Give the ISO 8601 date (YYYY-MM-DD) for the following.",
)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _spellings(date: dt.date) -> list[str]:
    month, short = calendar.month_name[date.month], calendar.month_abbr[date.month]
    weekday = calendar.day_name[date.weekday()]
    return [
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{short} {date.day}, {date.year}",
        f"the {_ordinal(date.day)} of {month}, {date.year}",
        f"{month} {_ordinal(date.day)} {date.year}",
        f"{weekday}, {month} {date.day}, {date.year}",
        f"{short}. {_ordinal(date.day)}, {date.year}",
    ]


def quickstart_rows(
    count: int = QUICKSTART_ROWS, seed: int = QUICKSTART_SEED
) -> Iterator[dict[str, str]]:
    """Alpaca rows {instruction, input, output}; the same seed gives the same rows."""
    rng = random.Random(seed)
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    for _ in range(count):
        date = dt.date.fromordinal(rng.randint(start, end))
        yield {
            "instruction": rng.choice(_INSTRUCTIONS),
            "input": rng.choice(_spellings(date)),
            "output": date.isoformat(),
        }


PREFERENCE_ROWS = 1000
PREFERENCE_SEED = 20261130


def _rejected(date: dt.date, spelled: str, rng: random.Random) -> str:
    """A plausible wrong answer: what a model that has not learned the task says."""
    mistakes = [
        f"The date {spelled} in ISO 8601 format is {date.year}.",
        f"{date.year}-{date.day:02d}-{date.month:02d}",
        f"{date.month:02d}/{date.day:02d}/{date.year}",
        f"{date.year + rng.choice((-1, 1))}-{date.month:02d}-{date.day:02d}",
        f"Sure! {spelled} is written as {date.isoformat()} in ISO 8601.",
    ]
    return rng.choice(mistakes if date.day > 12 else [m for i, m in enumerate(mistakes) if i != 1])


def quickstart_preference_rows(
    count: int = PREFERENCE_ROWS, seed: int = PREFERENCE_SEED
) -> Iterator[dict[str, str]]:
    """Preference rows {prompt, chosen, rejected}; the same seed gives the same rows."""
    rng = random.Random(seed)
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    for _ in range(count):
        date = dt.date.fromordinal(rng.randint(start, end))
        spelled = rng.choice(_spellings(date))
        yield {
            "prompt": f"{rng.choice(_INSTRUCTIONS)}\n\n{spelled}",
            "chosen": date.isoformat(),
            "rejected": _rejected(date, spelled, rng),
        }


BUILTIN_DATASETS: dict[str, Callable[[], Iterator[dict[str, str]]]] = {
    "quickstart": quickstart_rows,
    "quickstart-preference": quickstart_preference_rows,
}


def builtin_rows(uri: str) -> Iterator[RawRow]:
    """Rows of a builtin:// dataset."""
    from kubetune.trainer.data.sources import DataSourceError

    name = uri.removeprefix("builtin://")
    if name not in BUILTIN_DATASETS:
        known = ", ".join(f"builtin://{n}" for n in sorted(BUILTIN_DATASETS))
        raise DataSourceError(
            Reason.SOURCE_NOT_FOUND, f"{uri}: no such built-in dataset; known: {known}"
        )
    for number, row in enumerate(BUILTIN_DATASETS[name](), start=1):
        yield RawRow(uri, number, row)
