"""`LocalStore`: the artifact store on a local directory (local runs and `pvc://` claims).

Every write goes to a temporary file in the destination directory, is fsynced, then renamed
over the final name (`os.replace` is atomic on POSIX), so a reader sees the old object or
the new one, never a torn file, and a crash leaves at most a `.kubetune-tmp-*` file that
listings ignore.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from kubetune.api.contract import Reason
from kubetune.storage.errors import (
    AccessDenied,
    InvalidKey,
    ObjectNotFound,
    StorageError,
    TransferFailed,
)
from kubetune.storage.store import (
    TEMP_MARKER,
    ObjectInfo,
    iter_chunks,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path`; on success fsync it and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_MARKER, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; artifacts get the usual mode under the process umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems cannot open directories.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore:
    """A store on a directory; keys map to files below `root`.

    Args:
        root: the directory (created on the first write).
        uri: the URI to report (e.g. `pvc://claim/path`); default the absolute root path.
    """

    def __init__(self, root: str | os.PathLike[str], uri: str | None = None) -> None:
        self.root = Path(root).absolute()
        self._uri = uri.rstrip("/") if uri else str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self._uri!r})"

    @property
    def uri(self) -> str:
        """The store root URI."""
        return self._uri

    def uri_for(self, key: str) -> str:
        """The URI of one key."""
        return f"{self._uri}/{validate_key(key)}"

    def _path(self, key: str) -> Path:
        return self._inside(self.root.joinpath(*validate_key(key).split("/")), key)

    def _inside(self, path: Path, key: str) -> Path:
        """`path`, unless a symbolic link on the way takes it out of the store's root: a
        link planted in a shared claim must not let a write land, or a read come from,
        anywhere else (another job's artifacts, /proc/self/environ)."""
        real, root = path.resolve(), self.root.resolve()
        if real != root and root not in real.parents:
            raise InvalidKey(
                f"{self._uri}/{key} leads to {real} through a symbolic link, outside the "
                f"store's root {root}: remove the link"
            )
        return path

    def _error(self, exc: OSError, key: str, writing: bool) -> StorageError:
        uri = self.uri_for(key) if key else self._uri
        if isinstance(exc, FileNotFoundError) and not writing:
            return ObjectNotFound(f"{uri} does not exist: check the URI", uri=uri)
        if isinstance(exc, PermissionError):
            return AccessDenied(
                f"permission denied on {uri}: make the directory writable by the user the "
                "trainer runs as (pods run as non-root)",
                uri=uri,
            )
        action = "write" if writing else "read"
        full = exc.errno == errno.ENOSPC
        hint = " (disk full: free space or use a larger volume)" if full else ""
        return TransferFailed(
            f"could not {action} {uri}: {exc.strerror or exc}{hint}",
            uri=uri,
            reason=Reason.UPLOAD_FAILED if writing else Reason.DOWNLOAD_FAILED,
        )

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        """Copy a local file into the store, hashing it on the way."""
        target = self._path(key)
        digest = hashlib.sha256()
        size = 0
        try:
            src = open(local_path, "rb")  # noqa: SIM115 - closed by the `with` below
        except OSError as exc:
            raise ObjectNotFound(
                f"cannot read local file {local_path}: {exc.strerror or exc}", uri=str(local_path)
            ) from exc
        try:
            with src, atomic_writer(target) as dst:
                for chunk in iter_chunks(src):
                    digest.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
        except OSError as exc:
            raise self._error(exc, key, writing=True) from exc
        logger.debug("Stored %s (%d bytes)", self.uri_for(key), size)
        return ObjectInfo(key=key, size=size, sha256=digest.hexdigest())

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        """Write small content atomically."""
        try:
            with atomic_writer(self._path(key)) as dst:
                dst.write(data)
        except OSError as exc:
            raise self._error(exc, key, writing=True) from exc
        return ObjectInfo(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        """Copy an object to `local_path` through a temporary file, hashing it."""
        digest = hashlib.sha256()
        size = 0
        try:
            with open(self._path(key), "rb") as src:
                try:
                    with atomic_writer(Path(local_path)) as dst:
                        for chunk in iter_chunks(src):
                            digest.update(chunk)
                            size += len(chunk)
                            dst.write(chunk)
                except OSError as exc:
                    raise TransferFailed(
                        f"could not write {local_path}: {exc.strerror or exc}",
                        uri=str(local_path),
                        reason=Reason.DOWNLOAD_FAILED,
                    ) from exc
        except OSError as exc:
            raise self._error(exc, key, writing=False) from exc
        return ObjectInfo(key=key, size=size, sha256=digest.hexdigest())

    def get_bytes(self, key: str) -> bytes:
        """Read an object whole."""
        try:
            return self._path(key).read_bytes()
        except IsADirectoryError as exc:
            raise self._error(FileNotFoundError(str(exc)), key, writing=False) from exc
        except OSError as exc:
            raise self._error(exc, key, writing=False) from exc

    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        """Open an object for streaming reads, positioned at byte `offset`."""
        if offset < 0:
            raise ValueError(f"negative offset {offset} reading {self.uri_for(key)}")
        try:
            stream = open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it
            stream.seek(offset)
            return stream
        except IsADirectoryError as exc:
            raise self._error(FileNotFoundError(str(exc)), key, writing=False) from exc
        except OSError as exc:
            raise self._error(exc, key, writing=False) from exc

    def exists(self, key: str) -> bool:
        """Whether the object exists (a directory is not an object)."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every file under the folder `prefix`, sorted by key (sha256 not computed)."""
        folder = validate_prefix(prefix)
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        self._inside(base, folder)
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_MARKER)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TEMP_MARKER):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if os.path.islink(os.path.join(dirpath, name)):
                    try:
                        self._inside(Path(dirpath, name), key)
                    except InvalidKey:
                        logger.warning("Skipping %s: a symbolic link out of the store", key)
                        continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue  # deleted while listing
                found.append(ObjectInfo(key=key, size=size))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Delete one object (missing is fine), then prune empty parent directories."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._error(exc, key, writing=True) from exc
        self._prune_empty(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        """Delete the folder `prefix` and everything below it."""
        folder = validate_prefix(prefix)
        if not folder:
            raise StorageError(f"refusing to delete the whole store {self._uri}", uri=self._uri)
        count = len(self.list(folder))
        base = self._inside(self.root.joinpath(*folder.split("/")), folder)
        try:
            shutil.rmtree(base)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._error(exc, folder.rstrip("/"), writing=True) from exc
        self._prune_empty(base.parent)
        return count

    def _prune_empty(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent
