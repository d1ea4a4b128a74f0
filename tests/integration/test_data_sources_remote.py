"""Dataset sources over real HTTP on 127.0.0.1: s3:// from a local S3 server (moto) and
https:// from a local TLS server with a throwaway certificate authority."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.dataset import DatasetSpec
from kubetune.trainer.data.prepare import DataStageError, prepare_dataset
from support.s3 import moto_s3, s3_client, use_fake_aws

ROWS = [{"instruction": f"Say {i}", "output": f"The number is {i}."} for i in range(20)]


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_data(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    use_fake_aws(monkeypatch, tmp_path, s3_endpoint)
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="datasets")
    client.put_object(Bucket="datasets", Key="support/part-1.jsonl", Body=jsonl(ROWS[:12]))
    client.put_object(Bucket="datasets", Key="support/part-2.jsonl", Body=jsonl(ROWS[12:]))
    client.put_object(Bucket="datasets", Key="support/README.txt", Body=b"not data")
    return "s3://datasets/support"


def prepare(uri: str, tmp_path: Path, model: Path) -> dict[str, object]:
    result = prepare_dataset(
        DatasetSpec(uri=uri),
        tokenizer_dir=model,
        max_seq_length=256,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        workers=1,
        log=lambda _: None,
    )
    return result.summary


def test_s3_glob_reads_every_matching_object(
    s3_data: str, tmp_path: Path, builtin_model_dir: Path
) -> None:
    summary = prepare(f"{s3_data}/part-*.jsonl", tmp_path, builtin_model_dir)
    assert [s["uri"] for s in summary["sources"]] == [
        "s3://datasets/support/part-1.jsonl",
        "s3://datasets/support/part-2.jsonl",
    ]
    assert summary["counts"]["rows"] == 20


def test_s3_missing_prefix_is_source_not_found(
    s3_data: str, tmp_path: Path, builtin_model_dir: Path
) -> None:
    with pytest.raises(DataStageError) as info:
        prepare("s3://datasets/nothing-here/*.jsonl", tmp_path, builtin_model_dir)
    assert info.value.reason == Reason.SOURCE_NOT_FOUND


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("https")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip
    (root / "www").mkdir()
    (root / "www" / "train.jsonl").write_bytes(jsonl(ROWS))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root / "www"), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # the untrusted-certificate test makes handshakes fail on purpose

    server = Server(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(root / "cert.pem", root / "key.pem")
    # Handshake in the handler thread, so a refused handshake still closes its socket.
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}|{root / 'cert.pem'}"
    finally:
        server.shutdown()
        server.server_close()


def test_https_source_is_downloaded_and_verified(
    https_server: str, tmp_path: Path, builtin_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, cert = https_server.split("|")
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    summary = prepare(f"{base}/train.jsonl", tmp_path, builtin_model_dir)
    assert summary["counts"]["rows"] == 20
    with pytest.raises(DataStageError) as info:
        prepare(f"{base}/missing.jsonl", tmp_path / "b", builtin_model_dir)
    assert info.value.reason == Reason.SOURCE_NOT_FOUND


def test_https_refuses_an_untrusted_certificate(
    https_server: str, tmp_path: Path, builtin_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = https_server.split("|")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(DataStageError) as info:
        prepare(f"{base}/train.jsonl", tmp_path, builtin_model_dir)
    assert info.value.reason == Reason.DOWNLOAD_FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
