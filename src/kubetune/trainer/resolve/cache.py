"""The local model cache: one folder per (source URI, revision), published atomically.

Layout under the cache root (`$KUBETUNE_CACHE_DIR`, default `~/.cache/kubetune/models`):

    <root>/<slug>--<hash>/           a complete model folder + kubetune-source.json
    <root>/.tmp/<slug>--<hash>.XXXX  a folder being built (same filesystem: rename is atomic)
    <root>/.locks/<slug>--<hash>.lock

An entry is built in a temporary folder, its marker file is written last, and the folder
is renamed into place, so a reader sees either nothing or a complete folder. A file lock
per entry makes a concurrent second process wait for the first and then reuse its result
instead of downloading or converting twice; should locks not work (some network
filesystems), the rename still decides: the first folder in place wins and the loser's
copy is discarded. Retries of a failed pod reuse the entry (the cache can live on a PVC).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason
from kubetune.trainer.resolve.errors import ModelResolutionError

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/kubetune/models")
MARKER = "kubetune-source.json"
"""Written last into every cache entry: where it came from (and, for conversions, how)."""
MARKER_SCHEMA = 1
LOCK_TIMEOUT_S = 6 * 3600
"""How long a process waits for another one downloading or converting the same model."""

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

Builder = Callable[[Path], Mapping[str, Any]]
"""Fills an empty folder; returns extra fields for the marker file."""


def default_cache_root() -> Path:
    """`$KUBETUNE_CACHE_DIR`, else `~/.cache/kubetune/models`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def entry_name(uri: str, revision: str | None) -> str:
    """A readable, collision-free folder name for (uri, revision)."""
    digest = hashlib.sha256(f"{uri}\n{revision or ''}".encode()).hexdigest()[:16]
    slug = _SLUG_UNSAFE.sub("-", uri.replace("://", "-")).strip("-.")[:80]
    return f"{slug}--{digest}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete cache entry, or None if the folder is not one."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def materialize(root: Path, uri: str, revision: str | None, build: Builder) -> tuple[Path, bool]:
    """Return the cache entry for (uri, revision), building it once if needed.

    Args:
        root: the cache root (created if missing).
        uri: the source URI (part of the key and of the marker).
        revision: the revision (part of the key); None for unversioned sources.
        build: fills an empty temporary folder; its return value is merged into the marker.
            Exceptions propagate and leave nothing behind.

    Returns:
        The entry's path and whether it was already there (a cache hit).
    """
    root = root.expanduser()
    name = entry_name(uri, revision)
    final = root / name
    if read_marker(final) is not None:
        return final, True

    from filelock import FileLock, Timeout

    try:
        for sub in (".locks", ".tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelResolutionError(
            Reason.INFRASTRUCTURE_ERROR,
            f"cannot write the model cache {root} for {uri} ({err.strerror or err}): set "
            f"{CACHE_DIR_ENV} to a writable folder (in a pod, a mounted volume)",
            uri=uri,
        ) from err
    try:
        with FileLock(root / ".locks" / f"{name}.lock", timeout=LOCK_TIMEOUT_S):
            if read_marker(final) is not None:
                logger.info("Reusing %s, prepared by another process", final)
                return final, True
            return _build(root, name, final, uri, revision, build)
    except Timeout:
        raise ModelResolutionError(
            Reason.INFRASTRUCTURE_ERROR,
            f"waited {LOCK_TIMEOUT_S} s for another process preparing {uri} in {final}; "
            f"remove {root / '.locks' / (name + '.lock')} if no such process is running",
            uri=uri,
        ) from None


def _build(
    root: Path, name: str, final: Path, uri: str, revision: str | None, build: Builder
) -> tuple[Path, bool]:
    if final.exists():
        # No marker: not published by this module (a manual copy, or an old layout).
        logger.warning("Replacing incomplete cache entry %s", final)
        shutil.rmtree(final)
    for stale in (root / ".tmp").glob(f"{name}.*"):
        # We hold the entry's lock, so these are leftovers of a killed process.
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=root / ".tmp"))
    try:
        extra = dict(build(work))
        marker = {
            "schema": MARKER_SCHEMA,
            "uri": uri,
            "revision": revision,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        (work / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _make_readable(work)
        try:
            os.rename(work, final)
        except OSError:
            if read_marker(final) is None:
                raise
            # Rename-wins: another process (without a working lock) published first.
            shutil.rmtree(work, ignore_errors=True)
            return final, True
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final, False


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: let the pod's group read them
    (a cache on a shared PVC is read by other pods of the same fsGroup)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
