"""The data stage: raw sources → `train.jsonl`, `val.jsonl`, `report.json`, a histogram.

Reads top to bottom like the stage (docs/data.md): expand sources → detect formats →
per-row work in worker processes (convert, normalize, check, filter, redact, hash) →
dedup in input order → split → write. Memory stays bounded: rows stream through a window
of chunks, kept examples are spooled to disk, and the main process keeps only hashes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.dataset import (
    DataFilters,
    DataFormat,
    DatasetSpec,
    DedupMode,
    InvalidRowPolicy,
    PIIRedaction,
    ValidationSplit,
)
from kubetune.trainer.data import formats, report
from kubetune.trainer.data.dedup import DedupStats, NearDuplicateIndex, RunHits, bands_for
from kubetune.trainer.data.process import (
    INVALID,
    Dropped,
    Kept,
    RowSettings,
    process_chunk,
    token_counter,
)
from kubetune.trainer.data.rows import BadRow, RawRow, RowError
from kubetune.trainer.data.sources import DataSourceError, SourceFile, expand, read_rows
from kubetune.trainer.resolve.tokenizer import chat_template_override

DEFAULT_VALIDATION_FRACTION = 0.05
DETECT_SAMPLE = 50


class DataStageError(Exception):
    """The data stage cannot produce a usable dataset; carries the contract reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreparedData:
    """What the data stage wrote."""

    train: Path
    validation: Path
    report: Path
    histogram: Path
    family: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Source:
    file: SourceFile
    fmt: DataFormat
    reason: str
    rows: Iterator[RawRow | BadRow]


def _open_sources(
    uris: list[str], spec: DatasetSpec, columns: formats.Columns, cache_dir: Path
) -> list[_Source]:
    opened: list[_Source | SourceFile] = []
    for uri in uris:
        for file in expand(uri, cache_dir):
            rows = read_rows(file, spec.revision)
            if spec.format != DataFormat.AUTO:
                opened.append(_Source(file, spec.format, "set in dataset.format", rows))
                continue
            head = list(itertools.islice(rows, DETECT_SAMPLE))
            if not head:
                opened.append(file)  # nothing to detect: it takes the others' format
                continue
            try:
                fmt, why = formats.detect((r for r in head if isinstance(r, RawRow)), columns)
            except RowError as exc:
                raise DataStageError(Reason.DATASET_INVALID, f"{file.uri}: {exc.detail}") from exc
            opened.append(_Source(file, fmt, why, itertools.chain(head, rows)))
    fallback = next((s.fmt for s in opened if isinstance(s, _Source)), DataFormat.TEXT)
    return [
        s if isinstance(s, _Source) else _Source(s, fallback, "empty file", iter(()))
        for s in opened
    ]


def _settings(spec: DatasetSpec, tokenizer_dir: Path, max_seq_length: int) -> RowSettings:
    filters = spec.filters or DataFilters()
    return RowSettings(
        columns=formats.Columns.from_spec(spec.columns),
        system_prompt=spec.system_prompt,
        min_tokens=filters.min_tokens,
        max_tokens=min(filters.max_tokens or max_seq_length, max_seq_length),
        max_non_printable_ratio=parse_decimal(filters.max_non_printable_ratio),
        max_repetition_ratio=parse_decimal(filters.max_repetition_ratio),
        max_turns=filters.max_turns,
        redact_pii=filters.pii_redaction == PIIRedaction.REDACT,
        near_threshold=(
            parse_decimal(filters.near_dedup_threshold) if filters.dedup == DedupMode.NEAR else None
        ),
        tokenizer_dir=str(tokenizer_dir),
        chat_template=chat_template_override(spec.chat_template),
    )


def _chunks(
    sources: list[_Source], size: int
) -> Iterator[tuple[int, DataFormat, list[RawRow | BadRow]]]:
    for index, source in enumerate(sources):
        while chunk := list(itertools.islice(source.rows, size)):
            yield index, source.fmt, chunk


def _results(
    sources: list[_Source], settings: RowSettings, workers: int, chunk_size: int
) -> Iterator[tuple[int, list[Kept | Dropped]]]:
    """Processed chunks of rows in input order, with a bounded window of chunks in flight."""
    chunks = _chunks(sources, chunk_size)
    first = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(first, chunks)
    if workers <= 1 or len(first) < 2:  # one chunk: no work to share, no pool to start
        for index, fmt, chunk in chunks:
            yield index, process_chunk(chunk, fmt, settings)
        return
    window = workers * 3
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future[list[Kept | Dropped]]]] = deque()
        for index, fmt, chunk in chunks:
            pending.append((index, pool.submit(process_chunk, chunk, fmt, settings)))
            if len(pending) >= window:
                done_index, future = pending.popleft()
                yield done_index, future.result()
        for done_index, future in pending:
            yield done_index, future.result()


class _Deduplicator:
    """Exact and near duplicates across everything seen so far, first occurrence wins."""

    def __init__(self, mode: DedupMode, near_threshold: float | None) -> None:
        self.mode = mode
        self.exact: dict[bytes, str] = {}
        self.near = (
            NearDuplicateIndex(len(bands_for(near_threshold)))
            if near_threshold is not None
            else None
        )
        self.stats = DedupStats()

    def look_up_chunk(self, results: list[Kept | Dropped]) -> list[RunHits | None]:
        """Look up a chunk's near-duplicate keys at once (see NearDuplicateIndex)."""
        if self.near is None or self.mode == DedupMode.NONE:
            return [None] * len(results)
        return self.near.lookup_runs([r.bands if isinstance(r, Kept) else None for r in results])

    def check(self, kept: Kept, example_id: str, in_runs: RunHits | None) -> tuple[str, str] | None:
        """(kind, id of the kept original) if a duplicate, else None (and remember it)."""
        if self.mode == DedupMode.NONE:
            return None
        original = self.exact.get(kept.exact)
        if original is not None:
            return "exact", original
        if self.near is not None and kept.bands is not None:
            near = self.near.check_and_add(kept.bands, example_id, in_runs)
            if near is not None:
                return "near", near
        self.exact[kept.exact] = example_id
        return None


def _example_id(exact: bytes, seen: set[str]) -> str:
    base = exact.hex()[:16]
    candidate, n = base, 1
    while candidate in seen:
        n += 1
        candidate = f"{base}-{n}"
    seen.add(candidate)
    return candidate


def _split_key(seed: int, example_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "big")


@dataclass
class _Collected:
    path: Path
    count: int
    tokens: array[int]
    keys: array[int]
    family: str


PII_KINDS = ("emails", "phones", "secrets")


def _collect(
    sources: list[_Source],
    spec: DatasetSpec,
    settings: RowSettings,
    dedup: _Deduplicator,
    tally: report.Tally,
    out: Path,
    *,
    seed: int,
    workers: int,
    chunk_size: int,
    limit: int | None,
) -> _Collected:
    families = {formats.family(s.fmt) for s in sources}
    if len(families) > 1:
        detail = ", ".join(f"{s.file.uri}: {s.fmt.value}" for s in sources)
        raise DataStageError(
            Reason.DATASET_INVALID,
            f"sources mix conversation, preference and text data ({detail}); use one kind per "
            "dataset (a stage's own dataset can hold preference pairs)",
        )
    first = len(tally.sources)
    tally.sources.extend(report.SourceStats(s.file.uri, s.fmt.value, s.reason) for s in sources)
    collected = _Collected(out, 0, array("q"), array("Q"), families.pop() if families else "")
    seen_ids: set[str] = set()
    fail_on_invalid = spec.on_invalid == InvalidRowPolicy.FAIL
    with out.open("w", encoding="utf-8") as handle:
        for index, results in _results(sources, settings, workers, chunk_size):
            stats = tally.sources[first + index]
            kept_before = collected.count
            for result, in_runs in zip(results, dedup.look_up_chunk(results), strict=True):
                stats.rows += 1
                if isinstance(result, Dropped):
                    if result.stage == INVALID:
                        stats.invalid += 1
                        tally.invalid[result.reason] += 1
                        if fail_on_invalid:
                            raise DataStageError(
                                Reason.DATASET_INVALID,
                                f"{result.where}: {result.message} (dataset.onInvalid is Fail; "
                                "set it to Skip to skip and count such rows)",
                            )
                    else:
                        stats.filtered += 1
                        tally.filtered[result.reason] += 1
                    tally.problem(f"{result.where}: {result.message}")
                    continue
                example_id = _example_id(result.exact, seen_ids)
                duplicate = dedup.check(result, example_id, in_runs)
                if duplicate is not None:
                    kind, original = duplicate
                    stats.duplicates += 1
                    tally.duplicates[kind] += 1
                    dedup.stats.record(original, example_id)
                    continue
                if result.redaction is not None:
                    for kind, replaced in zip(PII_KINDS, result.redaction, strict=True):
                        tally.pii[kind] += replaced
                stats.kept += 1
                handle.write(result.line(example_id))
                collected.count += 1
                collected.tokens.append(result.tokens)
                collected.keys.append(_split_key(seed, example_id))
                if limit is not None and collected.count >= limit:
                    break
            if collected.count > kept_before:
                for kind in PII_KINDS:
                    tally.pii[kind] += 0  # the report lists every kind once a row is kept
            if limit is not None and collected.count >= limit:
                break
    return collected


def _validation_count(split: ValidationSplit, n: int) -> int:
    if n < 2:
        return 0
    if split.count is not None:
        wanted = split.count
    else:
        fraction = (
            parse_decimal(split.fraction)
            if split.fraction is not None
            else DEFAULT_VALIDATION_FRACTION
        )
        wanted = round(fraction * n)
    return max(1, min(wanted, n - 1))


def _write_split(
    collected: _Collected, k: int, train: Path, validation: Path
) -> tuple[list[int], list[int]]:
    # The k-th smallest key (a partial sort; `collected.keys` is an array of uint64).
    threshold = (
        int(np.partition(np.frombuffer(collected.keys, dtype=np.uint64), k - 1)[k - 1]) if k else -1
    )
    train_tokens: list[int] = []
    val_tokens: list[int] = []
    with (
        collected.path.open(encoding="utf-8") as source,
        train.open("w", encoding="utf-8") as train_out,
        validation.open("w", encoding="utf-8") as val_out,
    ):
        for line, key, tokens in zip(source, collected.keys, collected.tokens, strict=True):
            if key <= threshold:
                val_out.write(line)
                val_tokens.append(tokens)
            else:
                train_out.write(line)
                train_tokens.append(tokens)
    return train_tokens, val_tokens


def _copy_tokens(collected: _Collected, to: Path) -> list[int]:
    collected.path.replace(to)
    return list(collected.tokens)


def _fail_if_too_invalid(spec: DatasetSpec, tally: report.Tally) -> None:
    invalid = sum(tally.invalid.values())
    rows = tally.rows
    limit = parse_decimal(spec.max_invalid_fraction)
    if rows and invalid / rows > limit:
        shown = "; ".join(tally.problems[:5])
        raise DataStageError(
            Reason.DATASET_INVALID,
            f"{invalid} of {rows} rows are invalid ({invalid / rows:.1%} > maxInvalidFraction "
            f"{limit:g}): fix or remove them, set dataset.format and dataset.columns if they "
            f"are mapped wrongly, or raise dataset.maxInvalidFraction; first problems: {shown}",
        )


_FILTER_ADVICE = {
    "too-long": "raise dataset.filters.maxTokens or training.maxSeqLength",
    "too-short": "lower dataset.filters.minTokens",
    "non-printable": "raise dataset.filters.maxNonPrintableRatio",
    "repetitive": "raise dataset.filters.maxRepetitionRatio",
    "too-many-turns": "raise dataset.filters.maxTurns",
}


def _fail_if_empty(tally: report.Tally, collected: _Collected) -> None:
    """DatasetEmpty when nothing is left, saying which step removed the rows."""
    if collected.count:
        return
    if not tally.rows:
        files = ", ".join(s.uri for s in tally.sources) or "the dataset"
        verb = "hold" if len(tally.sources) > 1 else "holds"
        raise DataStageError(
            Reason.DATASET_EMPTY,
            f"no rows to train on: {files} {verb} no records; point dataset.uri at the data "
            "(a file, a directory or a glob) or fill the file",
        )
    advice = sorted({_FILTER_ADVICE.get(r, "") for r in tally.filtered} - {""})
    advice = advice or ["check dataset.format, dataset.columns and dataset.filters"]
    raise DataStageError(
        Reason.DATASET_EMPTY,
        f"no example survived ({tally.rows} rows read; invalid {dict(tally.invalid)}, "
        f"filtered {dict(tally.filtered)}, duplicates {dict(tally.duplicates)}): "
        f"{'; '.join(advice)}",
    )


def _check_tokenizer(spec: DatasetSpec, settings: RowSettings) -> None:
    """Load the tokenizer in this process before any row is read: a folder without a
    tokenizer, or a chat template that does not compile, fails the stage here with its
    reason (worker processes forked later reuse the loaded tokenizer)."""
    from jinja2 import TemplateError, TemplateSyntaxError

    counter = token_counter(settings)
    probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    try:
        counter.tokenizer.apply_chat_template([probe], tokenize=False)
    except TemplateSyntaxError as exc:
        where = f"line {exc.lineno}: {exc.message}"
        if spec.chat_template is not None and spec.chat_template.jinja is not None:
            raise DataStageError(
                Reason.INVALID_SPEC,
                f"dataset.chatTemplate.jinja does not compile ({where}); fix the template, or "
                "use dataset.chatTemplate.preset (ChatML or Alpaca)",
            ) from exc
        raise DataStageError(
            Reason.INVALID_SPEC,
            f"the chat template of {settings.tokenizer_dir} does not compile ({where}); set "
            "dataset.chatTemplate (preset ChatML or Alpaca, or your own jinja)",
        ) from exc
    except TemplateError:
        pass  # a template that refuses some conversations is judged row by row


def template_source(spec: DatasetSpec, tokenizer_dir: Path) -> str:
    """Which chat template renders conversations: Model, ChatMLFallback, ChatML, Alpaca or
    Jinja (for the report)."""
    if spec.chat_template is not None:
        if spec.chat_template.jinja is not None:
            return "Jinja"
        if spec.chat_template.preset.value != "Model":
            return spec.chat_template.preset.value
    if (tokenizer_dir / "chat_template.jinja").is_file():
        return "Model"
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template"):
        return "Model"
    return "ChatMLFallback"


def file_digest(*paths: Path) -> str:
    """sha256 over the bytes of the files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def prepare_dataset(
    spec: DatasetSpec,
    *,
    tokenizer_dir: Path,
    max_seq_length: int,
    out_dir: Path,
    work_dir: Path,
    workers: int | None = None,
    chunk_size: int = 256,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Run the data stage for one dataset spec; writes into out_dir."""
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = work_dir / "sources"
    columns = formats.Columns.from_spec(spec.columns)
    settings = _settings(spec, tokenizer_dir, max_seq_length)
    _check_tokenizer(spec, settings)
    filters = spec.filters or DataFilters()
    split = spec.validation or ValidationSplit()
    tally = report.Tally()
    dedup = _Deduplicator(filters.dedup, settings.near_threshold)
    common = {"seed": split.seed, "workers": workers, "chunk_size": chunk_size}
    try:
        explicit_validation = None
        if split.uri is not None:
            val_sources = _open_sources([split.uri], spec, columns, cache_dir)
            explicit_validation = _collect(
                val_sources,
                spec,
                settings,
                dedup,
                tally,
                work_dir / "val.spool",
                limit=None,
                **common,
            )
        uris = [spec.uri] if spec.uri is not None else list(spec.uris or [])
        sources = _open_sources(uris, spec, columns, cache_dir)
        for source in sources:
            log(f"{source.file.uri}: {source.fmt.value} ({source.reason})")
        collected = _collect(
            sources,
            spec,
            settings,
            dedup,
            tally,
            work_dir / "train.spool",
            limit=spec.max_examples,
            **common,
        )
    except DataSourceError as exc:
        raise DataStageError(exc.reason, str(exc)) from exc
    _fail_if_too_invalid(spec, tally)
    _fail_if_empty(tally, collected)
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    if explicit_validation is not None:
        if explicit_validation.family != collected.family:
            raise DataStageError(
                Reason.DATASET_INVALID,
                f"dataset.validation.uri holds {explicit_validation.family} data but the "
                f"training data is {collected.family}; point validation.uri at data of the "
                "same kind, or remove it to split the training data",
            )
        train_tokens = _copy_tokens(collected, train_path)
        val_tokens = _copy_tokens(explicit_validation, val_path)
        split_info: dict[str, Any] = {"method": "uri", "uri": split.uri}
    else:
        k = _validation_count(split, collected.count)
        train_tokens, val_tokens = _write_split(collected, k, train_path, val_path)
        collected.path.unlink()
        method = "count" if split.count is not None else "fraction"
        split_info = {"method": method, "seed": split.seed, "validation": k}
        if split.fraction is not None or split.count is None:
            split_info["fraction"] = split.fraction or str(DEFAULT_VALIDATION_FRACTION)
    histogram = report.write_histogram(train_tokens, val_tokens, out_dir / "token-lengths.png")
    summary = {
        "schemaVersion": report.REPORT_SCHEMA_VERSION,
        "family": collected.family,
        "sources": [s.to_json() for s in tally.sources],
        "counts": {
            "rows": tally.rows,
            "invalid": sum(tally.invalid.values()),
            "filtered": sum(tally.filtered.values()),
            "duplicates": sum(tally.duplicates.values()),
            "train": len(train_tokens),
            "validation": len(val_tokens),
        },
        "invalidByReason": dict(sorted(tally.invalid.items())),
        "filteredByReason": dict(sorted(tally.filtered.items())),
        "duplicatesByKind": dict(sorted(tally.duplicates.items())),
        "piiRedacted": dict(sorted(tally.pii.items())),
        "problems": tally.problems,
        "tokens": {
            "train": report.percentiles(train_tokens),
            "validation": report.percentiles(val_tokens),
        },
        "dedup": {
            "mode": filters.dedup.value,
            "nearThreshold": filters.near_dedup_threshold,
            "clusters": [
                {"kept": kept, "removed": removed}
                for kept, removed in list(dedup.stats.clusters.items())[:20]
            ],
        },
        "split": split_info,
        "maxSeqLength": max_seq_length,
        "chatTemplate": template_source(spec, tokenizer_dir),
        "digest": file_digest(train_path, val_path),
    }
    report_path = out_dir / "report.json"
    report_path.write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return PreparedData(train_path, val_path, report_path, histogram, collected.family, summary)
