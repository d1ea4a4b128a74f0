"""Verified, resumable downloads of a store's objects into a local folder.

Each object is streamed in chunks to `<file>.part` while its sha256 is computed and
renamed to its final name only when its size and digest match what the caller expects (a
manifest entry), so a final name is always a verified file and memory stays bounded
whatever the file's size. A `.part` left by an interrupted process is continued with a
ranged read from its size; a stream that breaks is reopened the same way, a few times. A
file whose sha256 does not match is downloaded once more from the start before it is
refused. A final file already in place is hashed and kept when it matches.

Used by `kubetune.storage.fetch`; torch-free.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kubetune.api.contract import Reason
from kubetune.storage.errors import ManifestMismatch, StorageError, TransferFailed
from kubetune.storage.manifest import FileEntry
from kubetune.storage.progress import TransferProgress, human_bytes
from kubetune.storage.store import CHUNK_SIZE, Store

Log = Callable[[str], None]

PART_SUFFIX = ".part"
"""Suffix of a file being downloaded; renamed away once verified."""


@dataclass(frozen=True)
class FetchOptions:
    """How files are transferred.

    Attributes:
        parallel: files downloaded at the same time (each one is one stream).
        attempts: reads of a file that may fail in a row, without progress, before the
            download fails (a broken stream is reopened where it broke).
        retry_delay_s: wait before the first reopening; doubled each time.
        progress_interval_s: seconds between progress lines.
    """

    parallel: int = 4
    attempts: int = 5
    retry_delay_s: float = 1.0
    progress_interval_s: float = 5.0


@dataclass(frozen=True)
class Download:
    """One object to download.

    Attributes:
        key: the object's key in the store.
        entry: the expected size and sha256; `entry.path` is the file's path relative to
            the target folder.
    """

    key: str
    entry: FileEntry


@dataclass(frozen=True)
class Downloaded:
    """What downloading one file took.

    Attributes:
        downloaded: bytes read from the store.
        resumed: bytes of a `.part` kept from an earlier process.
        skipped: the file was already in place and verified.
    """

    downloaded: int
    resumed: int
    skipped: bool


class FetchError(StorageError):
    """The target folder cannot take the files (foreign files, too little space, not
    writable): the user's to fix."""

    default_reason = Reason.INVALID_SPEC


class _Cancelled(Exception):
    """Another file's transfer failed (or the user interrupted): stop this one."""


def download_files(
    store: Store,
    downloads: Sequence[Download],
    directory: Path,
    options: FetchOptions,
    log: Log,
) -> list[Downloaded]:
    """Download every file into `directory`, `options.parallel` at a time, verified; the
    first failure stops the others and is raised.

    Raises:
        ManifestMismatch: a file's bytes differ from its entry (DownloadFailed); the
            partial file is removed.
        FetchError: the folder cannot be written (no space, permissions).
        StorageError: the store failed after the retries.
    """
    progress = TransferProgress(
        sum(d.entry.size for d in downloads), log, interval_s=options.progress_interval_s
    )
    cancel = threading.Event()

    def one(download: Download) -> Downloaded:
        uri = store.uri_for(download.key)
        fetch = _FileFetch(store, download.key, uri, download.entry, directory, progress, cancel)
        return fetch.run(options, log)

    workers = max(1, min(options.parallel, len(downloads)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-fetch") as pool:
        futures: list[Future[Downloaded]] = [pool.submit(one, d) for d in downloads]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                cancel.set()
                wait(futures)
                errors = [e for f in futures if (e := f.exception()) is not None]
                raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        except BaseException:
            cancel.set()
            raise
    return [f.result() for f in futures]


class _FileFetch:
    """One file: skip it when already verified, else stream it to `.part` (continuing a
    partial one), verify, rename.

    `have` is the size of `.part` and `digest` the sha256 of those bytes; both advance
    together, chunk by chunk, so a broken stream is reopened exactly where it broke.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        uri: str,
        entry: FileEntry,
        directory: Path,
        progress: TransferProgress,
        cancel: threading.Event,
    ) -> None:
        self.store = store
        self.key = key
        self.uri = uri
        self.entry = entry
        self.final = target_path(directory, entry.path)
        self.part = self.final.with_name(self.final.name + PART_SUFFIX)
        self.progress = progress
        self.cancel = cancel
        self.digest = hashlib.sha256()
        self.have = 0
        self.downloaded = 0

    def run(self, options: FetchOptions, log: Log) -> Downloaded:
        entry = self.entry
        if self._final_is_verified():
            self.part.unlink(missing_ok=True)
            self.progress.skip(entry.size)
            return Downloaded(0, 0, skipped=True)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._load_part()
        resumed = self.have
        if resumed:
            log(f"Resuming {entry.path} at {human_bytes(resumed)} of {human_bytes(entry.size)}")
        self.progress.begin(entry.path, entry.size, resumed)
        try:
            self._download(options, log)
            if self.digest.hexdigest() != entry.sha256:
                # The partial file may predate a republished object, a crash may have left
                # bytes the disk never got, or the bytes were damaged on the way: try once
                # more from the start.
                since = f" after resuming at {human_bytes(resumed)}" if resumed else ""
                log(
                    f"{entry.path} did not match its sha256{since}; downloading it again "
                    "from the start"
                )
                self.part.unlink(missing_ok=True)
                self.progress.restart(entry.path)
                self.digest, self.have, resumed = hashlib.sha256(), 0, 0
                self._download(options, log)
            self._verify()
            self._sync_and_rename()
        finally:
            self.progress.end(entry.path)
        log(f"Verified {entry.path} ({human_bytes(entry.size)}, sha256 {entry.sha256[:12]}…)")
        return Downloaded(self.downloaded, resumed, skipped=False)

    def _final_is_verified(self) -> bool:
        """Whether the file is already in place with its size and sha256 (a wrong one is
        removed)."""
        size = size_of(self.final)
        if size is None:
            return False
        if size == self.entry.size and hash_file(self.final, size).hexdigest() == (
            self.entry.sha256
        ):
            return True
        self.final.unlink()
        return False

    def _load_part(self) -> None:
        """Take over the `.part` of an earlier fetch (one longer than the file is dropped)."""
        size = size_of(self.part)
        if size is None or size > self.entry.size:
            self.part.unlink(missing_ok=True)
            return
        self.digest = hash_file(self.part, size)
        self.have = size

    def _download(self, options: FetchOptions, log: Log) -> None:
        """Append the rest of the object to `.part`, reopening a broken stream from where
        it broke, up to `options.attempts` times in a row without progress."""
        failures = 0
        while self.have < self.entry.size:
            before = self.have
            try:
                self._stream()
            except TransferFailed as exc:
                failures = failures + 1 if self.have == before else 1
                if failures >= options.attempts:
                    raise
                delay = options.retry_delay_s * 2 ** (failures - 1)
                log(
                    f"{self.entry.path}: {exc.message}; reopening at byte {self.have} in "
                    f"{delay:g} s (attempt {failures + 1} of {options.attempts})"
                )
                time.sleep(delay)
                continue
            if self.have < self.entry.size:
                self.part.unlink(missing_ok=True)
                raise ManifestMismatch(
                    f"{self.uri} ended after {self.have} bytes; the manifest says "
                    f"{self.entry.size}: the object changed after the run was published; "
                    "re-run the job to republish it",
                    uri=self.uri,
                )

    def _stream(self) -> None:
        """One read from byte `have` to the end of the object."""
        entry = self.entry
        try:
            with self.store.open_read(self.key, self.have) as stream, open(self.part, "ab") as out:
                out.truncate(self.have)
                for chunk in self._chunks(stream):
                    if self.cancel.is_set():
                        raise _Cancelled(entry.path)
                    if self.have + len(chunk) > entry.size:
                        self.part.unlink(missing_ok=True)
                        raise ManifestMismatch(
                            f"{self.uri} is longer than the {entry.size} bytes the manifest "
                            "says: the object changed after the run was published; re-run "
                            "the job to republish it",
                            uri=self.uri,
                        )
                    out.write(chunk)
                    self.digest.update(chunk)
                    self.have += len(chunk)
                    self.downloaded += len(chunk)
                    self.progress.add(entry.path, len(chunk))
        except OSError as exc:  # reading errors are TransferFailed by now: this is the disk
            raise write_error(exc, self.part) from exc

    def _chunks(self, stream: BinaryIO) -> Iterator[bytes]:
        """The stream's chunks; a local read error counts as a broken transfer."""
        while True:
            try:
                chunk = stream.read(CHUNK_SIZE)
            except OSError as exc:
                raise TransferFailed(
                    f"could not read {self.uri}: {exc.strerror or exc}",
                    uri=self.uri,
                    reason=Reason.DOWNLOAD_FAILED,
                ) from exc
            if not chunk:
                return
            yield chunk

    def _verify(self) -> None:
        sha256 = self.digest.hexdigest()
        if sha256 == self.entry.sha256:
            return
        self.part.unlink(missing_ok=True)
        raise ManifestMismatch(
            f"{self.entry.path} ({self.uri}) does not match the manifest: its sha256 is "
            f"{sha256}, the manifest says {self.entry.sha256}; the partial file was removed. "
            "The object changed or was corrupted after the run was published: re-run the "
            "job to republish it",
            uri=self.uri,
            reason=Reason.DOWNLOAD_FAILED,
        )

    def _sync_and_rename(self) -> None:
        try:
            with open(self.part, "ab") as handle:  # "ab": an empty file has no .part yet
                os.fsync(handle.fileno())
            os.replace(self.part, self.final)
        except OSError as exc:
            raise write_error(exc, self.final) from exc


def target_path(directory: Path, relative: str) -> Path:
    """The local path of a folder-relative POSIX path."""
    return directory.joinpath(*relative.split("/"))


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def hash_file(path: Path, size: int) -> hashlib._Hash:
    """The sha256 state after the first `size` bytes of a local file, streamed."""
    digest = hashlib.sha256()
    read = 0
    with open(path, "rb") as handle:
        while read < size and (chunk := handle.read(min(CHUNK_SIZE, size - read))):
            digest.update(chunk)
            read += len(chunk)
    return digest


def write_error(exc: OSError, path: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return FetchError(
            f"no space left writing {path}: use a larger volume (a ModelDeployment's "
            "spec.modelCache)",
            uri=str(path),
        )
    return FetchError(
        f"could not write {path}: {exc.strerror or exc}; the target folder must be writable",
        uri=str(path),
    )
