"""manifest.json and committed checkpoints: a run is complete only with its manifest, a
corrupted or missing file is refused by name, and only committed checkpoints resume."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kubetune.api.contract import Reason
from kubetune.storage.checkpoints import (
    MARKER,
    Checkpoint,
    commit_checkpoint,
    latest_complete_checkpoint,
    prune_checkpoints,
)
from kubetune.storage.errors import ManifestMismatch, RunIncomplete
from kubetune.storage.layout import RunLayout
from kubetune.storage.local import LocalStore
from kubetune.storage.manifest import (
    manifest_digest,
    read_manifest,
    verify_run,
    write_manifest,
)
from kubetune.storage.store import ObjectInfo

ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


@pytest.fixture
def layout(store: LocalStore) -> RunLayout:
    return RunLayout(store.uri, "local", "quickstart", "0123456789ab")


def upload_run(store: LocalStore, layout: RunLayout) -> list[ObjectInfo]:
    contents = {
        RunLayout.DATA_TRAIN: b'{"messages": []}\n' * 100,
        ADAPTER: os.urandom(64 * 1024),
        RunLayout.EVAL_METRICS: b'{"ROUGEL": 0.41}',
    }
    return [store.put_bytes(data, layout.key(rel)) for rel, data in contents.items()]


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def local_path(store: LocalStore, layout: RunLayout, relative: str) -> Path:
    return store.root / layout.key(relative)


# --- manifest ------------------------------------------------------------------------------


def test_manifest_lists_every_file_with_size_sha256_lineage_and_metrics(
    store: LocalStore, layout: RunLayout
) -> None:
    files = upload_run(store, layout)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    written = write_manifest(
        store,
        layout,
        files,
        lineage={"baseModel": "builtin://smollm2-135m-instruct"},
        metrics={"gatePassed": False},
        created_at=when,
    )

    raw = store.get_bytes(layout.key("manifest.json"))
    doc = json.loads(raw)
    assert list(doc) == [
        "schemaVersion",
        "runId",
        "namespace",
        "jobName",
        "createdAt",
        "files",
        "lineage",
        "metrics",
    ]
    assert doc["runId"] == "0123456789ab"
    assert doc["createdAt"] == "2026-01-02T03:04:05Z"
    assert [f["path"] for f in doc["files"]] == [ADAPTER, "data/train.jsonl", "eval/metrics.json"]
    by_path = {f["path"]: f for f in doc["files"]}
    for info in files:
        rel = layout.relative(info.key)
        assert by_path[rel] == {"path": rel, "size": info.size, "sha256": info.sha256}
    assert doc["metrics"] == {"gatePassed": False}
    assert doc["lineage"] == {"baseModel": "builtin://smollm2-135m-instruct"}
    assert written.digest == manifest_digest(raw)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", written.digest)

    read = read_manifest(store, layout)
    assert read == written
    assert verify_run(store, layout) == written


def test_manifest_hashes_files_listed_without_a_sha256(
    store: LocalStore, layout: RunLayout
) -> None:
    uploaded = upload_run(store, layout)
    listed = store.list(layout.prefix)  # list() gives no sha256
    assert all(info.sha256 is None for info in listed)

    manifest = write_manifest(store, layout, listed)

    expected = {layout.relative(i.key): i.sha256 for i in uploaded}
    assert {f.path: f.sha256 for f in manifest.files} == expected


def test_a_flipped_byte_is_refused_naming_the_file(store: LocalStore, layout: RunLayout) -> None:
    write_manifest(store, layout, upload_run(store, layout))
    flip_byte(local_path(store, layout, ADAPTER))

    with pytest.raises(ManifestMismatch) as err:
        verify_run(store, layout)

    assert ADAPTER in str(err.value)
    assert "sha256" in str(err.value)
    assert "data/train.jsonl" not in str(err.value)
    assert err.value.reason == Reason.DOWNLOAD_FAILED
    # Sizes alone cannot see a flipped byte: that is what check_hashes is for.
    verify_run(store, layout, check_hashes=False)


def test_a_truncated_file_is_refused_even_without_hashes(
    store: LocalStore, layout: RunLayout
) -> None:
    write_manifest(store, layout, upload_run(store, layout))
    path = local_path(store, layout, RunLayout.EVAL_METRICS)
    path.write_bytes(path.read_bytes()[:-1])

    with pytest.raises(ManifestMismatch, match=re.escape("eval/metrics.json is 15 bytes")):
        verify_run(store, layout, check_hashes=False)


def test_missing_files_are_all_reported_at_once(store: LocalStore, layout: RunLayout) -> None:
    write_manifest(store, layout, upload_run(store, layout))
    store.delete(layout.key(ADAPTER))
    store.delete(layout.key(RunLayout.DATA_TRAIN))

    with pytest.raises(ManifestMismatch) as err:
        verify_run(store, layout)

    assert f"{ADAPTER} is missing" in str(err.value)
    assert "data/train.jsonl is missing" in str(err.value)
    assert "2 file(s)" in str(err.value)
    assert err.value.reason == Reason.SOURCE_NOT_FOUND


def test_a_run_without_manifest_is_incomplete(store: LocalStore, layout: RunLayout) -> None:
    upload_run(store, layout)

    for call in (read_manifest, verify_run):
        with pytest.raises(RunIncomplete) as err:
            call(store, layout)
        assert "incomplete" in str(err.value)
        assert layout.run_uri in str(err.value)
        assert err.value.reason == Reason.SOURCE_NOT_FOUND


def test_manifest_refuses_a_file_that_is_not_in_the_store(
    store: LocalStore, layout: RunLayout
) -> None:
    files = upload_run(store, layout)
    ghost = ObjectInfo(key=layout.key("merged/model.safetensors"), size=10, sha256="0" * 64)

    with pytest.raises(
        ManifestMismatch, match=re.escape("merged/model.safetensors is not in the store")
    ):
        write_manifest(store, layout, [*files, ghost])

    assert not store.exists(layout.key("manifest.json"))


def test_manifest_refuses_a_file_whose_size_differs(store: LocalStore, layout: RunLayout) -> None:
    files = upload_run(store, layout)
    wrong = ObjectInfo(key=files[0].key, size=files[0].size + 1, sha256=files[0].sha256)

    with pytest.raises(ManifestMismatch, match=re.escape("data/train.jsonl is 1700 bytes")) as err:
        write_manifest(store, layout, [wrong, *files[1:]])

    assert err.value.reason == Reason.UPLOAD_FAILED
    assert not store.exists(layout.key("manifest.json"))


def test_manifest_refuses_files_of_another_run(store: LocalStore, layout: RunLayout) -> None:
    other = RunLayout(layout.output_uri, "local", "quickstart", "ffffffffffff")
    stray = store.put_bytes(b"x", other.key("adapter/x"))

    with pytest.raises(ManifestMismatch, match="not under"):
        write_manifest(store, layout, [stray])


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"schemaVersion": 1}',
        b'{"schemaVersion": 2, "runId": "0123456789ab"}',
        b'{"schemaVersion": 1, "runId": "0123456789ab", "namespace": "local", "jobName": "q",'
        b' "createdAt": "x", "files": [{"path": "../../etc/passwd", "size": 1, "sha256": "'
        + b"0" * 64
        + b'"}]}',
    ],
)
def test_a_malformed_manifest_is_refused(
    store: LocalStore, layout: RunLayout, content: bytes
) -> None:
    store.put_bytes(content, layout.key("manifest.json"))
    with pytest.raises(ManifestMismatch):
        read_manifest(store, layout)


def test_a_manifest_of_another_run_is_refused(store: LocalStore, layout: RunLayout) -> None:
    write_manifest(store, layout, upload_run(store, layout))
    other = RunLayout(layout.output_uri, "local", "quickstart", "ffffffffffff")
    store.put_bytes(store.get_bytes(layout.key("manifest.json")), other.key("manifest.json"))
    with pytest.raises(ManifestMismatch, match="belongs to run 0123456789ab"):
        read_manifest(store, other)


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(
    store: LocalStore, layout: RunLayout, step: int, *, commit: bool = True
) -> list[ObjectInfo]:
    folder = layout.key(layout.checkpoint(step))
    files = [
        store.put_bytes(os.urandom(4096), folder + "adapter_model.safetensors"),
        store.put_bytes(json.dumps({"step": step}).encode(), folder + "trainer_state.json"),
    ]
    if commit:
        commit_checkpoint(store, layout, step, files)
    return files


def step_of(checkpoint: Checkpoint | None) -> int | None:
    return checkpoint.step if checkpoint else None


def test_no_checkpoint_means_none(store: LocalStore, layout: RunLayout) -> None:
    assert latest_complete_checkpoint(store, layout) is None


def test_latest_checkpoint_ignores_one_without_marker(store: LocalStore, layout: RunLayout) -> None:
    save_checkpoint(store, layout, 200)
    save_checkpoint(store, layout, 400, commit=False)  # killed while uploading

    latest = latest_complete_checkpoint(store, layout)

    assert latest is not None
    assert latest.step == 200
    assert latest.folder == "checkpoints/step-000200/"
    assert [f.path for f in latest.files] == ["adapter_model.safetensors", "trainer_state.json"]


def test_marker_is_written_last_and_lists_files_with_sizes_and_hashes(
    store: LocalStore, layout: RunLayout
) -> None:
    files = save_checkpoint(store, layout, 200)
    marker = json.loads(store.get_bytes(layout.key(layout.checkpoint(200) + MARKER)))
    assert marker["step"] == 200
    assert {(f["path"], f["size"], f["sha256"]) for f in marker["files"]} == {
        (i.key.rsplit("/", 1)[1], i.size, i.sha256) for i in files
    }


def test_latest_checkpoint_ignores_files_that_do_not_match_the_marker(
    store: LocalStore, layout: RunLayout
) -> None:
    save_checkpoint(store, layout, 200)
    save_checkpoint(store, layout, 400)
    weights = local_path(store, layout, layout.checkpoint(400) + "adapter_model.safetensors")
    flip_byte(weights)

    # Sizes match, so only hashing sees the flipped byte.
    fast = latest_complete_checkpoint(store, layout)
    assert step_of(fast) == 400
    checked = latest_complete_checkpoint(store, layout, check_hashes=True)
    assert step_of(checked) == 200

    weights.write_bytes(b"short")
    fast = latest_complete_checkpoint(store, layout)
    assert step_of(fast) == 200


def test_a_corrupt_marker_is_ignored(store: LocalStore, layout: RunLayout) -> None:
    save_checkpoint(store, layout, 200)
    save_checkpoint(store, layout, 400)
    store.put_bytes(b"{not json", layout.key(layout.checkpoint(400) + MARKER))
    latest = latest_complete_checkpoint(store, layout)
    assert step_of(latest) == 200


def test_commit_refuses_a_file_that_is_not_uploaded(store: LocalStore, layout: RunLayout) -> None:
    files = save_checkpoint(store, layout, 200, commit=False)
    store.delete(files[0].key)
    with pytest.raises(
        ManifestMismatch, match=re.escape("adapter_model.safetensors is not in the store")
    ):
        commit_checkpoint(store, layout, 200, files)
    assert latest_complete_checkpoint(store, layout) is None


def test_prune_keeps_the_last_n_complete_checkpoints(store: LocalStore, layout: RunLayout) -> None:
    save_checkpoint(store, layout, 50, commit=False)  # leftover of an interrupted save
    for step in (100, 200, 300, 400, 500):
        save_checkpoint(store, layout, step)
    save_checkpoint(store, layout, 600, commit=False)  # may still be uploading

    deleted = prune_checkpoints(store, layout, keep=2)

    assert deleted == [50, 100, 200, 300]
    remaining = sorted({layout.relative(i.key).split("/")[1] for i in store.list(layout.prefix)})
    assert remaining == ["step-000400", "step-000500", "step-000600"]
    latest = latest_complete_checkpoint(store, layout)
    assert step_of(latest) == 500


def test_prune_with_keep_zero_deletes_every_checkpoint(
    store: LocalStore, layout: RunLayout
) -> None:
    for step in (100, 200):
        save_checkpoint(store, layout, step)
    store.put_bytes(b"x", layout.key(RunLayout.EVAL_METRICS))

    assert prune_checkpoints(store, layout, keep=0) == [100, 200]

    assert [i.key for i in store.list(layout.prefix)] == [layout.key(RunLayout.EVAL_METRICS)]
