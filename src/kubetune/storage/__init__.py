"""The artifact store: local directories, `pvc://` claims and `s3://`; run layout and
identity; `manifest.json` and committed checkpoints.

Importing this package loads neither boto3 nor torch: `S3Store` imports boto3 when it is
created (`open_store("s3://…")`), so the operator can use the layout and run ids.
"""

from __future__ import annotations

from kubetune.storage.errors import (
    AccessDenied,
    InvalidKey,
    ManifestMismatch,
    ObjectNotFound,
    RunIncomplete,
    StorageError,
    TransferFailed,
)
from kubetune.storage.layout import RunLayout, new_run_id, parse_run_uri, run_id_for, spec_hash
from kubetune.storage.store import ObjectInfo, Store, open_store

__all__ = [
    "AccessDenied",
    "InvalidKey",
    "ManifestMismatch",
    "ObjectInfo",
    "ObjectNotFound",
    "RunIncomplete",
    "RunLayout",
    "StorageError",
    "Store",
    "TransferFailed",
    "new_run_id",
    "open_store",
    "parse_run_uri",
    "run_id_for",
    "spec_hash",
]
