"""What the evaluation report is drawn from: one run's metrics, samples, training log, data
report and token lengths, gathered into a `RunArtifacts`.

Two ways to fill it:

- `load_run(RUN_URI)` reads a published run through the artifact store (a local directory,
  `pvc://` or `s3://`). The manifest is required; every file the manifest lists must be in
  the store with its size, and each file the report reads is checked against its sha256
  as it is read. Only files the manifest lists are read: the report shows what the run
  published.
- `load_folder(folder, run_uri=…)` reads local files the trainer is about to upload, before
  the manifest exists, so the trainer can publish `eval/report.html` with the run.

Optional files that are absent leave their part of `RunArtifacts` empty. Nothing here
imports torch, transformers or matplotlib.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from kubetune.api.contract import Reason
from kubetune.storage import ObjectInfo, RunLayout, StorageError, Store, open_store, parse_run_uri
from kubetune.storage.errors import ObjectNotFound, RunIncomplete
from kubetune.storage.manifest import FileEntry, Manifest, verify_run
from kubetune.storage.store import CHUNK_SIZE

MAX_SAMPLES = 1000
"""Samples kept in memory (the report shows fewer; the total is still counted)."""

MAX_TOKEN_ROWS = 200_000
"""Rows of each data file read for the token-length histogram; beyond this the histogram
shows the first rows only (and says so)."""

TOKENS_FIELD = re.compile(rb'"tokens"\s*:\s*(\d+)')
"""The `tokens` count of a prepared row. A quote inside a JSON string is escaped, so this
cannot match text inside a message; `chosenTokens` does not match either."""

DATA_FILES = {"train": RunLayout.DATA_TRAIN, "validation": RunLayout.DATA_VAL}
TRAIN_LOG = "logs/train.jsonl"


class ReportError(Exception):
    """The run cannot be reported: not a run URI, no run there, incomplete (no manifest), or
    its files do not match the manifest. `kubetune report` exits with status 1.

    Attributes:
        reason: the contract reason (e.g. SourceNotFound for a missing or incomplete run).
    """

    def __init__(self, message: str, reason: Reason = Reason.SOURCE_NOT_FOUND) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TokenLengths:
    """Token counts per example of one split.

    Attributes:
        values: the `tokens` field of each row read.
        complete: False when only the first `MAX_TOKEN_ROWS` rows were read.
    """

    values: tuple[int, ...]
    complete: bool = True


@dataclass(frozen=True)
class RunArtifacts:
    """Everything the report shows about one run.

    Attributes:
        run_uri: the RUN_URI.
        run_id: the run id.
        namespace: the FineTuneJob's namespace.
        job_name: the FineTuneJob's name.
        created_at: when the run was published (the manifest's `createdAt`), if known.
        published: True when read from a published run whose files match its manifest.
        manifest_digest: `sha256:…` of the manifest, when published.
        lineage: provenance (model, stages, method, dataset digest, spec hash, gatePassed).
        metrics: `eval/metrics.json` (for runs without it, `base`/`tuned`/`delta` from the
            manifest's metrics).
        samples: the first `MAX_SAMPLES` records of `eval/samples.jsonl`.
        sample_count: how many records `eval/samples.jsonl` holds.
        train_log: the records of `logs/train.jsonl`.
        stages: the manifest's `metrics.stages`, one record per training stage
            (`{"name": "1-dpo", "type": "DPO", "steps": 6, "metrics": {…}}`).
        data_report: `data/report.json`.
        token_lengths: per split (`train`, `validation`), from the rows of the data files.
        files: the run's files (path and size; sha256 when published).
        notes: problems met while reading that did not stop the report (e.g. a bad line).
    """

    run_uri: str
    run_id: str
    namespace: str
    job_name: str
    created_at: str | None = None
    published: bool = False
    manifest_digest: str | None = None
    lineage: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    samples: tuple[Mapping[str, Any], ...] = ()
    sample_count: int = 0
    train_log: tuple[Mapping[str, Any], ...] = ()
    stages: tuple[Mapping[str, Any], ...] = ()
    data_report: Mapping[str, Any] | None = None
    token_lengths: Mapping[str, TokenLengths] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    notes: tuple[str, ...] = ()

    def file(self, path: str) -> FileEntry | None:
        """The entry of one run-relative path, if the run has it."""
        return next((f for f in self.files if f.path == path), None)


class _Source(Protocol):
    """Where run-relative files are read from."""

    def open(self, key: str) -> AbstractContextManager[BinaryIO] | None:
        """A reader of the file, or None when the run has no such file."""
        ...

    def expected(self, key: str) -> FileEntry | None:
        """The manifest entry the bytes must match, if any."""
        ...


class _StoreSource:
    """A published run: only files the manifest lists, each checked against it."""

    def __init__(self, store: Store, layout: RunLayout, manifest: Manifest) -> None:
        self.store, self.layout, self.manifest = store, layout, manifest

    def open(self, key: str) -> AbstractContextManager[BinaryIO] | None:
        if self.manifest.file(key) is None:
            return None
        try:
            return self.store.open_read(self.layout.key(key))
        except StorageError as exc:
            raise ReportError(str(exc), exc.reason) from exc

    def expected(self, key: str) -> FileEntry | None:
        return self.manifest.file(key)


class _FolderSource:
    """Local files laid out like a run (`eval/metrics.json`, …), with per-key overrides."""

    def __init__(self, folder: Path | None, paths: Mapping[str, Path]) -> None:
        self.folder, self.paths = folder, paths

    def open(self, key: str) -> AbstractContextManager[BinaryIO] | None:
        path = self.paths.get(key)
        if path is None and self.folder is not None:
            path = self.folder.joinpath(*key.split("/"))
        return path.open("rb") if path is not None and path.is_file() else None

    def expected(self, key: str) -> FileEntry | None:
        return None


def load_run(run_uri: str, *, endpoint_url: str | None = None) -> RunArtifacts:
    """Read a published run for the report.

    Args:
        run_uri: `<output root>/<namespace>/<job>/<run-id>` (local path, `file://`,
            `pvc://` or `s3://`), as printed by `kubetune run`.
        endpoint_url: S3 endpoint (MinIO, Ceph, …); default from the environment.

    Raises:
        ReportError: not a run URI, no run there, no manifest (incomplete), or a file that
            is missing or differs from the manifest (named in the message).
    """
    layout, store = open_run(run_uri, endpoint_url=endpoint_url)
    return load_published(store, layout)


def load_published(store: Store, layout: RunLayout) -> RunArtifacts:
    """`load_run` for a store already opened at `layout.output_uri`.

    Raises:
        ReportError: as `load_run`.
    """
    manifest = read_verified_manifest(store, layout)
    source = _StoreSource(store, layout, manifest)
    return _collect(
        source,
        layout,
        published=True,
        created_at=manifest.created_at,
        manifest_digest=manifest.digest,
        lineage=manifest.lineage,
        manifest_metrics=manifest.metrics,
        files=manifest.files,
    )


def load_folder(
    folder: str | Path | None,
    *,
    run_uri: str,
    lineage: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    files: Iterable[FileEntry | ObjectInfo] | None = None,
    paths: Mapping[str, str | Path] | None = None,
    stages: Iterable[Mapping[str, Any]] | None = None,
) -> RunArtifacts:
    """Read a run from local files that are about to be published (no manifest yet).

    Args:
        folder: a directory laid out like the run (`eval/metrics.json`, `data/…`); files it
            lacks are simply absent from the report. None: only `paths` are read.
        run_uri: the run's RUN_URI (gives namespace, job and run id).
        lineage: the lineage the manifest will record.
        created_at: the time to show as the run's creation time.
        files: the run's files, for the artifacts table: manifest entries, or the
            `ObjectInfo`s the store returned on upload (their keys may be output-store keys
            or run-relative). Default: the files under `folder` and in `paths`.
        paths: run-relative keys read from elsewhere, e.g.
            `{"logs/train.jsonl": work / "train.jsonl"}`.
        stages: the stage records the manifest will hold as `metrics.stages`; without
            them the Stages section shows what the lineage and the training log give.

    Raises:
        ReportError: `run_uri` is not a run URI.
    """
    layout = _parse(run_uri)
    root = Path(folder) if folder is not None else None
    overrides = {key: Path(path) for key, path in (paths or {}).items()}
    source = _FolderSource(root, overrides)
    entries = _entries(layout, files) if files is not None else _folder_entries(root, overrides)
    return _collect(
        source,
        layout,
        published=False,
        created_at=created_at,
        manifest_digest=None,
        lineage=lineage or {},
        manifest_metrics={"stages": list(stages or [])},
        files=entries,
    )


def open_run(run_uri: str, *, endpoint_url: str | None = None) -> tuple[RunLayout, Store]:
    """The layout of a RUN_URI and the store holding it.

    Raises:
        ReportError: not a run URI, or the store cannot be opened.
    """
    layout = _parse(run_uri)
    try:
        return layout, open_store(layout.output_uri, endpoint_url=endpoint_url)
    except StorageError as exc:
        raise ReportError(str(exc), exc.reason) from exc


def read_verified_manifest(store: Store, layout: RunLayout) -> Manifest:
    """The run's manifest, after checking that every file it lists is in the store with its
    size (one listing; sha256 is checked later, for the files actually read).

    Raises:
        ReportError: no run at the URI, no manifest, or files missing or of another size.
    """
    try:
        return verify_run(store, layout, check_hashes=False)
    except RunIncomplete as exc:
        if not _has_objects(store, layout):
            raise ReportError(
                f"there is no run at {layout.run_uri}: check the RUN_URI (`kubetune run` "
                "prints it last)",
                Reason.SOURCE_NOT_FOUND,
            ) from exc
        raise ReportError(str(exc), exc.reason) from exc
    except StorageError as exc:
        raise ReportError(str(exc), exc.reason) from exc


def read_verified_bytes(store: Store, layout: RunLayout, entry: FileEntry) -> bytes:
    """One published file, whole, checked against its manifest entry.

    Raises:
        ReportError: the file cannot be read or differs from the manifest.
    """
    try:
        data = store.get_bytes(layout.key(entry.path))
    except StorageError as exc:
        raise ReportError(str(exc), exc.reason) from exc
    _check_entry(layout.uri_for(entry.path), entry, len(data), hashlib.sha256(data).hexdigest())
    return data


def _parse(run_uri: str) -> RunLayout:
    try:
        return parse_run_uri(run_uri)
    except StorageError as exc:
        raise ReportError(str(exc), Reason.INVALID_SPEC) from exc


def _has_objects(store: Store, layout: RunLayout) -> bool:
    try:
        return bool(store.list(layout.prefix))
    except ObjectNotFound:
        return False


def _check_entry(uri: str, entry: FileEntry, size: int, sha256: str) -> None:
    if size != entry.size or sha256 != entry.sha256:
        raise ReportError(
            f"{uri} does not match the run's manifest ({size} bytes, the manifest says "
            f"{entry.size}; or its sha256 differs): the run was modified after publishing. "
            "Re-run the job to republish it",
            Reason.DOWNLOAD_FAILED,
        )


def _read(source: _Source, key: str, uri: str) -> bytes | None:
    """A whole file, checked against its manifest entry; None when absent."""
    reader = source.open(key)
    if reader is None:
        return None
    with reader as stream:
        data = _read_all(stream, uri)
    entry = source.expected(key)
    if entry is not None:
        _check_entry(uri, entry, len(data), hashlib.sha256(data).hexdigest())
    return data


def _read_all(stream: BinaryIO, uri: str) -> bytes:
    try:
        return stream.read()
    except StorageError as exc:
        raise ReportError(str(exc), exc.reason) from exc
    except OSError as exc:
        raise ReportError(f"could not read {uri}: {exc}", Reason.DOWNLOAD_FAILED) from exc


def _json(data: bytes | None, uri: str, notes: list[str]) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as exc:
        notes.append(f"{uri} is not valid JSON ({exc}); left out")
        return None
    if not isinstance(value, dict):
        notes.append(f"{uri} is not a JSON object; left out")
        return None
    return value


def _jsonl(
    data: bytes | None, uri: str, notes: list[str], limit: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The object records of a JSONL file (at most `limit`) and how many it holds."""
    records: list[dict[str, Any]] = []
    total = 0
    bad: list[int] = []
    for number, line in enumerate((data or b"").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            bad.append(number)
            continue
        total += 1
        if limit is None or len(records) < limit:
            records.append(record)
    if bad:
        lines = ", ".join(str(n) for n in bad[:5]) + (", …" if len(bad) > 5 else "")
        notes.append(f"{uri}: {len(bad)} line(s) are not JSON objects (line {lines}); skipped")
    return records, total


def _lines(read: Callable[[int], bytes]) -> Iterator[bytes]:
    rest = b""
    while chunk := read(CHUNK_SIZE):
        rest += chunk
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


def _token_lengths(source: _Source, key: str, uri: str) -> TokenLengths | None:
    """The `tokens` field of the first `MAX_TOKEN_ROWS` rows; sha256 checked when the whole
    file was read."""
    reader = source.open(key)
    if reader is None:
        return None
    digest = hashlib.sha256()
    values: list[int] = []
    size = 0
    complete = True
    with reader as stream:
        hashing = _Hashing(stream, digest)
        try:
            for line in _lines(hashing.read):
                if len(values) >= MAX_TOKEN_ROWS and line.strip():
                    complete = False
                    break
                match = TOKENS_FIELD.search(line)
                if match:
                    values.append(int(match.group(1)))
        except StorageError as exc:
            raise ReportError(str(exc), exc.reason) from exc
        size = hashing.size
    entry = source.expected(key)
    if entry is not None and complete:
        _check_entry(uri, entry, size, digest.hexdigest())
    return TokenLengths(tuple(values), complete)


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, stream: BinaryIO, digest: Any) -> None:
        self.stream, self.digest, self.size = stream, digest, 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _collect(
    source: _Source,
    layout: RunLayout,
    *,
    published: bool,
    created_at: str | None,
    manifest_digest: str | None,
    lineage: Mapping[str, Any],
    manifest_metrics: Mapping[str, Any],
    files: Iterable[FileEntry],
) -> RunArtifacts:
    notes: list[str] = []

    def read(key: str) -> bytes | None:
        return _read(source, key, layout.uri_for(key))

    metrics = _json(read(RunLayout.EVAL_METRICS), layout.uri_for(RunLayout.EVAL_METRICS), notes)
    if metrics is None:
        metrics = {k: v for k, v in manifest_metrics.items() if k in ("base", "tuned", "delta")}
    samples, sample_count = _jsonl(
        read(RunLayout.EVAL_SAMPLES), layout.uri_for(RunLayout.EVAL_SAMPLES), notes, MAX_SAMPLES
    )
    train_log, _ = _jsonl(read(TRAIN_LOG), layout.uri_for(TRAIN_LOG), notes)
    stages = manifest_metrics.get("stages")
    data_report = _json(read(RunLayout.DATA_REPORT), layout.uri_for(RunLayout.DATA_REPORT), notes)
    lengths = {}
    for split, key in DATA_FILES.items():
        found = _token_lengths(source, key, layout.uri_for(key))
        if found is not None and found.values:
            lengths[split] = found
    return RunArtifacts(
        run_uri=layout.run_uri,
        run_id=layout.run_id,
        namespace=layout.namespace,
        job_name=layout.job_name,
        created_at=created_at,
        published=published,
        manifest_digest=manifest_digest,
        lineage=dict(lineage),
        metrics=metrics,
        samples=tuple(samples),
        sample_count=sample_count,
        train_log=tuple(train_log),
        stages=tuple(s for s in stages if isinstance(s, Mapping))
        if isinstance(stages, list)
        else (),
        data_report=data_report,
        token_lengths=lengths,
        files=tuple(files),
        notes=tuple(notes),
    )


def _entries(layout: RunLayout, files: Iterable[FileEntry | ObjectInfo]) -> tuple[FileEntry, ...]:
    entries: dict[str, FileEntry] = {}
    for item in files:
        if isinstance(item, FileEntry):
            entries[item.path] = item
            continue
        path = item.key[len(layout.prefix) :] if item.key.startswith(layout.prefix) else item.key
        entries[path] = FileEntry(path=path, size=item.size, sha256=item.sha256 or "")
    return tuple(entries[path] for path in sorted(entries))


def _folder_entries(root: Path | None, overrides: Mapping[str, Path]) -> tuple[FileEntry, ...]:
    found: dict[str, int] = {}
    if root is not None and root.is_dir():
        for path in root.rglob("*"):
            if path.is_file():
                found[path.relative_to(root).as_posix()] = path.stat().st_size
    found.update({key: path.stat().st_size for key, path in overrides.items() if path.is_file()})
    return tuple(FileEntry(path=k, size=found[k], sha256="") for k in sorted(found))
