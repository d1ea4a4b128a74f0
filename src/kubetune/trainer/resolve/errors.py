"""The one error model resolution raises, carrying the contract `Reason` it maps to.

The trainer turns it into its exit code with `exit_code_for(err.reason)`, so the reason
decides whether the operator retries (a missing or refused source is the user's to fix; a
download that failed is infrastructure). Messages name the URI and say what to change; they
never carry secret values: `redact` scrubs the credentials of the environment from any text
we did not write (a hub or S3 server message quoted in ours).
"""

from __future__ import annotations

import re

from kubetune.api.contract import Reason, exit_code_for
from kubetune.storage import errors as storage_errors

SECRET_ENV_VARS = storage_errors.SECRET_ENV_VARS
"""Environment variables whose values must never appear in a message or a log line."""

_HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")


def redact(text: str) -> str:
    """Replace secret values (from the environment, or anything shaped like an HF token)."""
    return _HF_TOKEN_PATTERN.sub("hf_***", storage_errors.redact(text))


class ModelResolutionError(Exception):
    """The model or tokenizer of `spec.model` cannot be resolved.

    Attributes:
        reason: the contract reason (and so the trainer's exit code).
        uri: the model URI the failure is about.
    """

    def __init__(self, reason: Reason, message: str, *, uri: str = "") -> None:
        super().__init__(redact(message))
        self.reason = reason
        self.uri = uri

    @property
    def message(self) -> str:
        """The message, already redacted."""
        return str(self.args[0])

    @property
    def exit_code(self) -> int:
        """The trainer's exit code for this failure."""
        return exit_code_for(self.reason)
