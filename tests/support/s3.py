"""A local S3 server for tests: moto's threaded server on 127.0.0.1, over real HTTP, and
fake credentials that never read the developer's ~/.aws or instance metadata."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

_active = [0]
"""moto servers running in this process (they share one in-memory backend)."""


@contextmanager
def moto_s3() -> Iterator[str]:
    """Run moto's S3 server on a free port; yields its endpoint URL.

    Every moto server of a process shares one in-memory backend: when the last one stops,
    its buckets are emptied, so the next test starts from an empty S3."""
    import urllib.request

    import moto.server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _active[0] += 1
    try:
        yield endpoint
    finally:
        _active[0] -= 1
        if _active[0] == 0:
            reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
            urllib.request.urlopen(reset, timeout=30).close()
        server.stop()


def use_fake_aws(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, secret: str = "secret"
) -> None:
    """Point boto3 (and so kubetune's S3 store) at the endpoint with fake credentials."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)


def s3_client(endpoint: str) -> Any:
    """A boto3 client for the test server (path-style addressing)."""
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required")
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
