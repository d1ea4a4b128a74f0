"""How S3 failures become `StorageError`s: error codes to contract reasons, with messages
that name the URI, the retry budget that was spent and the fix (and never a secret value).

Used by `kubetune.storage.s3` only; importing it loads botocore lazily.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Literal

from kubetune.api.contract import Reason
from kubetune.storage.errors import AccessDenied, ObjectNotFound, StorageError, TransferFailed
from kubetune.storage.s3_config import (
    CONNECT_TIMEOUT_ENV,
    DAMAGED_IN_TRANSIT_CODES,
    MAX_ATTEMPTS_ENV,
    READ_TIMEOUT_ENV,
    S3Settings,
)

Direction = Literal["upload", "download"]

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
UNAUTHORIZED_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
    }
)
NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError"})
THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "ServiceUnavailable",
    }
)
TIMEOUTS = frozenset({"ReadTimeoutError", "ConnectTimeoutError"})
BROKEN_BODY = frozenset({"ResponseStreamingError", "IncompleteReadError"})


def translate_error(
    exc: Exception,
    uri: str,
    direction: Direction,
    *,
    bucket: str,
    endpoint: str,
    settings: S3Settings,
) -> StorageError:
    """Map a botocore / s3transfer exception to a `StorageError` whose message says what
    failed, after how many attempts, and what to do.

    Args:
        exc: the exception (ClientError, BotoCoreError, RetriesExceededError).
        uri: the object or prefix the request was about.
        direction: whether a failure counts as UploadFailed or DownloadFailed.
        bucket: the bucket, named when it does not exist.
        endpoint: the endpoint URL (or "AWS S3"), named in messages.
        settings: the retry budget and timeouts, named when they were spent.
    """
    from botocore.exceptions import ClientError

    reason = Reason.UPLOAD_FAILED if direction == "upload" else Reason.DOWNLOAD_FAILED
    attempts = settings.max_attempts
    more = f"allow more attempts with {MAX_ATTEMPTS_ENV} (now {attempts})"
    if isinstance(exc, ClientError):
        response: dict[str, Any] = exc.response or {}
        error = response.get("Error", {})
        code = str(error.get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = str(error.get("Message", "")) or code
        cause = f"{code or status}: {detail}"
        if code == "NoSuchBucket":
            return ObjectNotFound(
                f"bucket {bucket} does not exist at {endpoint}: create it or fix the URI ({uri})",
                uri=uri,
            )
        if code in NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{uri} does not exist at {endpoint}: check the URI", uri=uri)
        if code in UNAUTHORIZED_CODES or status == 403:
            return AccessDenied(
                f"{endpoint} refused the credentials for {uri} ({code or status}: {detail}): "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the Secret named by "
                "credentialsSecretRef) and the bucket policy",
                uri=uri,
            )
        if code in DAMAGED_IN_TRANSIT_CODES:
            message = (
                f"{direction} of {uri} failed: {endpoint} received other bytes than were sent "
                f"({code}) on each of {settings.transfer_attempts} attempts; something between "
                "here and the store damages request bodies (a proxy, a faulty network card): "
                "fix it, then retry"
            )
        elif code in THROTTLING_CODES or status in (429, 503):
            message = (
                f"{direction} of {uri} failed after {attempts} attempts: {endpoint} kept "
                f"answering {cause} (it is throttling or overloaded); retry later, or {more}"
            )
        elif isinstance(status, int) and status >= 500:
            message = (
                f"{direction} of {uri} failed after {attempts} attempts: {endpoint} kept "
                f"answering {cause} (a failure on the server's side); retry later, or {more}"
            )
        else:
            message = (
                f"{endpoint} refused the {direction} of {uri} ({cause}): check the URI and "
                "the bucket's settings"
            )
        return TransferFailed(message, uri=uri, reason=reason)
    name = type(exc).__name__
    if name in NO_CREDENTIALS:
        return AccessDenied(f"no usable S3 credentials for {uri}: {name}", uri=uri)
    last = getattr(exc, "last_exception", None)  # s3transfer's RetriesExceededError
    if isinstance(last, Exception) and type(last).__name__ in TIMEOUTS:
        message = (
            f"{direction} of {uri} failed: {endpoint} sent nothing for longer than the read "
            f"timeout ({settings.read_timeout:g} s) on every attempt of the transfer; check "
            "that it is not overloaded and that the network path is sound, or wait longer "
            f"({READ_TIMEOUT_ENV})"
        )
    elif isinstance(last, Exception):
        message = (
            f"{direction} of {uri} failed: the connection broke while the body was read, on "
            f"every attempt of the transfer (last: {type(last).__name__}: {last}); check the "
            f"network path to {endpoint}, then retry"
        )
    elif name in BROKEN_BODY:
        message = (
            f"{direction} of {uri} failed: the connection broke while the body was read "
            f"({name}: {exc}); check the network path to {endpoint}, then retry"
        )
    elif name in TIMEOUTS:
        connect = name == "ConnectTimeoutError"
        which = "connect" if connect else "read"
        seconds = settings.connect_timeout if connect else settings.read_timeout
        variable = CONNECT_TIMEOUT_ENV if connect else READ_TIMEOUT_ENV
        message = (
            f"{direction} of {uri} failed after {attempts} attempts: {endpoint} sent nothing "
            f"for longer than the {which} timeout ({seconds:g} s); check that it is reachable "
            f"and not overloaded, or wait longer ({variable})"
        )
    else:
        message = (
            f"{direction} of {uri} failed after {attempts} attempts ({name}: {exc}); check "
            f"that {endpoint} is reachable from here, then retry, or {more}"
        )
    return TransferFailed(message, uri=uri, reason=reason)


class TranslatingReader(io.RawIOBase):
    """A botocore StreamingBody as a raw binary stream whose read errors (ReadTimeoutError,
    ResponseStreamingError, IncompleteReadError) surface as `StorageError`s."""

    def __init__(
        self,
        body: Any,
        errors: tuple[type[Exception], ...],
        translate: Callable[[Exception], StorageError],
    ) -> None:
        super().__init__()
        self._body = body
        self._errors = errors
        self._translate = translate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data: bytes = self._body.read(len(view))
        except self._errors as exc:
            raise self._translate(exc) from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
