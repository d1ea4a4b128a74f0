"""Errors of the artifact store, each carrying the contract `Reason` it maps to.

The trainer turns a `StorageError` into its exit code with `exit_code_for(err.reason)`, so
the class of a failure decides whether the operator retries: a missing source or refused
credentials are the user's to fix; a transfer that failed after every retry is
infrastructure. Messages name the URI and say what to do; they never carry secret values
(`redact` scrubs the credentials of the environment from any text we did not write).
"""

from __future__ import annotations

import os

from kubetune.api.contract import JUDGE_API_KEY_ENV, Reason

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "KUBETUNE_HTTPS_TOKEN",
    JUDGE_API_KEY_ENV,
)
"""Environment variables whose values must never appear in a message or a log line: every
credential the operator gives the trainer pod from a Secret (and the Hub token's old name).
The access key id is not secret to AWS, but it names whose keys these are, and an S3 server
that refuses a request may quote it (with the request's Authorization header)."""


def redact(text: str) -> str:
    """Replace the values of the secret environment variables in `text` with `***`.

    Server messages are quoted in our errors; S3 servers never see the secret key, but a
    proxy or a misconfigured endpoint might echo anything, so text we did not write is
    scrubbed before it reaches a message, an event or a log.
    """
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


class StorageError(Exception):
    """A failure of the artifact store.

    Attributes:
        reason: the contract reason (and so the trainer's exit code).
        uri: the object or store the failure is about.
    """

    default_reason = Reason.INTERNAL_ERROR

    def __init__(self, message: str, *, uri: str = "", reason: Reason | None = None) -> None:
        super().__init__(redact(message))
        self.reason: Reason = reason or self.default_reason
        self.uri = uri

    @property
    def message(self) -> str:
        """The message, already redacted."""
        return str(self.args[0])


class ObjectNotFound(StorageError):
    """The object, prefix or bucket does not exist."""

    default_reason = Reason.SOURCE_NOT_FOUND


class AccessDenied(StorageError):
    """The store refused the credentials, or there are none."""

    default_reason = Reason.SOURCE_UNAUTHORIZED


class TransferFailed(StorageError):
    """An upload or download failed after the retry budget (reason UploadFailed or
    DownloadFailed)."""

    default_reason = Reason.UPLOAD_FAILED


class ObjectCorrupt(TransferFailed):
    """Every download of an object came back with other bytes than the store recorded: the
    object itself is damaged (readers with an older copy, e.g. the previous checkpoint,
    fall back to it)."""

    default_reason = Reason.DOWNLOAD_FAILED


class InvalidKey(StorageError, ValueError):
    """A key or name that could escape the run directory (absolute, `..`, empty segment)."""

    default_reason = Reason.INVALID_SPEC


class ManifestMismatch(StorageError):
    """A run or checkpoint does not match its manifest: a missing file (SourceNotFound), or
    a size or sha256 that differs (DownloadFailed: the bytes are not what was published)."""

    default_reason = Reason.DOWNLOAD_FAILED


class RunIncomplete(ManifestMismatch):
    """The run has no manifest.json: it is still running, or it failed before publishing."""

    default_reason = Reason.SOURCE_NOT_FOUND
