"""The per-row part of the data stage, run in worker processes.

For each raw row, in the documented order: convert to the data contract → normalize →
structural checks (invalid) → token length → garbage → max turns → PII redaction → exact
and near-duplicate keys. Deduplication itself and the split happen in the main process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1.dataset import DataFormat
from kubetune.trainer.data import cleaning, dedup
from kubetune.trainer.data.formats import Columns, convert
from kubetune.trainer.data.rows import BadRow, RawRow, RowError
from kubetune.trainer.data.tokens import TokenCounter

INVALID = "invalid"
FILTERED = "filtered"


@dataclass(frozen=True)
class RowSettings:
    """Everything a worker needs to process rows (picklable)."""

    columns: Columns
    system_prompt: str | None
    min_tokens: int | None
    max_tokens: int
    max_non_printable_ratio: float
    max_repetition_ratio: float
    max_turns: int | None
    redact_pii: bool
    near_threshold: float | None
    tokenizer_dir: str
    chat_template: str | None = None
    """A Jinja chat template overriding the model's (dataset.chatTemplate)."""


@dataclass(frozen=True)
class Kept:
    """A row that survived the per-row filters."""

    where: str
    example: dict[str, Any]
    exact: bytes
    bands: tuple[int, ...] | None
    redaction: cleaning.Redaction


@dataclass(frozen=True)
class Dropped:
    """A row removed by a check; `stage` is invalid (counted against onInvalid) or filtered."""

    where: str
    stage: str
    reason: str
    message: str


_COUNTER: TokenCounter | None = None


def _counter(settings: RowSettings) -> TokenCounter:
    global _COUNTER
    if (
        _COUNTER is None
        or _COUNTER.tokenizer_dir != settings.tokenizer_dir
        or _COUNTER.chat_template != settings.chat_template
    ):
        _COUNTER = TokenCounter(settings.tokenizer_dir, settings.chat_template)
    return _COUNTER


def _filtered(row: RawRow, reason: str, message: str) -> Dropped:
    return Dropped(row.where, FILTERED, reason, message)


def process_row(row: RawRow, fmt: DataFormat, settings: RowSettings) -> Kept | Dropped:
    """One row through every per-row step."""
    try:
        example = cleaning.normalize(convert(row, fmt, settings.columns, settings.system_prompt))
        cleaning.check_structure(example)
    except RowError as exc:
        return Dropped(row.where, INVALID, exc.reason, exc.detail or exc.reason)
    counter = _counter(settings)
    tokens = counter.count(example)
    if settings.min_tokens is not None and tokens < settings.min_tokens:
        return _filtered(row, "too-short", f"{tokens} tokens < minTokens {settings.min_tokens}")
    if tokens > settings.max_tokens:
        return _filtered(row, "too-long", f"{tokens} tokens > maxTokens {settings.max_tokens}")
    text = "\n".join(cleaning.texts(example))
    ratio = cleaning.non_printable_ratio(text)
    if ratio > settings.max_non_printable_ratio:
        return _filtered(row, "non-printable", f"{ratio:.0%} non-printable characters")
    ratio = cleaning.repetition_ratio(text)
    if ratio > settings.max_repetition_ratio:
        return _filtered(row, "repetitive", f"{ratio:.0%} repeated word 3-grams")
    if settings.max_turns is not None and cleaning.turn_count(example) > settings.max_turns:
        return _filtered(row, "too-many-turns", f"more than maxTurns {settings.max_turns} turns")
    redaction = cleaning.Redaction()
    if settings.redact_pii:
        example, redaction = cleaning.redact(example)
        if redaction.total:
            tokens = counter.count(example)
    example.update(counter.details(example) if "chosen" in example else {"tokens": tokens})
    canonical = cleaning.canonical_text(example)
    bands = (
        dedup.band_keys(canonical, settings.near_threshold)
        if settings.near_threshold is not None
        else None
    )
    return Kept(row.where, example, dedup.exact_key(canonical), bands, redaction)


def process_chunk(
    chunk: list[RawRow | BadRow], fmt: DataFormat, settings: RowSettings
) -> list[Kept | Dropped]:
    """A chunk of rows, in order (the unit of work sent to a worker)."""
    out: list[Kept | Dropped] = []
    for row in chunk:
        if isinstance(row, BadRow):
            out.append(Dropped(row.where, INVALID, row.reason, row.detail))
        else:
            out.append(process_row(row, fmt, settings))
    return out
