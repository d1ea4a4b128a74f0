"""How S3 failures become `StorageError`s: error codes to contract reasons, with messages
that name the URI and the fix (and never a secret value).

Used by `kubetune.storage.s3` only; importing it loads botocore lazily.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Literal

from kubetune.api.contract import Reason
from kubetune.storage.errors import AccessDenied, ObjectNotFound, StorageError, TransferFailed

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


def translate_error(
    exc: Exception,
    uri: str,
    direction: Direction,
    *,
    bucket: str,
    endpoint: str,
    attempts: int,
) -> StorageError:
    """Map a botocore / s3transfer exception to a `StorageError`.

    Args:
        exc: the exception (ClientError, BotoCoreError, RetriesExceededError).
        uri: the object or prefix the request was about.
        direction: whether a failure counts as UploadFailed or DownloadFailed.
        bucket: the bucket, named when it does not exist.
        endpoint: the endpoint URL (or "AWS S3"), named in messages.
        attempts: botocore's retry budget, named when it was spent.
    """
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        response: dict[str, Any] = exc.response or {}
        error = response.get("Error", {})
        code = str(error.get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = str(error.get("Message", "")) or code
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
        cause = f"{code or status}: {detail}"
    else:
        name = type(exc).__name__
        if name in NO_CREDENTIALS:
            return AccessDenied(f"no usable S3 credentials for {uri}: {name}", uri=uri)
        cause = f"{name}: {exc}"
    return TransferFailed(
        f"{direction} of {uri} failed after {attempts} attempts ({cause}); "
        f"check that {endpoint} is reachable",
        uri=uri,
        reason=Reason.UPLOAD_FAILED if direction == "upload" else Reason.DOWNLOAD_FAILED,
    )


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
