"""How kubetune's S3 client is configured: the retry budget, the retry mode and the timeouts
(from the environment, so a pod, a test or a user can change them without a code change),
and the integrity check of uploads.

- `AWS_MAX_ATTEMPTS` (10): attempts per request, the first included (as in the AWS SDKs);
- `AWS_RETRY_MODE` (standard): botocore's retry mode, standard, adaptive or legacy;
- `KUBETUNE_S3_CONNECT_TIMEOUT` (10): seconds to wait for a connection;
- `KUBETUNE_S3_READ_TIMEOUT` (120): seconds to wait for data on an open connection;
- `KUBETUNE_S3_TRANSFER_ATTEMPTS` (3): reads of a downloaded part whose body breaks or
  stalls, and transfers of an object whose bytes arrive damaged.

The first two are the AWS SDKs' own names, read here because an explicit botocore `Config`
would otherwise hide them. Requests that fail on a connection error, a timeout, 500, 502,
503 or 504 (including S3's `SlowDown` and `InternalError`) are retried by botocore with
exponential backoff and jitter. Every PutObject and UploadPart carries a Content-MD5, so a
server (AWS S3, MinIO, Ceph, rclone) refuses a body damaged on the way with `BadDigest`
instead of storing it; the store then uploads the object again.

Imports botocore lazily; torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import Reason
from kubetune.storage.errors import StorageError

MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"
RETRY_MODE_ENV = "AWS_RETRY_MODE"
CONNECT_TIMEOUT_ENV = "KUBETUNE_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "KUBETUNE_S3_READ_TIMEOUT"
TRANSFER_ATTEMPTS_ENV = "KUBETUNE_S3_TRANSFER_ATTEMPTS"
RETRY_MODES = ("standard", "adaptive", "legacy")

DAMAGED_IN_TRANSIT_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
"""Error codes of a server that received other bytes than the client sent."""


@dataclass(frozen=True)
class S3Settings:
    """Retry budget and timeouts of S3 transfers.

    Attributes:
        max_attempts: attempts per request, including the first.
        retry_mode: botocore's retry mode.
        connect_timeout: seconds to wait for a connection.
        read_timeout: seconds to wait for data on an open connection.
        transfer_attempts: reads of a downloaded part whose body breaks or stalls, and
            whole transfers of one object whose bytes arrive damaged (refused by the
            server, or not matching the recorded size or sha256).
    """

    max_attempts: int = 10
    retry_mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    transfer_attempts: int = 3


def settings_from_env(environ: Mapping[str, str]) -> S3Settings:
    """The settings, with the defaults replaced by the variables that are set.

    Raises:
        StorageError: a variable is malformed (reason InvalidSpec); every malformed one is
            named with what it must be.
    """
    defaults = S3Settings()
    problems: list[str] = []

    def number(name: str, default: float, *, whole: bool) -> Any:
        text = environ.get(name, "").strip()
        if not text:
            return default
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            value = 0
        if not math.isfinite(value) or value <= 0:
            kind = "a whole number of at least 1" if whole else "a number of seconds above 0"
            problems.append(f"{name}={text!r} is not {kind}")
            return default
        return value

    mode = environ.get(RETRY_MODE_ENV, "").strip().lower() or defaults.retry_mode
    if mode not in RETRY_MODES:
        problems.append(f"{RETRY_MODE_ENV}={mode!r} is not one of {', '.join(RETRY_MODES)}")
        mode = defaults.retry_mode
    settings = S3Settings(
        max_attempts=number(MAX_ATTEMPTS_ENV, defaults.max_attempts, whole=True),
        retry_mode=mode,
        connect_timeout=number(CONNECT_TIMEOUT_ENV, defaults.connect_timeout, whole=False),
        read_timeout=number(READ_TIMEOUT_ENV, defaults.read_timeout, whole=False),
        transfer_attempts=number(TRANSFER_ATTEMPTS_ENV, defaults.transfer_attempts, whole=True),
    )
    if problems:
        raise StorageError(
            f"invalid S3 settings in the environment: {'; '.join(problems)}. Fix or unset them",
            reason=Reason.INVALID_SPEC,
        )
    return settings


def client_config(settings: S3Settings, max_concurrency: int) -> Any:
    """botocore's `Config` for the settings: path-style addressing and SigV4 (every
    S3-compatible server), checksums only where an operation requires one (some servers
    reject the newer trailing checksums), and a connection pool for the parallel parts."""
    from botocore.config import Config

    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": settings.max_attempts, "mode": settings.retry_mode},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max(10, 2 * max_concurrency),
    )


def register_content_md5(client: Any) -> None:
    """Send Content-MD5 with every PutObject and UploadPart of `client`."""
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-call.s3.{operation}", add_content_md5)


def add_content_md5(params: dict[str, Any], **_: Any) -> None:
    """botocore `before-call` handler: add the Content-MD5 of the request body (bytes, or a
    seekable file such as the part reader of boto3's transfer manager, read once more and
    rewound) unless the request already carries one."""
    headers = params["headers"]
    body = params.get("body")
    endpoint = params.get("context", {}).get("endpoint_properties", {})
    if "Content-MD5" in headers or body is None or endpoint.get("backend") == "S3Express":
        return  # S3 Express One Zone (directory buckets) takes no Content-MD5
    digest = hashlib.md5(usedforsecurity=False)
    if isinstance(body, bytes | bytearray):
        digest.update(body)
    elif hasattr(body, "read") and hasattr(body, "seek") and hasattr(body, "tell"):
        start = body.tell()
        while chunk := body.read(1024 * 1024):
            digest.update(chunk)
        body.seek(start)
    else:
        return
    headers["Content-MD5"] = base64.b64encode(digest.digest()).decode("ascii")


def damaged_in_transit(exc: Exception) -> bool:
    """Whether the server refused a request because its body did not arrive intact."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    return str((exc.response or {}).get("Error", {}).get("Code", "")) in DAMAGED_IN_TRANSIT_CODES
