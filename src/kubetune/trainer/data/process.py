"""The per-row part of the data stage, run in worker processes.

For each raw row, in the documented order: convert to the data contract → normalize →
structural checks (invalid) → token length → garbage → max turns → PII redaction → exact
and near-duplicate keys. Deduplication itself and the split happen in the main process.

Results travel back to the main process as small tuples: a kept row carries its output
line already encoded as JSON (all but the id, which dedup assigns), so the main process
only joins strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class Kept(NamedTuple):
    """A row that survived the per-row filters."""

    record: str
    """The output line without its id: `{"messages":…,"tokens":57,"source":"f.jsonl:3"}`."""

    tokens: int
    exact: bytes
    bands: tuple[int, ...] | None
    redaction: tuple[int, int, int] | None
    """(emails, phones, secrets) replaced, or None when nothing was."""

    def line(self, example_id: str) -> str:
        """The output line (JSON, newline-terminated) under this id; the same bytes as
        `json.dumps({"id": example_id, **example, "source": where}, ensure_ascii=False,
        separators=(",", ":"))` (an id is hex digits and `-`, nothing to escape)."""
        return f'{{"id":"{example_id}",{self.record[1:]}\n'


class Dropped(NamedTuple):
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


def _parse(row: RawRow, fmt: DataFormat, settings: RowSettings) -> dict[str, Any] | Dropped:
    """Convert, normalize and check one row."""
    try:
        example = cleaning.normalize(convert(row, fmt, settings.columns, settings.system_prompt))
        cleaning.check_structure(example)
    except RowError as exc:
        return Dropped(row.where, INVALID, exc.reason, exc.detail or exc.reason)
    return example


def _filter(
    row: RawRow, example: dict[str, Any], tokens: int, settings: RowSettings
) -> Dropped | None:
    """Length, garbage and turn filters, in the documented order."""
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
    return None


def _kept(
    row: RawRow,
    example: dict[str, Any],
    tokens: dict[str, int],
    redaction: cleaning.Redaction,
    settings: RowSettings,
) -> Kept:
    example.update(tokens)
    canonical = cleaning.canonical_text(example)
    bands = (
        dedup.band_keys(canonical, settings.near_threshold)
        if settings.near_threshold is not None
        else None
    )
    record = json.dumps({**example, "source": row.where}, ensure_ascii=False, separators=(",", ":"))
    found = (redaction.emails, redaction.phones, redaction.secrets) if redaction.total else None
    return Kept(record, tokens["tokens"], dedup.exact_key(canonical), bands, found)


def _token_counts(
    counter: TokenCounter, parsed: list[tuple[int, RawRow, dict[str, Any]]]
) -> list[dict[str, int] | str]:
    """Token counts of the parsed rows, in order. A chat template may refuse a conversation
    (`raise_exception`, e.g. roles that do not alternate): that row gets the template's
    message instead, and the others are counted one by one."""
    from jinja2 import TemplateError

    examples = [e for _, _, e in parsed]
    try:
        return list(counter.count_many(examples))
    except TemplateError:
        pass
    counts: list[dict[str, int] | str] = []
    for example in examples:
        try:
            counts.append(counter.count_many([example])[0])
        except TemplateError as exc:
            counts.append(
                f"the chat template refuses this conversation ({exc.message or exc}); fix the "
                "row, or set dataset.chatTemplate to a template that accepts it"
            )
    return counts


def token_counter(settings: RowSettings) -> TokenCounter:
    """The token counter of these settings, loaded once per process (a process forked after
    this call inherits it)."""
    return _counter(settings)


def process_chunk(
    chunk: list[RawRow | BadRow], fmt: DataFormat, settings: RowSettings
) -> list[Kept | Dropped]:
    """A chunk of rows through every per-row step, results in input order (the unit of
    work sent to a worker; token counts are one batched tokenizer call)."""
    counter = _counter(settings)
    results: list[Kept | Dropped | None] = [None] * len(chunk)
    parsed: list[tuple[int, RawRow, dict[str, Any]]] = []
    for index, row in enumerate(chunk):
        if isinstance(row, BadRow):
            results[index] = Dropped(row.where, INVALID, row.reason, row.detail)
            continue
        example = _parse(row, fmt, settings)
        if isinstance(example, Dropped):
            results[index] = example
        else:
            parsed.append((index, row, example))
    survivors: list[tuple[int, RawRow, dict[str, Any], dict[str, int], cleaning.Redaction]] = []
    for (index, row, example), tokens in zip(parsed, _token_counts(counter, parsed), strict=True):
        if isinstance(tokens, str):
            results[index] = Dropped(row.where, INVALID, "chat-template", tokens)
            continue
        dropped = _filter(row, example, tokens["tokens"], settings)
        if dropped is not None:
            results[index] = dropped
            continue
        redaction = cleaning.Redaction()
        if settings.redact_pii:
            example, redaction = cleaning.redact(example)
        survivors.append((index, row, example, tokens, redaction))
    redacted = [i for i, item in enumerate(survivors) if item[4].total]
    for position, tokens in zip(
        redacted, counter.count_many([survivors[i][2] for i in redacted]), strict=True
    ):
        index, row, example, _, redaction = survivors[position]
        survivors[position] = (index, row, example, tokens, redaction)
    for index, row, example, tokens, redaction in survivors:
        results[index] = _kept(row, example, tokens, redaction, settings)
    return [r for r in results if r is not None]
