"""LocalStore and open_store: atomic writes, streamed hashes, folder listings, no path
traversal, and errors that carry the contract's reasons."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import pytest

from kubetune.api.contract import Reason
from kubetune.storage.errors import AccessDenied, InvalidKey, ObjectNotFound, StorageError
from kubetune.storage.local import LocalStore, atomic_writer
from kubetune.storage.store import TEMP_MARKER, Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_local_store_satisfies_the_protocol(store: LocalStore) -> None:
    assert isinstance(store, Store)


def test_put_file_streams_and_returns_size_and_sha256(store: LocalStore, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, not chunk-aligned
    src = tmp_path / "weights.safetensors"
    src.write_bytes(payload)

    info = store.put_file(src, "ns/job/run/adapter/weights.safetensors")

    assert info.key == "ns/job/run/adapter/weights.safetensors"
    assert info.size == len(payload)
    assert info.sha256 == hashlib.sha256(payload).hexdigest()
    assert (store.root / "ns/job/run/adapter/weights.safetensors").read_bytes() == payload


def test_get_file_round_trip_with_equal_sha256(store: LocalStore, tmp_path: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 5)
    put = store.put_bytes(payload, "a/b.bin")
    dest = tmp_path / "out" / "deep" / "b.bin"

    got = store.get_file("a/b.bin", dest)

    assert dest.read_bytes() == payload
    assert got.sha256 == put.sha256 == hashlib.sha256(payload).hexdigest()
    assert [p.name for p in dest.parent.iterdir()] == ["b.bin"]  # no temp file left


def test_bytes_and_streaming_reads(store: LocalStore) -> None:
    store.put_bytes(b"hello world", "eval/metrics.json")
    assert store.get_bytes("eval/metrics.json") == b"hello world"
    with store.open_read("eval/metrics.json") as stream:
        assert stream.read(5) == b"hello"
        assert stream.read() == b" world"
    assert store.exists("eval/metrics.json")
    assert not store.exists("eval/other.json")
    assert not store.exists("eval")  # a folder is not an object


def test_overwrite_replaces_content(store: LocalStore) -> None:
    store.put_bytes(b"old", "x.txt")
    store.put_bytes(b"new content", "x.txt")
    assert store.get_bytes("x.txt") == b"new content"


def test_failed_write_keeps_the_old_object_and_leaves_no_temp_file(store: LocalStore) -> None:
    store.put_bytes(b"committed", "data/train.jsonl")
    target = store.root / "data/train.jsonl"

    def killed_mid_write() -> None:
        with atomic_writer(target) as handle:
            handle.write(b"half a fi")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        killed_mid_write()

    assert target.read_bytes() == b"committed"
    assert files_under(store.root) == ["data/train.jsonl"]


def test_listing_is_by_folder_sorted_and_skips_temp_files(store: LocalStore) -> None:
    for key in (
        "run/checkpoints/step-000200/model.safetensors",
        "run/checkpoints/step-000200/COMMITTED",
        "run/checkpoints/step-0002000/model.safetensors",
        "run/data/train.jsonl",
    ):
        store.put_bytes(key.encode(), key)
    (store.root / "run/data" / f"{TEMP_MARKER}abc").write_bytes(b"in flight")

    listed = store.list("run/checkpoints/step-000200")

    assert [i.key for i in listed] == [
        "run/checkpoints/step-000200/COMMITTED",
        "run/checkpoints/step-000200/model.safetensors",
    ]
    assert listed[1].size == len(b"run/checkpoints/step-000200/model.safetensors")
    assert [i.key for i in store.list("run/data/")] == ["run/data/train.jsonl"]
    assert len(store.list()) == 4
    assert store.list("nothing/here") == []


def test_delete_and_delete_prefix(store: LocalStore) -> None:
    for key in ("r/checkpoints/step-000100/a", "r/checkpoints/step-000100/b", "r/keep.txt"):
        store.put_bytes(b"x", key)

    assert store.delete_prefix("r/checkpoints/step-000100") == 2
    assert [i.key for i in store.list()] == ["r/keep.txt"]
    assert not (store.root / "r/checkpoints").exists()  # empty folders pruned

    store.delete("r/keep.txt")
    store.delete("r/keep.txt")  # deleting a missing object is fine
    assert store.list() == []
    assert store.delete_prefix("r/missing") == 0


def test_delete_prefix_refuses_the_whole_store(store: LocalStore) -> None:
    store.put_bytes(b"x", "a")
    with pytest.raises(StorageError, match="refusing"):
        store.delete_prefix("")
    assert store.exists("a")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside",
        "a/../../outside",
        "a/./b",
        ".",
        "a//b",
        "a/",
        "a\\..\\b",
        "a/\x00b",
        f"a/{TEMP_MARKER}x",
    ],
)
def test_path_traversal_and_odd_keys_are_refused(store: LocalStore, key: str) -> None:
    with pytest.raises(InvalidKey) as err:
        store.put_bytes(b"x", key)
    assert err.value.reason == Reason.INVALID_SPEC
    with pytest.raises(InvalidKey):
        store.get_bytes(key)
    assert not (store.root.parent / "outside").exists()


@pytest.mark.parametrize("prefix", ["../", "/abs", "a/../.."])
def test_prefix_traversal_is_refused(store: LocalStore, prefix: str) -> None:
    with pytest.raises(InvalidKey):
        store.list(prefix)
    with pytest.raises(InvalidKey):
        store.delete_prefix(prefix)


def test_missing_object_is_source_not_found_naming_the_uri(
    store: LocalStore, tmp_path: Path
) -> None:
    for call in (
        lambda: store.get_bytes("run/manifest.json"),
        lambda: store.open_read("run/manifest.json"),
        lambda: store.get_file("run/manifest.json", tmp_path / "m.json"),
    ):
        with pytest.raises(ObjectNotFound) as err:
            call()
        assert err.value.reason == Reason.SOURCE_NOT_FOUND
        assert store.uri_for("run/manifest.json") in str(err.value)
    assert not (tmp_path / "m.json").exists()


def test_missing_local_source_file_is_reported(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match=re.escape("nope.bin")):
        store.put_file(tmp_path / "nope.bin", "x.bin")


def test_permission_denied_is_unauthorized(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: the tests may run as root, which ignores file modes.
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("kubetune.storage.local.tempfile.mkstemp", refuse)
    with pytest.raises(AccessDenied) as err:
        store.put_bytes(b"x", "a/b")
    assert err.value.reason == Reason.SOURCE_UNAUTHORIZED
    assert store.uri_for("a/b") in str(err.value)
    assert "non-root" in str(err.value)


def test_disk_full_is_an_upload_failure(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kubetune.storage.local.tempfile.mkstemp", full)
    with pytest.raises(StorageError, match="disk full") as err:
        store.put_bytes(b"x", "a/b")
    assert err.value.reason == Reason.UPLOAD_FAILED


def test_open_store_for_local_paths_and_file_uris(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path / "a"))
    assert isinstance(plain, LocalStore)
    assert plain.uri == str(tmp_path / "a")

    by_uri = open_store(f"file://{tmp_path}/b/")
    assert isinstance(by_uri, LocalStore)
    assert by_uri.root == tmp_path / "b"
    assert by_uri.uri_for("manifest.json") == f"file://{tmp_path}/b/manifest.json"


def test_open_store_maps_pvc_claims_under_the_mount_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    store = open_store("pvc://artifacts/runs/")
    assert isinstance(store, LocalStore)
    store.put_bytes(b"x", "ns/job/run/manifest.json")
    assert (tmp_path / "pvc/artifacts/runs/ns/job/run/manifest.json").read_bytes() == b"x"
    assert store.uri_for("k") == "pvc://artifacts/runs/k"


def test_pvc_root_defaults_to_the_operator_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_PVC_ROOT", raising=False)
    store = open_store("pvc://claim/path")
    assert isinstance(store, LocalStore)
    assert store.root == Path("/mnt/kubetune/pvc/claim/path")


@pytest.mark.parametrize(
    "uri", ["pvc://claim/../other", "pvc://", "pvc:///x", "https://example.com/x", "file://"]
)
def test_open_store_refuses_bad_uris(uri: str) -> None:
    with pytest.raises(InvalidKey):
        open_store(uri)


def test_error_messages_scrub_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-456")
    error = StorageError("server said: s3cr3t-value-123 / session-token-456", uri="s3://b/k")
    assert "s3cr3t-value-123" not in str(error)
    assert "session-token-456" not in str(error)
    assert str(error) == "server said: *** / ***"
