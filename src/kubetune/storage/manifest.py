"""`manifest.json`: the list of a run's files with sizes and sha256, written last.

A run is complete only when its manifest exists (DESIGN §5). The trainer uploads every
artifact, then calls `write_manifest`, which refuses to publish a manifest naming a file
that is not in the store or whose size differs. Readers (`kubetune fetch`, `report`,
ModelDeployments) call `read_manifest` or `verify_run`, which refuse an incomplete run and
any file that is missing or whose size or sha256 differs, naming the file.

Manifest format (schemaVersion 1), keys in this order::

    {"schemaVersion": 1, "runId": "…", "namespace": "…", "jobName": "…",
     "createdAt": "2026-01-01T00:00:00Z",
     "files": [{"path": "adapter/adapter_model.safetensors", "size": 123, "sha256": "…"}],
     "lineage": {…}, "metrics": {…}}

`files` is sorted by path; paths are relative to the run root. `lineage` and `metrics` are
free-form JSON from the caller (e.g. base model, dataset digest, gatePassed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubetune.api.contract import Reason
from kubetune.storage.errors import (
    ManifestMismatch,
    ObjectNotFound,
    RunIncomplete,
    TransferFailed,
)
from kubetune.storage.layout import RunLayout
from kubetune.storage.store import ObjectInfo, Store, iter_chunks, validate_key

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    """One file of a run or a checkpoint.

    Attributes:
        path: path relative to the run root (or to the checkpoint folder).
        size: size in bytes.
        sha256: hex digest.
    """

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed `manifest.json`.

    Attributes:
        run_id: the run id.
        namespace: the FineTuneJob's namespace.
        job_name: the FineTuneJob's name.
        created_at: RFC 3339 UTC time of writing.
        files: every file of the run, sorted by path.
        lineage: free-form provenance (base model, dataset digest, parent run, …).
        metrics: free-form results (e.g. gatePassed, ROUGEL).
        schema_version: format version.
        digest: `sha256:<hex>` of the stored bytes.
    """

    run_id: str
    namespace: str
    job_name: str
    created_at: str
    files: tuple[FileEntry, ...]
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    digest: str = ""

    def to_bytes(self) -> bytes:
        """The JSON document, UTF-8, with a trailing newline."""
        document = {
            "schemaVersion": self.schema_version,
            "runId": self.run_id,
            "namespace": self.namespace,
            "jobName": self.job_name,
            "createdAt": self.created_at,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "lineage": self.lineage,
            "metrics": self.metrics,
        }
        return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def file(self, path: str) -> FileEntry | None:
        """The entry of one run-relative path, if listed."""
        return next((f for f in self.files if f.path == path), None)


def manifest_digest(data: bytes) -> str:
    """`sha256:<hex>` of manifest bytes (the TrainerResult's `manifestDigest`)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


HASH_ATTEMPTS = 3
"""Reads of an object that may break in a row, without progress, while it is hashed."""


def hash_object(store: Store, key: str, *, attempts: int = HASH_ATTEMPTS) -> str:
    """The sha256 hex digest of a stored object, streamed; a read that breaks is reopened
    where it broke (a ranged read), up to `attempts` times in a row without progress.

    Raises:
        TransferFailed: the reads kept breaking.
        StorageError: the store failed otherwise (ObjectNotFound, AccessDenied, …).
    """
    digest = hashlib.sha256()
    offset = failures = 0
    while True:
        before = offset
        try:
            with store.open_read(key, offset) as stream:
                for chunk in iter_chunks(stream):
                    digest.update(chunk)
                    offset += len(chunk)
            return digest.hexdigest()
        except TransferFailed as exc:
            failures = failures + 1 if offset == before else 1
            if failures >= attempts:
                raise
            logger.warning("%s; reading on from byte %d", exc.message, offset)


def collect_entries(
    store: Store, base: str, files: Iterable[ObjectInfo], what: str
) -> tuple[FileEntry, ...]:
    """Check that every file is under the folder key `base` and in the store with its size,
    hash those without a sha256, and return entries relative to `base`, sorted.

    Raises:
        ManifestMismatch: a file is outside `base`, listed twice, missing, or of another
            size (reason UploadFailed: the upload did not land as reported).
    """
    stored = {info.key: info.size for info in store.list(base)}
    entries: dict[str, FileEntry] = {}
    for info in files:
        if not info.key.startswith(base):
            raise ManifestMismatch(
                f"refusing to write {what}: {info.key} is not under {store.uri}/{base}",
                uri=store.uri_for(info.key),
                reason=Reason.INTERNAL_ERROR,
            )
        rel = validate_key(info.key[len(base) :])
        uri = store.uri_for(info.key)
        if rel in entries:
            raise ManifestMismatch(
                f"refusing to write {what}: {rel} is listed twice",
                uri=uri,
                reason=Reason.INTERNAL_ERROR,
            )
        if info.key not in stored:
            raise ManifestMismatch(
                f"refusing to write {what}: {rel} is not in the store ({uri}); upload it first",
                uri=uri,
                reason=Reason.UPLOAD_FAILED,
            )
        if stored[info.key] != info.size:
            raise ManifestMismatch(
                f"refusing to write {what}: {rel} is {stored[info.key]} bytes in the store, "
                f"{info.size} expected ({uri}); upload it again",
                uri=uri,
                reason=Reason.UPLOAD_FAILED,
            )
        sha256 = info.sha256 or hash_object(store, info.key)
        entries[rel] = FileEntry(path=rel, size=info.size, sha256=sha256)
    return tuple(entries[path] for path in sorted(entries))


def write_manifest(
    store: Store,
    layout: RunLayout,
    files: Iterable[ObjectInfo],
    *,
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
) -> Manifest:
    """Publish the run: write `manifest.json` listing `files` (write it LAST).

    Args:
        store: the store opened at `layout.output_uri`.
        layout: the run.
        files: every file of the run, as returned by `put_file` (keys of `store`).
        lineage: provenance to record.
        metrics: results to record (e.g. {"gatePassed": False}).
        created_at: the time to record (default now, UTC).

    Returns:
        The manifest, with the digest of the bytes written.

    Raises:
        ManifestMismatch: a file is missing from the store or has another size.
    """
    if any(info.key == layout.key(RunLayout.MANIFEST) for info in files):
        raise ManifestMismatch("the manifest cannot list itself", reason=Reason.INTERNAL_ERROR)
    entries = collect_entries(store, layout.prefix, files, f"the manifest of {layout.run_uri}")
    when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    manifest = Manifest(
        run_id=layout.run_id,
        namespace=layout.namespace,
        job_name=layout.job_name,
        created_at=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        files=entries,
        lineage=dict(lineage or {}),
        metrics=dict(metrics or {}),
    )
    data = manifest.to_bytes()
    store.put_bytes(data, layout.key(RunLayout.MANIFEST))
    return _with_digest(manifest, data)


def read_manifest(store: Store, layout: RunLayout) -> Manifest:
    """Read and parse the run's manifest.

    Raises:
        RunIncomplete: there is no manifest (the run is running or failed before publishing).
        ManifestMismatch: the manifest is malformed or belongs to another run.
    """
    uri = layout.uri_for(RunLayout.MANIFEST)
    try:
        data = store.get_bytes(layout.key(RunLayout.MANIFEST))
    except ObjectNotFound as exc:
        raise RunIncomplete(
            f"run {layout.run_uri} is incomplete: it has no manifest.json (still running, or "
            "it failed before publishing; see the FineTuneJob's conditions)",
            uri=uri,
        ) from exc
    manifest = parse_manifest(data, uri)
    if manifest.run_id != layout.run_id:
        raise ManifestMismatch(
            f"{uri} belongs to run {manifest.run_id}, not {layout.run_id}", uri=uri
        )
    return manifest


def parse_manifest(data: bytes, uri: str = "manifest.json") -> Manifest:
    """Parse manifest bytes.

    Raises:
        ManifestMismatch: not a manifest of a known schema version.
    """
    try:
        doc = json.loads(data)
        if doc["schemaVersion"] != MANIFEST_SCHEMA_VERSION:
            raise ManifestMismatch(
                f"{uri} has schemaVersion {doc['schemaVersion']}; this kubetune reads "
                f"{MANIFEST_SCHEMA_VERSION}: upgrade kubetune",
                uri=uri,
                reason=Reason.INVALID_SPEC,
            )
        files = tuple(parse_entry(f) for f in doc["files"])
        manifest = Manifest(
            run_id=str(doc["runId"]),
            namespace=str(doc["namespace"]),
            job_name=str(doc["jobName"]),
            created_at=str(doc["createdAt"]),
            files=files,
            lineage=dict(doc.get("lineage") or {}),
            metrics=dict(doc.get("metrics") or {}),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestMismatch(f"{uri} is not a valid manifest: {exc!r}", uri=uri) from exc
    return _with_digest(manifest, data)


def parse_entry(item: Any) -> FileEntry:
    """One `{"path", "size", "sha256"}` item of a manifest or a checkpoint marker.

    Raises:
        ValueError: a field is missing or malformed.
    """
    if not isinstance(item, dict):
        raise ValueError(f"file entry {item!r} is not an object")
    size, sha256 = item.get("size"), item.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"file entry {item!r} has no valid size")
    if not isinstance(sha256, str) or not SHA256_HEX.match(sha256):
        raise ValueError(f"file entry {item!r} has no valid sha256")
    return FileEntry(path=validate_key(str(item.get("path", ""))), size=size, sha256=sha256)


def verify_run(store: Store, layout: RunLayout, *, check_hashes: bool = True) -> Manifest:
    """Check that every file of the manifest is in the store with its size (and sha256).

    Every problem is collected first, then reported at once.

    Raises:
        RunIncomplete: there is no manifest.
        ManifestMismatch: files are missing (reason SourceNotFound) or differ (reason
            DownloadFailed); the message names each one.
    """
    manifest = read_manifest(store, layout)
    stored = {info.key: info.size for info in store.list(layout.prefix)}
    missing: list[str] = []
    differ: list[str] = []
    for entry in manifest.files:
        key = layout.key(entry.path)
        if key not in stored:
            missing.append(f"{entry.path} is missing")
        elif stored[key] != entry.size:
            differ.append(f"{entry.path} is {stored[key]} bytes, the manifest says {entry.size}")
        elif check_hashes and hash_object(store, key) != entry.sha256:
            differ.append(f"{entry.path} does not match its sha256 in the manifest")
    problems = missing + differ
    if problems:
        shown = "; ".join(problems[:10]) + ("; …" if len(problems) > 10 else "")
        raise ManifestMismatch(
            f"run {layout.run_uri} does not match its manifest ({len(problems)} "
            f"file(s)): {shown}. Fetch again, or re-run the job to republish it",
            uri=layout.run_uri,
            reason=Reason.SOURCE_NOT_FOUND if missing else Reason.DOWNLOAD_FAILED,
        )
    return manifest


def _with_digest(manifest: Manifest, data: bytes) -> Manifest:
    return dataclasses.replace(manifest, digest=manifest_digest(data))
