"""`kubetune fetch`: one variant of a published run, streamed into a local folder, every
file checked against the run's manifest, resumable.

This is what a ModelDeployment's init container runs before vLLM starts, and what users run
by hand. The run's `manifest.json` is read first: a run without one is not complete and is
refused. The variant's files (`merged/`, `adapter/` or `quantized/<scheme>/`) land at the
top of the target folder, so vLLM is pointed at the folder itself.

Each file is streamed in chunks to `<file>.part` while its sha256 is computed, and renamed
to its final name only when size and digest match the manifest, so a final name is always
a verified file. A `.part` left by an interrupted fetch (a killed pod, a lost connection)
is continued with a ranged read from its size; a broken stream is reopened the same way, a
few times, within one fetch. `.kubetune-fetch.json` is written last: its manifest digest
tells a later fetch (another pod on the same PVC, a restarted pod) that the folder already
holds a complete copy, which is then left as it is (given the digest it expects, such a
fetch does not even read the store).

With a cache root the folder is `<root>/<manifest sha256 hex>/<variant>`: pods sharing a
PVC share one copy per published manifest, and a file lock (POSIX `lockf`, which NFS
servers honour) makes a second pod wait for the first instead of downloading the same
files at the same time.

Torch-free and Kubernetes-free; boto3 is imported only for `s3://` runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.modeldeployment import Variant
from kubetune.storage.download import (
    PART_SUFFIX,
    Download,
    FetchError,
    FetchOptions,
    Log,
    download_files,
    size_of,
    target_path,
    write_error,
)
from kubetune.storage.errors import InvalidKey, ManifestMismatch, ObjectNotFound
from kubetune.storage.layout import RunLayout, parse_run_uri
from kubetune.storage.local import atomic_writer
from kubetune.storage.manifest import FileEntry, Manifest, parse_entry, read_manifest
from kubetune.storage.progress import human_bytes
from kubetune.storage.store import TEMP_MARKER, Store, open_store

__all__ = [
    "LOCK",
    "MARKER",
    "FetchError",
    "FetchOptions",
    "FetchResult",
    "VariantNotFound",
    "cache_dir",
    "fetch_run",
    "is_complete",
    "normalize_digest",
    "parse_variant",
    "read_marker",
    "select_files",
    "summary_line",
    "variant_folder",
    "variants_of",
]

logger = logging.getLogger(__name__)

MARKER = ".kubetune-fetch.json"
"""Written last into the folder: which run, variant and manifest digest it holds."""
MARKER_SCHEMA_VERSION = 1
LOCK = ".kubetune-fetch.lock"
"""Lock file in the folder; held while fetching into it."""
SHA256_HEX_LENGTH = 64


@dataclass(frozen=True)
class FetchResult:
    """What a fetch did.

    Attributes:
        directory: the folder holding the variant (point vLLM here).
        variant: the variant fetched.
        run_uri: the run.
        manifest_digest: `sha256:<hex>` of the run's manifest.
        job_name: the FineTuneJob's name (vLLM's `--served-model-name`).
        base_model: the lineage's base model `{"uri", "revision"}` (serving an Adapter).
        files: the variant's files, paths relative to `directory`.
        downloaded_bytes: bytes read from the store by this fetch.
        resumed_bytes: bytes of `.part` files left by an earlier fetch and kept.
        skipped_files: files already complete and verified in the folder.
        already_complete: the folder held a complete copy; nothing was done.
        seconds: wall time.
    """

    directory: Path
    variant: Variant
    run_uri: str
    manifest_digest: str
    job_name: str
    base_model: dict[str, Any]
    files: tuple[FileEntry, ...]
    downloaded_bytes: int = 0
    resumed_bytes: int = 0
    skipped_files: int = 0
    already_complete: bool = False
    seconds: float = 0.0


class VariantNotFound(ObjectNotFound):
    """The run has no files for the requested variant."""


# --- Variants and files ---------------------------------------------------------------------


def variant_folder(variant: Variant) -> str:
    """The run-relative folder of a variant: `merged/`, `adapter/` or `quantized/<scheme>/`."""
    if variant == Variant.MERGED:
        return RunLayout.MERGED
    if variant == Variant.ADAPTER:
        return RunLayout.ADAPTER
    return f"{RunLayout.QUANTIZED}{variant.value}/"


def parse_variant(text: str) -> Variant:
    """A variant from its name, in any letter case (`merged`, `w4a16`).

    Raises:
        ValueError: not a variant; the message lists them.
    """
    for variant in Variant:
        if variant.value.lower() == text.strip().lower():
            return variant
    names = ", ".join(v.value for v in Variant)
    raise ValueError(f"unknown variant {text!r}: use one of {names}")


def variants_of(manifest: Manifest) -> list[Variant]:
    """The variants a run published, in the API's order."""
    return [
        variant
        for variant in Variant
        if any(entry.path.startswith(variant_folder(variant)) for entry in manifest.files)
    ]


def select_files(manifest: Manifest, variant: Variant, run_uri: str) -> tuple[FileEntry, ...]:
    """The variant's manifest entries, with paths relative to the variant's folder.

    Raises:
        VariantNotFound: the run has no file in the variant's folder; the message lists the
            variants it has.
    """
    folder = variant_folder(variant)
    files = tuple(
        FileEntry(path=entry.path[len(folder) :], size=entry.size, sha256=entry.sha256)
        for entry in manifest.files
        if entry.path.startswith(folder)
    )
    if not files:
        present = ", ".join(v.value for v in variants_of(manifest)) or "none"
        raise VariantNotFound(
            f"run {run_uri} has no {variant.value} variant ({folder} is not in its manifest); "
            f"it has: {present}. Choose one of those with --variant (spec.model.variant), or "
            "add the export to the FineTuneJob (export.merge, export.quantize) and re-run it",
            uri=f"{run_uri}/{folder}",
        )
    return files


def normalize_digest(text: str) -> str:
    """`sha256:<hex>` from `sha256:<hex>` or a bare 64-character hex digest.

    Raises:
        InvalidKey: not a sha256 digest.
    """
    hex_part = text.strip().lower().removeprefix("sha256:")
    if len(hex_part) != SHA256_HEX_LENGTH or any(c not in "0123456789abcdef" for c in hex_part):
        raise InvalidKey(
            f"invalid manifest digest {text!r}: expected sha256:<64 hex characters>, as in a "
            "FineTuneJob's status.artifacts.manifestDigest"
        )
    return f"sha256:{hex_part}"


def cache_dir(root: str | os.PathLike[str], digest: str, variant: Variant) -> Path:
    """The folder of a variant under a cache root: `<root>/<sha256 hex>/<variant>`, e.g.
    `/models/3f2a…9c/Merged`. The ModelDeployment's vLLM container is pointed here.

    Raises:
        InvalidKey: `digest` is not a sha256 digest.
    """
    hex_part = normalize_digest(digest).removeprefix("sha256:")
    return Path(root) / hex_part / variant.value


# --- The marker -----------------------------------------------------------------------------


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The fetch marker of a folder, or None when there is none or it is unreadable."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schemaVersion") != MARKER_SCHEMA_VERSION:
        return None
    return data


def marker_files(marker: dict[str, Any]) -> tuple[FileEntry, ...]:
    """The files a marker lists (none when the list is malformed)."""
    try:
        return tuple(parse_entry(item) for item in marker.get("files", []))
    except (ValueError, InvalidKey):
        return ()


def is_complete(directory: Path, digest: str, variant: Variant) -> bool:
    """Whether the folder holds a complete copy of `variant` of the manifest `digest`: its
    marker names both, and every file it lists is there with its size."""
    marker = read_marker(directory)
    if not marker or marker.get("manifestDigest") != digest:
        return False
    if marker.get("variant") != variant.value:
        return False
    files = marker_files(marker)
    return bool(files) and all(size_of(target_path(directory, f.path)) == f.size for f in files)


def _marker_document(
    layout: RunLayout, manifest: Manifest, variant: Variant, files: Sequence[FileEntry]
) -> dict[str, Any]:
    return {
        "schemaVersion": MARKER_SCHEMA_VERSION,
        "runUri": layout.run_uri,
        "variant": variant.value,
        "manifestDigest": manifest.digest,
        "namespace": manifest.namespace,
        "jobName": manifest.job_name,
        "runId": manifest.run_id,
        "baseModel": _base_model(manifest.lineage),
        "gatePassed": manifest.lineage.get("gatePassed"),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        "fetchedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _base_model(lineage: dict[str, Any]) -> dict[str, Any]:
    model = lineage.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("uri"), str):
        return {}
    revision = model.get("revision")
    return {"uri": model["uri"], "revision": revision if isinstance(revision, str) else None}


# --- The fetch ------------------------------------------------------------------------------


def fetch_run(
    run_uri: str,
    directory: str | os.PathLike[str] | None = None,
    *,
    variant: Variant = Variant.MERGED,
    cache_root: str | os.PathLike[str] | None = None,
    expect_digest: str | None = None,
    require_gate: bool = False,
    link: str | os.PathLike[str] | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    store: Store | None = None,
    options: FetchOptions | None = None,
    log: Log | None = None,
) -> FetchResult:
    """Fetch one variant of a published run into a folder, verified and resumable.

    Args:
        run_uri: the run (`<output root>/<namespace>/<job>/<run-id>`).
        directory: the target folder; exactly one of it and `cache_root`.
        variant: which artifact.
        cache_root: fetch into `cache_dir(cache_root, <manifest digest>, variant)`.
        expect_digest: refuse a run whose manifest is not this one (the digest a deployment
            pinned); with a cache root and a complete copy, the store is not even read.
        require_gate: refuse a run whose manifest records a failed evaluation gate.
        link: after success, make this path a symbolic link to the folder.
        endpoint_url: S3 endpoint.
        region: S3 region.
        store: the store at the run's output root (default: opened from `run_uri`).
        options: transfer settings.
        log: progress lines (default: this module's logger at INFO).

    Raises:
        InvalidKey: the run URI or the digest is malformed.
        RunIncomplete: the run has no manifest.
        VariantNotFound: the run has no such variant.
        ManifestMismatch: a file differs from the manifest (DownloadFailed), the run's
            manifest is not `expect_digest` or its gate failed with `require_gate`.
        FetchError: the folder holds other files, or has too little space.
        StorageError: the store failed (AccessDenied, TransferFailed, …).
    """
    if (directory is None) == (cache_root is None):
        raise ValueError("give exactly one of a directory and a cache root")
    say = log or logger.info
    started = time.monotonic()
    layout = parse_run_uri(run_uri)
    expected = normalize_digest(expect_digest) if expect_digest else None
    if expected:
        known = _folder(directory, cache_root, expected, variant)
        copy = _complete_copy(known, expected, variant, require_gate, started)
        if copy:
            return _finish(copy, link, say)
    store = store or open_store(layout.output_uri, endpoint_url=endpoint_url, region=region)
    manifest = read_manifest(store, layout)
    _check_manifest(manifest, layout, expected, require_gate)
    files = select_files(manifest, variant, layout.run_uri)
    target = _folder(directory, cache_root, manifest.digest, variant)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, target) from exc
    with _locked(target, say):
        copy = _complete_copy(target, manifest.digest, variant, require_gate, started)
        if copy is None:
            copy = _fetch_into(
                target, store, layout, manifest, variant, files, options or FetchOptions(), say
            )
    return _finish(replace(copy, seconds=time.monotonic() - started), link, say)


def _folder(
    directory: str | os.PathLike[str] | None,
    cache_root: str | os.PathLike[str] | None,
    digest: str,
    variant: Variant,
) -> Path:
    if directory is not None:
        return Path(directory)
    return cache_dir(cache_root or "", digest, variant)


def _complete_copy(
    directory: Path, digest: str, variant: Variant, require_gate: bool, started: float
) -> FetchResult | None:
    """The result of a fetch that finds the folder already complete, else None."""
    marker = read_marker(directory)
    if not marker or not is_complete(directory, digest, variant):
        return None
    if require_gate and marker.get("gatePassed") is False:
        return None  # the manifest check refuses it, with the message
    base = marker.get("baseModel")
    return FetchResult(
        directory=directory,
        variant=variant,
        run_uri=str(marker.get("runUri", "")),
        manifest_digest=digest,
        job_name=str(marker.get("jobName", "")),
        base_model=base if isinstance(base, dict) else {},
        files=marker_files(marker),
        already_complete=True,
        seconds=time.monotonic() - started,
    )


def _fetch_into(
    target: Path,
    store: Store,
    layout: RunLayout,
    manifest: Manifest,
    variant: Variant,
    files: Sequence[FileEntry],
    options: FetchOptions,
    log: Log,
) -> FetchResult:
    """Download the variant's files into the folder (holding its lock), then the marker."""
    _prepare(target, files, layout.run_uri, variant)
    log(
        f"Fetching {variant.value} of {layout.run_uri} ({manifest.digest}): {len(files)} "
        f"files, {human_bytes(sum(f.size for f in files))}, into {target}"
    )
    _check_space(target, files)
    folder = variant_folder(variant)
    downloads = [Download(layout.key(folder + f.path), f) for f in files]
    outcomes = download_files(store, downloads, target, options, log)
    document = _marker_document(layout, manifest, variant, files)
    try:
        with atomic_writer(target / MARKER) as out:
            out.write((json.dumps(document, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise write_error(exc, target / MARKER) from exc
    return FetchResult(
        directory=target,
        variant=variant,
        run_uri=layout.run_uri,
        manifest_digest=manifest.digest,
        job_name=manifest.job_name,
        base_model=_base_model(manifest.lineage),
        files=tuple(files),
        downloaded_bytes=sum(o.downloaded for o in outcomes),
        resumed_bytes=sum(o.resumed for o in outcomes),
        skipped_files=sum(1 for o in outcomes if o.skipped),
    )


def _finish(result: FetchResult, link: str | os.PathLike[str] | None, log: Log) -> FetchResult:
    _make_link(link, result.directory)
    log(summary_line(result))
    return result


def summary_line(result: FetchResult) -> str:
    """One line saying what a fetch did."""
    if result.already_complete:
        return (
            f"{result.directory} already holds {result.variant.value} of {result.run_uri} "
            f"({result.manifest_digest}): nothing to fetch"
        )
    rate = result.downloaded_bytes / 1e6 / result.seconds if result.seconds > 0 else 0.0
    total = sum(f.size for f in result.files)
    kept = ""
    if result.resumed_bytes or result.skipped_files:
        kept = (
            f"; kept {human_bytes(result.resumed_bytes)} of partial files and "
            f"{result.skipped_files} complete file(s) from an earlier fetch"
        )
    return (
        f"Fetched {result.variant.value} of {result.run_uri} into {result.directory}: "
        f"{len(result.files)} files, {human_bytes(total)}, all verified; downloaded "
        f"{human_bytes(result.downloaded_bytes)} in {result.seconds:.1f} s "
        f"({rate:.1f} MB/s){kept}"
    )


def _check_manifest(
    manifest: Manifest, layout: RunLayout, expected: str | None, require_gate: bool
) -> None:
    uri = layout.uri_for(RunLayout.MANIFEST)
    if expected and manifest.digest != expected:
        raise ManifestMismatch(
            f"{uri} is {manifest.digest}, not the expected {expected}: the run was published "
            "again after the deployment pinned it; update the deployment to the new digest",
            uri=uri,
            reason=Reason.SOURCE_NOT_FOUND,
        )
    if require_gate and manifest.lineage.get("gatePassed") is False:
        raise ManifestMismatch(
            f"run {layout.run_uri} failed its evaluation gate (gatePassed: false in its "
            "manifest): deploy a run that passed, or set requireGate: false",
            uri=uri,
            reason=Reason.EVALUATION_GATE_FAILED,
        )


# --- The folder -----------------------------------------------------------------------------


def _walk(directory: Path) -> Iterator[str]:
    """Relative POSIX paths of the files below `directory`."""
    for dirpath, _, filenames in os.walk(directory):
        base = Path(dirpath).relative_to(directory)
        for name in filenames:
            yield (base / name).as_posix()


def _prepare(directory: Path, files: Sequence[FileEntry], run_uri: str, variant: Variant) -> None:
    """Make the folder ready: refuse files that no fetch put there, drop a stale marker and
    the files of an earlier fetch that this variant does not have."""
    marker = read_marker(directory)
    owned = {f.path for f in marker_files(marker)} if marker else set()
    wanted = {f.path for f in files}
    foreign: list[str] = []
    for path in sorted(_walk(directory)):
        name = path.rsplit("/", 1)[-1]
        if path in (MARKER, LOCK):
            continue
        if name.startswith(TEMP_MARKER):
            target_path(directory, path).unlink(missing_ok=True)
            continue
        if path.removesuffix(PART_SUFFIX) not in wanted | owned:
            foreign.append(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise FetchError(
            f"{directory} holds {len(foreign)} file(s) that are not part of {variant.value} of "
            f"{run_uri} ({shown}): fetch into an empty directory, or remove them",
            uri=str(directory),
        )
    (directory / MARKER).unlink(missing_ok=True)
    for path in sorted(owned - wanted):
        target_path(directory, path).unlink(missing_ok=True)
        target_path(directory, path + PART_SUFFIX).unlink(missing_ok=True)


def _check_space(directory: Path, files: Sequence[FileEntry]) -> None:
    """Refuse before downloading when the folder's filesystem cannot take the rest."""
    needed = 0
    for entry in files:
        final = target_path(directory, entry.path)
        on_disk = size_of(final) or size_of(final.with_name(final.name + PART_SUFFIX)) or 0
        needed += max(0, entry.size - on_disk)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FetchError(
            f"{directory} has {human_bytes(free)} free, the variant needs {human_bytes(needed)} "
            "more: use a larger volume (a ModelDeployment's spec.modelCache)",
            uri=str(directory),
        )


@contextmanager
def _locked(directory: Path, log: Log) -> Iterator[None]:
    """Hold the folder's lock; wait (saying so) while another process holds it."""
    try:
        handle = open(directory / LOCK, "a+b")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise write_error(exc, directory / LOCK) from exc
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                log(f"Waiting for another kubetune fetch into {directory} to finish")
                fcntl.lockf(handle, fcntl.LOCK_EX)
            else:
                # No locks on this filesystem: fetches at the same time may download twice,
                # and a file two of them wrote at once fails its checksum, never passes.
                log(f"Could not lock {directory / LOCK} ({exc.strerror}); fetching without it")
        yield
    finally:
        handle.close()


def _make_link(link: str | os.PathLike[str] | None, target: Path) -> None:
    """Point `link` at `target`, replacing an earlier link atomically."""
    if link is None:
        return
    path = Path(link)
    temporary = path.with_name(f"{TEMP_MARKER}{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target.absolute(), target_is_directory=True)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise write_error(exc, path) from exc
