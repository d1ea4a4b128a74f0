"""`python -m kubetune.storage.delete`: the cleanup pod's command, against moto over HTTP
and a local store; shallow URIs are refused before anything is deleted."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.storage.delete import main, split_uri
from kubetune.storage.errors import InvalidKey
from support.s3 import moto_s3, s3_client, use_fake_aws


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    with moto_s3() as endpoint:
        use_fake_aws(monkeypatch, tmp_path, endpoint)
        client = s3_client(endpoint)
        client.create_bucket(Bucket="artifacts")
        for key in (
            "root/team/job-a/run1/manifest.json",
            "root/team/job-a/run1/adapter/adapter_model.safetensors",
            "root/team/job-a/run2/manifest.json",
            "root/team/job-b/run1/manifest.json",
        ):
            client.put_object(Bucket="artifacts", Key=key, Body=b"x")
        yield endpoint


def keys(endpoint: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket="artifacts")
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_deletes_one_run_and_leaves_the_others(s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["s3://artifacts/root/team/job-a/run1"]) == 0
    assert keys(s3) == ["root/team/job-a/run2/manifest.json", "root/team/job-b/run1/manifest.json"]
    assert "Deleted 2 objects under s3://artifacts/root/team/job-a/run1" in capsys.readouterr().out
    # Already gone: still a success, so the cleanup pod can be retried.
    assert main(["s3://artifacts/root/team/job-a/run1"]) == 0


def test_deletes_a_jobs_prefix(s3: str) -> None:
    assert main(["s3://artifacts/root/team/job-a", "--endpoint-url", s3]) == 0
    assert keys(s3) == ["root/team/job-b/run1/manifest.json"]


@pytest.mark.parametrize(
    "uri", ["s3://artifacts", "s3://artifacts/root", "s3://artifacts/root/../x", "gs://a/b/c"]
)
def test_refuses_uris_that_could_hold_more_than_one_job(
    s3: str, uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["s3://artifacts/root/team/job-a/run1", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {uri}: ")
    assert ("refusing to delete" in err) != uri.startswith("gs://")
    assert len(keys(s3)) == 4  # nothing deleted, not even the valid URI before it


def test_local_store_as_a_subprocess(tmp_path: Path) -> None:
    run = tmp_path / "out" / "team" / "job" / "run1"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "adapter" / "a.safetensors").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.storage.delete", str(run)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not run.exists()
    assert (tmp_path / "out" / "team" / "job").is_dir()
    with pytest.raises(InvalidKey):
        split_uri(str(tmp_path.anchor) + "out")
