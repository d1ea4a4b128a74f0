"""`kubetune fetch` against S3 over real HTTP (moto's server on 127.0.0.1) and a local
store: every variant lands verified at the folder's top level; a corrupted object, a run
without manifest and a variant the run lacks are refused with the contract's exit codes; a
broken or killed transfer resumes with a ranged read; memory stays bounded on a 200 MB
file; pods sharing a cache root download once; `kubetune serve` execs vLLM on the result."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.modeldeployment import Variant
from kubetune.cli import main
from kubetune.storage.errors import ManifestMismatch, TransferFailed
from kubetune.storage.fetch import (
    LOCK,
    MARKER,
    FetchError,
    FetchOptions,
    VariantNotFound,
    cache_dir,
    fetch_run,
)
from kubetune.storage.layout import RunLayout
from kubetune.storage.manifest import Manifest, write_manifest
from kubetune.storage.store import ObjectInfo, Store, open_store
from support.s3 import moto_s3, s3_client, use_fake_aws

MIB = 1024 * 1024
SECRET = "fetch-test-secret-Vq83kL"
SHARD_1 = "merged/model-00001-of-00002.safetensors"
BASE_MODEL = {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f7"}
SRC = Path(__file__).resolve().parents[2] / "src"
QUIET = FetchOptions(progress_interval_s=3600, retry_delay_s=0)


def run_contents() -> dict[str, bytes]:
    """A published run with every variant kubetune writes, plus data and eval files."""
    return {
        "data/train.jsonl": b'{"messages": []}\n' * 50,
        "adapter/adapter_model.safetensors": os.urandom(300_000),
        "adapter/adapter_config.json": json.dumps({"peft_type": "LORA", "r": 16}).encode(),
        "adapter/tokenizer.json": b'{"version": "1.0"}',
        SHARD_1: os.urandom(int(2.5 * MIB)),
        "merged/model-00002-of-00002.safetensors": os.urandom(MIB),
        "merged/model.safetensors.index.json": b'{"weight_map": {}}',
        "merged/config.json": b'{"model_type": "llama"}',
        "merged/added_tokens.json": b"",
        "merged/tokenizer.json": b'{"version": "1.0"}',
        "quantized/W4A16/model.safetensors": os.urandom(700_000),
        "quantized/W4A16/config.json": b'{"quantization_config": {"format": "pack-quantized"}}',
        "eval/metrics.json": b'{"ROUGEL": 0.41}',
    }


def publish(
    root: str, contents: dict[str, bytes], *, gate_passed: bool | None = True
) -> tuple[RunLayout, Manifest]:
    """Upload the files, then the manifest (last), as the trainer does."""
    store = open_store(root)
    layout = RunLayout(root, "ml-team", "support-bot", "0123456789ab")
    infos = [store.put_bytes(data, layout.key(path)) for path, data in contents.items()]
    lineage = {"model": BASE_MODEL, "gatePassed": gate_passed}
    return layout, write_manifest(store, layout, infos, lineage=lineage)


def variant_files(contents: dict[str, bytes], folder: str) -> dict[str, bytes]:
    return {p[len(folder) :]: d for p, d in contents.items() if p.startswith(folder)}


def folder_files(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` except the fetch's own marker and lock."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MARKER, LOCK)
    }


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3() as url:
        yield url


@pytest.fixture
def s3_root(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    use_fake_aws(monkeypatch, tmp_path, endpoint, secret=SECRET)
    bucket = f"kt-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/artifacts"


@pytest.fixture(params=["s3", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_root"))
    return str(tmp_path / "artifacts")


# --- Stores that misbehave on purpose ---------------------------------------------------------


class FailingStream:
    """Delivers `limit` bytes, then fails like a reset connection."""

    def __init__(self, inner: Any, limit: int, uri: str) -> None:
        self.inner, self.left, self.uri = inner, limit, uri

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise TransferFailed(
                f"download of {self.uri} failed (ResponseStreamingError: connection reset)",
                uri=self.uri,
                reason=Reason.DOWNLOAD_FAILED,
            )
        data: bytes = self.inner.read(min(size if size > 0 else self.left, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FailingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingStore:
    """Records every streaming read (key, offset); the first read of `fail_key` breaks
    after `fail_after` bytes."""

    def __init__(self, inner: Store, fail_key: str = "", fail_after: int = 0) -> None:
        self.inner = inner
        self.reads: list[tuple[str, int]] = []
        self.fail_key, self.fail_after = fail_key, fail_after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_read(self, key: str, offset: int = 0) -> Any:
        self.reads.append((key, offset))
        stream = self.inner.open_read(key, offset)
        if key == self.fail_key:
            self.fail_key = ""
            return FailingStream(stream, self.fail_after, self.inner.uri_for(key))
        return stream

    def offsets(self, key: str) -> list[int]:
        return [offset for k, offset in self.reads if k == key]


# --- Variants ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "folder"),
    [
        (Variant.MERGED, "merged/"),
        (Variant.ADAPTER, "adapter/"),
        (Variant.W4A16, "quantized/W4A16/"),
    ],
    ids=["merged", "adapter", "w4a16"],
)
def test_each_variant_lands_verified_at_the_folder_top_level(
    root: str, tmp_path: Path, variant: Variant, folder: str
) -> None:
    contents = run_contents()
    layout, manifest = publish(root, contents)
    target = tmp_path / "model"

    result = fetch_run(layout.run_uri, target, variant=variant, options=QUIET)

    expected = variant_files(contents, folder)
    assert folder_files(target) == expected
    assert result.downloaded_bytes == sum(len(d) for d in expected.values())
    assert (result.job_name, result.base_model) == ("support-bot", BASE_MODEL)
    marker = json.loads((target / MARKER).read_text())
    assert marker["manifestDigest"] == manifest.digest
    assert marker["variant"] == variant.value
    assert marker["runUri"] == layout.run_uri
    assert {f["path"]: f["sha256"] for f in marker["files"]} == {
        p: hashlib.sha256(d).hexdigest() for p, d in expected.items()
    }

    again = fetch_run(layout.run_uri, target, variant=variant, options=QUIET)
    assert again.already_complete
    assert again.downloaded_bytes == 0


def test_the_cli_prints_the_folder_and_logs_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, _ = publish(str(tmp_path / "artifacts"), run_contents())

    code = main(["fetch", layout.run_uri, str(tmp_path / "model"), "--variant", "w4a16"])

    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip() == str(tmp_path / "model")
    assert "Fetching W4A16 of" in err
    assert "Verified model.safetensors" in err
    assert "all verified" in err


def test_a_variant_the_run_lacks_is_refused_naming_those_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, _ = publish(str(tmp_path / "artifacts"), run_contents())

    with pytest.raises(VariantNotFound) as err:
        fetch_run(layout.run_uri, tmp_path / "model", variant=Variant.FP8)
    assert "has no FP8 variant" in str(err.value)
    assert "it has: Merged, Adapter, W4A16" in str(err.value)

    code = main(["fetch", layout.run_uri, str(tmp_path / "model"), "--variant", "FP8"])
    assert code == 13  # SourceNotFound
    assert "has no FP8 variant" in capsys.readouterr().err


def test_a_run_without_manifest_is_refused(
    s3_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(s3_root)
    layout = RunLayout(s3_root, "ml-team", "support-bot", "0123456789ab")
    store.put_bytes(b"weights", layout.key("merged/model.safetensors"))
    target = tmp_path / "model"

    code = main(["fetch", layout.run_uri, str(target)])

    err = capsys.readouterr().err
    assert code == 13  # SourceNotFound
    assert f"run {layout.run_uri} is incomplete: it has no manifest.json" in err
    assert not target.exists()
    assert SECRET not in err


# --- Corruption -------------------------------------------------------------------------------


def flipped(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[1000] ^= 0xFF
    return bytes(changed)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (flipped, "does not match the manifest: its sha256 is"),
        (lambda data: data[:-10], "ended after"),
        (lambda data: data + b"extra", "is longer than"),
    ],
    ids=["flipped-byte", "truncated", "longer"],
)
def test_a_corrupted_object_is_refused_and_not_left_in_the_folder(
    s3_root: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutate: Callable[[bytes], bytes],
    expected: str,
) -> None:
    contents = run_contents()
    layout, manifest = publish(s3_root, contents)
    bad = mutate(contents[SHARD_1])
    open_store(s3_root).put_bytes(bad, layout.key(SHARD_1))  # after the manifest
    target = tmp_path / "model"

    code = main(["fetch", layout.run_uri, str(target)])

    err = capsys.readouterr().err
    assert code == 41  # DownloadFailed
    assert expected in err
    assert layout.uri_for(SHARD_1) in err
    if mutate is flipped:
        assert hashlib.sha256(bad).hexdigest() in err
        assert manifest.file(SHARD_1).sha256 in err  # type: ignore[union-attr]
    name = SHARD_1.removeprefix("merged/")
    assert not (target / name).exists()
    assert not (target / f"{name}.part").exists()
    assert not (target / MARKER).exists()
    with pytest.raises(ManifestMismatch) as again:
        fetch_run(layout.run_uri, target, options=QUIET)
    assert again.value.reason == Reason.DOWNLOAD_FAILED


# --- Interrupted transfers --------------------------------------------------------------------


def test_a_broken_stream_is_reopened_where_it_broke(s3_root: str, tmp_path: Path) -> None:
    contents = run_contents()
    layout, _ = publish(s3_root, contents)
    key = layout.key(SHARD_1)
    store = RecordingStore(open_store(layout.output_uri), fail_key=key, fail_after=MIB)
    lines: list[str] = []

    result = fetch_run(
        layout.run_uri, tmp_path / "model", store=store, options=QUIET, log=lines.append
    )

    assert store.offsets(key) == [0, MIB]  # a ranged GET from the byte it broke at
    merged = variant_files(contents, "merged/")
    assert result.downloaded_bytes == sum(len(d) for d in merged.values())  # nothing twice
    assert folder_files(tmp_path / "model") == merged
    assert any(f"reopening at byte {MIB}" in line for line in lines)


def test_an_interrupted_fetch_resumes_from_its_partial_file(s3_root: str, tmp_path: Path) -> None:
    contents = run_contents()
    layout, _ = publish(s3_root, contents)
    key = layout.key(SHARD_1)
    target = tmp_path / "model"
    part = target / "model-00001-of-00002.safetensors.part"
    failing = RecordingStore(open_store(layout.output_uri), fail_key=key, fail_after=MIB)
    one_try = FetchOptions(parallel=1, attempts=1, progress_interval_s=3600)

    with pytest.raises(TransferFailed) as err:
        fetch_run(layout.run_uri, target, store=failing, options=one_try)
    assert err.value.reason == Reason.DOWNLOAD_FAILED
    assert part.stat().st_size == MIB
    assert not (target / "model-00001-of-00002.safetensors").exists()
    assert not (target / MARKER).exists()

    store = RecordingStore(open_store(layout.output_uri))
    result = fetch_run(layout.run_uri, target, store=store, options=QUIET)

    assert store.offsets(key) == [MIB]
    merged = variant_files(contents, "merged/")
    total = sum(len(d) for d in merged.values())
    shard = SHARD_1.removeprefix("merged/")
    before = [name for name in merged if name < shard]  # fetched first: files go in order
    assert (result.resumed_bytes, result.skipped_files) == (MIB, len(before))
    assert result.downloaded_bytes == total - MIB - sum(len(merged[n]) for n in before)
    assert folder_files(target) == merged
    assert not part.exists()


DRIVER = """
import json, sys, time
from pathlib import Path

from kubetune.api.v1alpha1.modeldeployment import Variant
from kubetune.storage.fetch import FetchOptions, fetch_run
from kubetune.storage.layout import parse_run_uri
from kubetune.storage.manifest import read_manifest
from kubetune.storage.store import open_store

args = json.loads(sys.argv[1])
layout = parse_run_uri(args["run_uri"])
store = open_store(layout.output_uri)


class Paused:
    # Delivers `pause_after` bytes, then waits for the gate file (forever without one).
    def __init__(self, inner):
        self.inner, self.left = inner, args["pause_after"]

    def read(self, size=-1):
        if self.left <= 0:
            gate = args.get("gate")
            while not (gate and Path(gate).exists()):
                time.sleep(0.02)
            return self.inner.read(size)
        data = self.inner.read(min(size, self.left))
        self.left -= len(data)
        return data

    def close(self):
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PausingStore:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_read(self, key, offset=0):
        return Paused(self.inner.open_read(key, offset))


if "pause_after" in args:
    store = PausingStore(store)


def memory_kib(field):
    # VmRSS (now) or VmHWM (peak) of this process. getrusage's ru_maxrss would not do: Linux
    # keeps it across execve, so it counts the test process this one was forked from.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


read_manifest(store, layout)  # warm up botocore before measuring memory
# The peak after the fetch minus the resident size now bounds what the fetch added, even
# when an earlier peak (imports) was higher.
before = memory_kib("VmRSS")
result = fetch_run(
    args["run_uri"],
    args.get("dir"),
    cache_root=args.get("cache_root"),
    store=store,
    options=FetchOptions(progress_interval_s=args.get("progress_interval_s", 0.5)),
    log=lambda line: print(line, file=sys.stderr, flush=True),
)
peak = memory_kib("VmHWM")
print(json.dumps({
    "directory": str(result.directory),
    "downloaded": result.downloaded_bytes,
    "already": result.already_complete,
    "peakGrowthKiB": peak - before,
}))
"""


def start_driver(tmp_path: Path, name: str, **args: Any) -> tuple[subprocess.Popen[str], Path]:
    """`fetch_run` in a child process; returns it and the file its stderr goes to."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log = tmp_path / f"{name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(script), json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    return process, log


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(process: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, log.read_text()
    result: dict[str, Any] = json.loads(out)
    return result


def test_a_killed_fetch_resumes_from_what_reached_the_disk(s3_root: str, tmp_path: Path) -> None:
    big = os.urandom(40 * MIB)
    layout, _ = publish(s3_root, {"merged/model.safetensors": big, "merged/config.json": b"{}"})
    target = tmp_path / "model"
    part = target / "model.safetensors.part"
    process, _ = start_driver(
        tmp_path, "killed", run_uri=layout.run_uri, dir=str(target), pause_after=12 * MIB
    )
    try:
        wait_for(lambda: part.exists() and part.stat().st_size >= 12 * MIB, "12 MiB on disk")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    kept = part.stat().st_size
    assert 0 < kept < len(big)
    assert not (target / "model.safetensors").exists()
    assert not (target / MARKER).exists()

    store = RecordingStore(open_store(layout.output_uri))
    result = fetch_run(layout.run_uri, target, store=store, options=QUIET)

    key = layout.key("merged/model.safetensors")
    assert store.offsets(key) == [kept]
    assert result.resumed_bytes == kept
    assert result.downloaded_bytes == len(big) - kept + (0 if result.skipped_files else 2)
    assert hashlib.sha256((target / "model.safetensors").read_bytes()).digest() == (
        hashlib.sha256(big).digest()
    )


def test_memory_stays_bounded_on_a_200_mb_file(s3_root: str, tmp_path: Path) -> None:
    size = 200 * MIB
    store = open_store(s3_root)
    layout = RunLayout(s3_root, "ml-team", "support-bot", "0123456789ab")
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    for _ in range(size // MIB):
        digest.update(block)
    key = layout.key("merged/model.safetensors")
    s3_client(os.environ["AWS_ENDPOINT_URL_S3"]).put_object(
        Bucket=s3_root.removeprefix("s3://").split("/")[0],
        Key=f"artifacts/{key}",
        Body=block * (size // MIB),
    )
    write_manifest(store, layout, [ObjectInfo(key, size, digest.hexdigest())])

    # A short progress interval: on a fast machine the whole fetch takes under half a second.
    process, log = start_driver(
        tmp_path,
        "memory",
        run_uri=layout.run_uri,
        dir=str(tmp_path / "m"),
        progress_interval_s=0.01,
    )
    result = finish(process, log)

    assert result["downloaded"] == size
    growth_mib = result["peakGrowthKiB"] / 1024
    assert growth_mib < 40, f"peak RSS grew by {growth_mib:.0f} MiB fetching a 200 MiB file"
    assert "Progress:" in log.read_text()


# --- The shared cache -------------------------------------------------------------------------


def test_pods_sharing_a_cache_root_download_once(tmp_path: Path) -> None:
    contents = {"merged/model.safetensors": os.urandom(8 * MIB), "merged/config.json": b"{}"}
    layout, manifest = publish(str(tmp_path / "artifacts"), contents)
    cache = tmp_path / "pvc"
    expected_dir = cache_dir(cache, manifest.digest, Variant.MERGED)
    gate = tmp_path / "go"
    first, first_log = start_driver(
        tmp_path,
        "first",
        run_uri=layout.run_uri,
        cache_root=str(cache),
        pause_after=2 * MIB,
        gate=str(gate),
    )
    wait_for(lambda: (expected_dir / "model.safetensors.part").exists(), "the first download")
    second, second_log = start_driver(
        tmp_path, "second", run_uri=layout.run_uri, cache_root=str(cache)
    )
    wait_for(lambda: "Waiting for another kubetune fetch" in second_log.read_text(), "the lock")
    gate.touch()

    one, two = finish(first, first_log), finish(second, second_log)

    assert one["directory"] == two["directory"] == str(expected_dir)
    assert expected_dir.name == "Merged"
    assert expected_dir.parent.name == manifest.digest.removeprefix("sha256:")
    assert (one["downloaded"], one["already"]) == (8 * MIB + 2, False)
    assert (two["downloaded"], two["already"]) == (0, True)
    assert "nothing to fetch" in second_log.read_text()
    assert folder_files(expected_dir) == variant_files(contents, "merged/")


def test_a_pinned_digest_needs_no_store_once_cached(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    layout, manifest = publish(str(root), run_contents())
    cache = tmp_path / "pvc"
    link = tmp_path / "pod" / "model"
    first = fetch_run(
        layout.run_uri, cache_root=cache, expect_digest=manifest.digest, link=link, options=QUIET
    )
    assert link.resolve() == first.directory.resolve()
    shutil.rmtree(root)  # the store is gone: a restarted pod still starts

    again = fetch_run(
        layout.run_uri, cache_root=cache, expect_digest=manifest.digest, link=link, options=QUIET
    )

    assert again.already_complete
    assert again.directory == first.directory
    assert again.job_name == "support-bot"


def test_a_republished_run_is_refused_against_the_pinned_digest(tmp_path: Path) -> None:
    layout, _ = publish(str(tmp_path / "artifacts"), run_contents())
    pinned = "sha256:" + "0" * 64

    code = main(["fetch", layout.run_uri, "--cache-root", str(tmp_path / "pvc"),
                 "--expect-digest", pinned])  # fmt: skip

    assert code == 13  # SourceNotFound
    assert not (tmp_path / "pvc").exists()


def test_a_failed_gate_is_refused_only_when_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, _ = publish(str(tmp_path / "artifacts"), run_contents(), gate_passed=False)

    code = main(["fetch", layout.run_uri, str(tmp_path / "a"), "--require-gate"])
    assert code == 1  # EvaluationGateFailed has no exit code of its own
    assert "failed its evaluation gate" in capsys.readouterr().err
    assert main(["fetch", layout.run_uri, str(tmp_path / "b")]) == 0


# --- The target folder ------------------------------------------------------------------------


def test_files_no_fetch_put_there_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, _ = publish(str(tmp_path / "artifacts"), run_contents())
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")

    code = main(["fetch", layout.run_uri, str(target)])

    assert code == 10  # the user's to fix
    assert "notes.txt" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"
    with pytest.raises(FetchError, match="fetch into an empty directory"):
        fetch_run(layout.run_uri, target)


def test_another_variant_replaces_what_an_earlier_fetch_put_there(tmp_path: Path) -> None:
    contents = run_contents()
    layout, _ = publish(str(tmp_path / "artifacts"), contents)
    target = tmp_path / "model"
    fetch_run(layout.run_uri, target, variant=Variant.MERGED, options=QUIET)

    result = fetch_run(layout.run_uri, target, variant=Variant.ADAPTER, options=QUIET)

    assert folder_files(target) == variant_files(contents, "adapter/")
    assert result.skipped_files == 1  # tokenizer.json: same name, same bytes


# --- kubetune serve ---------------------------------------------------------------------------


FAKE_VLLM = """#!/bin/sh
exec "{python}" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"
"""


def run_serve(tmp_path: Path, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": str(SRC),
        "KUBETUNE_RUNS_CACHE_DIR": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_serve_refuses_without_vllm_before_fetching(tmp_path: Path) -> None:
    layout, _ = publish(str(tmp_path / "artifacts"), run_contents())
    empty = tmp_path / "bin"
    empty.mkdir()

    done = run_serve(tmp_path, str(empty), layout.run_uri)

    assert done.returncode == 1
    assert "pip install 'kubetune[serve]'" in done.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("variant", ["Merged", "Adapter"])
def test_serve_fetches_then_execs_vllm(tmp_path: Path, variant: str) -> None:
    layout, manifest = publish(str(tmp_path / "artifacts"), run_contents())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    done = run_serve(
        tmp_path, path, layout.run_uri, "--variant", variant, "--port", "8123",
        "--", "--max-model-len", "512",
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    folder = str(cache_dir(tmp_path / "cache", manifest.digest, Variant(variant)))
    argv = json.loads(done.stdout)
    if variant == "Merged":
        assert argv == ["serve", folder, "--served-model-name", "support-bot",
                        "--port", "8123", "--max-model-len", "512"]  # fmt: skip
    else:
        assert argv == ["serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "--revision", "12fd25f7",
                        "--enable-lora", "--lora-modules", f"support-bot={folder}",
                        "--max-lora-rank", "16", "--port", "8123",
                        "--max-model-len", "512"]  # fmt: skip
    assert "Starting vllm serve" in done.stderr
