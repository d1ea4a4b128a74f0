"""The artifact store interface, key rules and `open_store`.

A store holds objects under relative POSIX keys (`data/train.jsonl`). Two implementations:
`LocalStore` (a directory; also `pvc://` claims mounted in the pod) and `S3Store`
(`s3://bucket/prefix` through boto3). Both stream: no whole file is held in memory, and
readers never see a half-written object.

Keys are derived from validated names and checked again here: absolute keys, `..`, `.`,
empty segments, backslashes and control characters are refused (no path traversal).
Prefixes passed to `list` and `delete_prefix` are folders: `checkpoints/step-000200` means
everything under `checkpoints/step-000200/`, never `checkpoints/step-0002000/`.

This module imports neither boto3 nor torch; `S3Store` imports boto3 when it is created.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from kubetune.storage.errors import InvalidKey

CHUNK_SIZE = 1024 * 1024
"""Bytes read at a time when streaming and hashing."""

TEMP_MARKER = ".kubetune-tmp-"
"""Name prefix of in-flight temporary files; such names are never listed nor accepted."""

CLAIM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
"""A PersistentVolumeClaim name (DNS subdomain)."""

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/kubetune/pvc"
"""Where the operator mounts `pvc://<claim>/…` claims: `<root>/<claim>/…`."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object in a store.

    Attributes:
        key: the key relative to the store root.
        size: size in bytes.
        sha256: hex digest, when known (always after a put; None from `list`).
    """

    key: str
    size: int
    sha256: str | None = None


@runtime_checkable
class Store(Protocol):
    """An artifact store rooted at `uri`; every key is relative to it."""

    @property
    def uri(self) -> str:
        """The store root URI, e.g. `s3://bucket/prefix` or `/abs/path`."""
        ...

    def uri_for(self, key: str) -> str:
        """The URI of one key."""
        ...

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        """Upload a local file; the sha256 is computed while streaming it."""
        ...

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        """Store small content (a marker, a report, a manifest)."""
        ...

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        """Download to a temporary file next to `local_path`, then rename it into place."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole."""
        ...

    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        """A streaming binary reader from byte `offset` (a ranged read when it is above 0,
        which must then be less than the object's size); close it (or use `with`)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under the folder `prefix` (all objects for ""), sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix`; returns how many were deleted."""
        ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative POSIX key for an object, else raise `InvalidKey`.

    Raises:
        InvalidKey: the key is empty, absolute, ends with "/", or has an empty, `.` or `..`
            segment, a backslash, a control character or a temporary-file name.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid object key {key!r}: it must be a non-empty relative path")
    if key.startswith("/"):
        raise InvalidKey(f"invalid object key {key!r}: absolute keys are refused")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidKey(f"invalid object key {key!r}: backslashes and control characters")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(
                f"invalid object key {key!r}: empty, '.' and '..' segments are refused "
                "(no path traversal)"
            )
        if segment.startswith(TEMP_MARKER):
            raise InvalidKey(f"invalid object key {key!r}: {TEMP_MARKER}* names are reserved")
    return key


def validate_prefix(prefix: str) -> str:
    """Normalize a folder prefix: "" stays "", anything else is validated and gets one "/".

    Raises:
        InvalidKey: the prefix would not be a valid key without its trailing slash.
    """
    if prefix == "":
        return ""
    return validate_key(prefix.rstrip("/") if prefix.endswith("/") else prefix) + "/"


def join_key(*parts: str) -> str:
    """Join key parts with "/", skipping empty ones, and validate the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p.strip("/")))


def sha256_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Size and sha256 hex digest of a local file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def sha256_stream(stream: BinaryIO) -> tuple[int, str]:
    """Size and sha256 hex digest of a binary stream, read to its end."""
    digest = hashlib.sha256()
    size = 0
    for chunk in iter_chunks(stream):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def iter_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Chunks of at most `CHUNK_SIZE` bytes until the end of `stream`."""
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


def pvc_root() -> Path:
    """Where `pvc://` claims are mounted (`$KUBETUNE_PVC_ROOT`, default /mnt/kubetune/pvc)."""
    return Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)


def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """Open the store at `uri`.

    Args:
        uri: `s3://bucket[/prefix]`, `pvc://claim[/path]` (the claim's mount under
            `$KUBETUNE_PVC_ROOT`), `file:///path` or a plain local path.
        endpoint_url: S3 endpoint (MinIO, Ceph, …); default `AWS_ENDPOINT_URL_S3` or
            `AWS_ENDPOINT_URL`.
        region: S3 region; default `AWS_REGION`, `AWS_DEFAULT_REGION` or us-east-1.

    Raises:
        InvalidKey: the URI is malformed or its path would escape the claim.
    """
    from kubetune.storage.local import LocalStore

    head, sep, rest = uri.partition("://")
    if not sep:
        return LocalStore(uri)
    if head == "file":
        path = rest.removeprefix("localhost")
        if not path:
            raise InvalidKey(f"invalid URI {uri!r}: file:// needs a path, e.g. file:///data")
        return LocalStore(path, uri=f"file://{path.rstrip('/') or '/'}")
    if head == "pvc":
        claim, _, path = rest.rstrip("/").partition("/")
        if not CLAIM_NAME.match(claim):
            raise InvalidKey(f"invalid URI {uri!r}: expected pvc://<claim>/<path>")
        sub = join_key(claim, path)
        return LocalStore(pvc_root() / sub, uri=f"pvc://{sub}")
    if head == "s3":
        from kubetune.storage.s3 import S3Store

        bucket, _, prefix = rest.partition("/")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region)
    raise InvalidKey(
        f"unsupported artifact store URI {uri!r}: use s3://bucket/prefix, pvc://claim/path, "
        "file:///path or a local path"
    )
