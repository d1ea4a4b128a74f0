"""The pure parts of `kubetune fetch`: variant names and folders, the cache folder of a
manifest digest, and progress lines fit for pod logs."""

from __future__ import annotations

import pytest

from kubetune.api.v1alpha1.modeldeployment import Variant
from kubetune.storage.errors import InvalidKey
from kubetune.storage.fetch import (
    VariantNotFound,
    cache_dir,
    normalize_digest,
    parse_variant,
    select_files,
    variant_folder,
    variants_of,
)
from kubetune.storage.manifest import FileEntry, Manifest
from kubetune.storage.progress import TransferProgress, human_bytes

DIGEST = "sha256:" + "ab" * 32


def manifest(*paths: str) -> Manifest:
    files = tuple(FileEntry(path=p, size=1, sha256="0" * 64) for p in paths)
    return Manifest("0123456789ab", "ml-team", "bot", "2026-01-01T00:00:00Z", files)


@pytest.mark.parametrize(
    ("variant", "folder"),
    [
        (Variant.MERGED, "merged/"),
        (Variant.ADAPTER, "adapter/"),
        (Variant.W4A16, "quantized/W4A16/"),
        (Variant.W8A8, "quantized/W8A8/"),
        (Variant.FP8, "quantized/FP8/"),
    ],
)
def test_variant_folder(variant: Variant, folder: str) -> None:
    assert variant_folder(variant) == folder


@pytest.mark.parametrize(("text", "variant"), [("Merged", Variant.MERGED), ("w4a16", Variant.W4A16),
                                               (" fp8 ", Variant.FP8)])  # fmt: skip
def test_parse_variant_ignores_case(text: str, variant: Variant) -> None:
    assert parse_variant(text) == variant


def test_an_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Merged, Adapter, W4A16, W8A8, FP8"):
        parse_variant("int4")


def test_select_files_strips_the_variant_folder() -> None:
    run = manifest("adapter/a.safetensors", "merged/config.json", "merged/sub/x.json", "eval/m")

    assert [f.path for f in select_files(run, Variant.MERGED, "RUN")] == [
        "config.json",
        "sub/x.json",
    ]
    assert variants_of(run) == [Variant.MERGED, Variant.ADAPTER]
    with pytest.raises(VariantNotFound, match=r"has no W8A8 variant.*it has: Merged, Adapter"):
        select_files(run, Variant.W8A8, "RUN")


@pytest.mark.parametrize("text", [DIGEST, DIGEST.removeprefix("sha256:"), DIGEST.upper()])
def test_normalize_digest(text: str) -> None:
    assert normalize_digest(text) == DIGEST


@pytest.mark.parametrize("text", ["sha256:abc", "md5:" + "ab" * 32, "sha256:" + "zz" * 32])
def test_a_malformed_digest_is_refused(text: str) -> None:
    with pytest.raises(InvalidKey, match="sha256:<64 hex characters>"):
        normalize_digest(text)


def test_cache_dir_is_keyed_by_digest_and_variant() -> None:
    assert str(cache_dir("/models", DIGEST, Variant.W4A16)) == f"/models/{'ab' * 32}/W4A16"


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (40_200, "40.2 kB"), (512_000_000, "512.0 MB"),
     (4_810_000_000, "4.81 GB")],
)  # fmt: skip
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_progress_logs_one_line_per_interval_with_total_and_files() -> None:
    now = [100.0]
    lines: list[str] = []
    progress = TransferProgress(400_000_000, lines.append, interval_s=5, clock=lambda: now[0])
    progress.skip(100_000_000)  # a file already in place
    progress.begin("model-00001.safetensors", 200_000_000, 50_000_000)  # resumed
    progress.begin("model-00002.safetensors", 100_000_000, 0)

    now[0] = 102.0
    progress.add("model-00001.safetensors", 20_000_000)
    assert lines == []  # not due yet
    now[0] = 105.0
    progress.add("model-00002.safetensors", 30_000_000)

    assert lines == [
        "Progress: 200.0 MB of 400.0 MB (50%) at 10.0 MB/s, about 20 s left; "
        "model-00001.safetensors 70.0 MB of 200.0 MB (35%) at 4.0 MB/s; "
        "model-00002.safetensors 30.0 MB of 100.0 MB (30%) at 6.0 MB/s"
    ]
    progress.end("model-00002.safetensors")
    now[0] = 111.0
    progress.add("model-00001.safetensors", 10_000_000)
    assert len(lines) == 2
    assert "model-00002" not in lines[1]
