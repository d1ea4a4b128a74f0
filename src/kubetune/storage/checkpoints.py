"""Committed checkpoints: `checkpoints/step-000200/…` plus a `COMMITTED` marker written last.

A pod can be killed while it uploads a checkpoint. A checkpoint folder therefore counts
only when its marker exists and every file the marker lists is in the store with the
recorded size (and, when asked, sha256). The trainer resumes from
`latest_complete_checkpoint` and calls `prune_checkpoints` after each commit; deletion
removes the marker first, so a half-deleted checkpoint is never mistaken for a good one.

Marker format: `{"schemaVersion": 1, "step": 200, "files": [{"path", "size", "sha256"}]}`
with paths relative to the checkpoint folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubetune.storage.errors import ObjectNotFound
from kubetune.storage.layout import RunLayout, checkpoint_step
from kubetune.storage.manifest import (
    MANIFEST_SCHEMA_VERSION,
    FileEntry,
    collect_entries,
    hash_object,
    parse_entry,
)
from kubetune.storage.store import ObjectInfo, Store

logger = logging.getLogger(__name__)

MARKER = "COMMITTED"
"""Name of the marker file inside a checkpoint folder."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint.

    Attributes:
        step: optimizer steps done when it was saved.
        folder: run-relative folder, e.g. `checkpoints/step-000200/`.
        files: its files (paths relative to `folder`), as the marker lists them.
    """

    step: int
    folder: str
    files: tuple[FileEntry, ...]


def commit_checkpoint(
    store: Store, layout: RunLayout, step: int, files: Iterable[ObjectInfo]
) -> Checkpoint:
    """Mark an uploaded checkpoint complete by writing its `COMMITTED` marker.

    Args:
        store: the store opened at `layout.output_uri`.
        layout: the run.
        step: the checkpoint's step.
        files: its files, as returned by `put_file` (under `layout.checkpoint(step)`).

    Raises:
        ManifestMismatch: a file is outside the folder, missing, or of another size.
    """
    folder = layout.checkpoint(step)
    base = layout.key(folder)
    marker_key = base + MARKER
    files = [info for info in files if info.key != marker_key]
    entries = collect_entries(store, base, files, f"the marker of {layout.uri_for(folder)}")
    document = {
        "schemaVersion": MANIFEST_SCHEMA_VERSION,
        "step": step,
        "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries],
    }
    store.put_bytes((json.dumps(document, indent=2) + "\n").encode("utf-8"), marker_key)
    logger.info("Committed checkpoint %s (%d files)", layout.uri_for(folder), len(entries))
    return Checkpoint(step=step, folder=folder, files=entries)


def checkpoint_steps(store: Store, layout: RunLayout) -> dict[int, dict[str, int]]:
    """Every checkpoint folder of the run, complete or not: step -> {relative path: size}."""
    found: dict[int, dict[str, int]] = {}
    root = layout.key(layout.checkpoints_dir)
    for info in store.list(root):
        folder, _, rel = info.key[len(root) :].partition("/")
        step = checkpoint_step(folder)
        if step is not None and rel:
            found.setdefault(step, {})[rel] = info.size
    return found


def load_checkpoint(
    store: Store,
    layout: RunLayout,
    step: int,
    sizes: dict[str, int],
    *,
    check_hashes: bool = False,
) -> Checkpoint | None:
    """The checkpoint at `step` if its marker exists and its files match it, else None.

    Args:
        store: the store opened at `layout.output_uri`.
        layout: the run.
        step: the checkpoint's step.
        sizes: the folder's stored files and sizes (from `checkpoint_steps`).
        check_hashes: also stream every file and compare its sha256 (slow for big models).
    """
    folder = layout.checkpoint(step)
    where = layout.uri_for(folder)
    if MARKER not in sizes:
        logger.info(
            "Ignoring checkpoint %s: no %s marker (interrupted while saving)", where, MARKER
        )
        return None
    try:
        doc = json.loads(store.get_bytes(layout.key(folder + MARKER)))
        entries = tuple(parse_entry(item) for item in doc["files"])
    except ObjectNotFound:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("Ignoring checkpoint %s: unreadable %s marker (%s)", where, MARKER, exc)
        return None
    for entry in entries:
        if sizes.get(entry.path) != entry.size:
            logger.warning(
                "Ignoring checkpoint %s: %s is %s bytes, the marker says %d",
                where,
                entry.path,
                sizes.get(entry.path, "missing, 0"),
                entry.size,
            )
            return None
        if check_hashes and hash_object(store, layout.key(folder + entry.path)) != entry.sha256:
            logger.warning("Ignoring checkpoint %s: %s fails its sha256", where, entry.path)
            return None
    return Checkpoint(step=step, folder=folder, files=entries)


def latest_complete_checkpoint(
    store: Store, layout: RunLayout, *, check_hashes: bool = False
) -> Checkpoint | None:
    """The newest checkpoint whose marker exists and whose files match it, or None."""
    for step, sizes in sorted(checkpoint_steps(store, layout).items(), reverse=True):
        checkpoint = load_checkpoint(store, layout, step, sizes, check_hashes=check_hashes)
        if checkpoint is not None:
            return checkpoint
    return None


def delete_checkpoint(
    store: Store,
    layout: RunLayout,
    step: int,
    *,
    marker_deleted: Callable[[int], None] | None = None,
) -> None:
    """Delete one checkpoint, its marker first (`marker_deleted(step)` is called between
    the marker and the files: the trainer's `checkpoint-prune` fault point)."""
    folder = layout.checkpoint(step)
    store.delete(layout.key(folder + MARKER))
    if marker_deleted is not None:
        marker_deleted(step)
    store.delete_prefix(layout.key(folder))


def prune_checkpoints(
    store: Store,
    layout: RunLayout,
    keep: int,
    *,
    marker_deleted: Callable[[int], None] | None = None,
) -> list[int]:
    """Keep the newest `keep` complete checkpoints; delete older ones.

    Incomplete checkpoints older than the newest complete one are leftovers of interrupted
    saves and go too; a newer incomplete one may be being written and stays. `keep=0`
    deletes every checkpoint (after a successful run with `deleteOnSuccess`).
    `marker_deleted` is passed on to `delete_checkpoint`.

    Returns:
        The deleted steps, ascending.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    folders = checkpoint_steps(store, layout)
    complete = sorted(
        (step for step, sizes in folders.items() if load_checkpoint(store, layout, step, sizes)),
        reverse=True,
    )
    kept = set(complete[:keep])
    newest = complete[0] if complete else None
    doomed = [
        step
        for step in sorted(folders)
        if step not in kept
        and (keep == 0 or step in complete or (newest is not None and step < newest))
    ]
    for step in doomed:
        delete_checkpoint(store, layout, step, marker_deleted=marker_deleted)
        logger.info("Deleted checkpoint %s", layout.uri_for(layout.checkpoint(step)))
    return doomed
