"""S3 settings from the environment, the Content-MD5 of uploads, and how botocore failures
become errors that name the URI, the budget spent and what to do."""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.exceptions import RetriesExceededError

from kubetune.api.contract import Reason
from kubetune.storage.errors import AccessDenied, ObjectNotFound, StorageError, TransferFailed
from kubetune.storage.s3_config import (
    S3Settings,
    add_content_md5,
    client_config,
    damaged_in_transit,
    settings_from_env,
)
from kubetune.storage.s3_errors import translate_error

URI = "s3://artifacts/runs/ml-team/bot/0123/merged/model.safetensors"
ENDPOINT = "http://minio.storage:9000"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, S3Settings(), id="defaults"),
        pytest.param(
            {
                "AWS_MAX_ATTEMPTS": "3",
                "AWS_RETRY_MODE": "Adaptive",
                "KUBETUNE_S3_CONNECT_TIMEOUT": "2.5",
                "KUBETUNE_S3_READ_TIMEOUT": "0.5",
                "KUBETUNE_S3_TRANSFER_ATTEMPTS": "1",
            },
            S3Settings(3, "adaptive", 2.5, 0.5, 1),
            id="every-variable",
        ),
        pytest.param({"AWS_MAX_ATTEMPTS": " "}, S3Settings(), id="blank-is-unset"),
    ],
)
def test_settings_come_from_the_environment(environ: dict[str, str], expected: S3Settings) -> None:
    assert settings_from_env(environ) == expected


def test_every_malformed_setting_is_named_at_once() -> None:
    environ = {
        "AWS_MAX_ATTEMPTS": "0",
        "AWS_RETRY_MODE": "eager",
        "KUBETUNE_S3_CONNECT_TIMEOUT": "inf",
        "KUBETUNE_S3_READ_TIMEOUT": "soon",
        "KUBETUNE_S3_TRANSFER_ATTEMPTS": "2.5",
    }
    with pytest.raises(StorageError) as err:
        settings_from_env(environ)
    assert err.value.reason == Reason.INVALID_SPEC
    for name, value in environ.items():
        assert f"{name}={value!r}" in err.value.message
    assert "standard, adaptive, legacy" in err.value.message


def test_the_client_counts_attempts_including_the_first() -> None:
    config = client_config(S3Settings(max_attempts=4, retry_mode="standard"), max_concurrency=8)
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}
    assert (config.connect_timeout, config.read_timeout) == (10.0, 120.0)
    assert config.max_pool_connections == 16


def md5_header(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def test_uploads_carry_the_content_md5_of_their_body() -> None:
    data = b"weights" * 100_000
    as_bytes: dict[str, Any] = {"headers": {}, "body": data}
    add_content_md5(as_bytes)
    assert as_bytes["headers"]["Content-MD5"] == md5_header(data)

    stream = io.BytesIO(b"skip" + data)
    stream.seek(4)  # a part reader starts where its part starts and is rewound there
    as_file: dict[str, Any] = {"headers": {}, "body": stream}
    add_content_md5(as_file)
    assert as_file["headers"]["Content-MD5"] == md5_header(data)
    assert stream.tell() == 4


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"headers": {"Content-MD5": "given"}, "body": b"x"}, id="already-set"),
        pytest.param({"headers": {}, "body": None}, id="no-body"),
        pytest.param(
            {
                "headers": {},
                "body": b"x",
                "context": {"endpoint_properties": {"backend": "S3Express"}},
            },
            id="s3-express",
        ),
    ],
)
def test_content_md5_is_left_alone_where_it_does_not_apply(params: dict[str, Any]) -> None:
    before = dict(params["headers"])
    add_content_md5(params)
    assert params["headers"] == before


def client_error(status: int, code: str, message: str = "") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


def translate(exc: Exception, direction: Any = "upload") -> StorageError:
    settings = S3Settings(max_attempts=4, read_timeout=30)
    return translate_error(
        exc, URI, direction, bucket="artifacts", endpoint=ENDPOINT, settings=settings
    )


@pytest.mark.parametrize(
    ("exc", "direction", "expected", "hints"),
    [
        pytest.param(
            client_error(503, "SlowDown", "Please reduce your request rate."),
            "upload",
            Reason.UPLOAD_FAILED,
            ("after 4 attempts", "SlowDown", "throttling", "AWS_MAX_ATTEMPTS (now 4)"),
            id="503-slowdown",
        ),
        pytest.param(
            client_error(500, "InternalError"),
            "download",
            Reason.DOWNLOAD_FAILED,
            ("after 4 attempts", "InternalError", "server's side", "retry later"),
            id="500",
        ),
        pytest.param(
            client_error(400, "BadDigest"),
            "upload",
            Reason.UPLOAD_FAILED,
            ("received other bytes than were sent (BadDigest) on each of 3 attempts",),
            id="bad-digest",
        ),
        pytest.param(
            client_error(400, "EntityTooSmall", "Your proposed upload is smaller"),
            "upload",
            Reason.UPLOAD_FAILED,
            (f"{ENDPOINT} refused the upload", "EntityTooSmall"),
            id="other-4xx",
        ),
        pytest.param(
            EndpointConnectionError(endpoint_url=ENDPOINT),
            "download",
            Reason.DOWNLOAD_FAILED,
            ("after 4 attempts", "reachable"),
            id="unreachable",
        ),
        pytest.param(
            ReadTimeoutError(endpoint_url=ENDPOINT),
            "download",
            Reason.DOWNLOAD_FAILED,
            ("sent nothing for longer than the read timeout (30 s)", "KUBETUNE_S3_READ_TIMEOUT"),
            id="read-timeout",
        ),
        pytest.param(
            ResponseStreamingError(error="Connection reset by peer"),
            "download",
            Reason.DOWNLOAD_FAILED,
            ("connection broke while the body was read",),
            id="broken-body",
        ),
        pytest.param(
            RetriesExceededError(ResponseStreamingError(error="reset")),
            "download",
            Reason.DOWNLOAD_FAILED,
            ("on every attempt of the transfer", "ResponseStreamingError"),
            id="transfer-retries-spent",
        ),
        pytest.param(
            RetriesExceededError(ReadTimeoutError(endpoint_url=ENDPOINT)),
            "download",
            Reason.DOWNLOAD_FAILED,
            ("read timeout (30 s) on every attempt of the transfer",),
            id="transfer-stalled",
        ),
    ],
)
def test_transfer_failures_name_the_uri_the_budget_and_the_fix(
    exc: Exception, direction: str, expected: Reason, hints: tuple[str, ...]
) -> None:
    error = translate(exc, direction)
    assert isinstance(error, TransferFailed)
    assert error.reason == expected
    assert error.uri == URI
    assert URI in error.message
    for hint in hints:
        assert hint in error.message


def test_missing_and_refused_are_not_transfer_failures() -> None:
    assert isinstance(translate(client_error(404, "NoSuchKey")), ObjectNotFound)
    assert isinstance(translate(client_error(403, "AccessDenied")), AccessDenied)


def test_only_damaged_bodies_count_as_damaged_in_transit() -> None:
    assert damaged_in_transit(client_error(400, "BadDigest"))
    assert damaged_in_transit(client_error(400, "XAmzContentSHA256Mismatch"))
    assert not damaged_in_transit(client_error(503, "SlowDown"))
    assert not damaged_in_transit(ResponseStreamingError(error="reset"))
