"""`kubetune serve`'s vLLM command line: merged and quantized folders served under the
job's name, adapters as LoRA modules on the lineage's base model with a rank vLLM accepts,
and adapters vLLM cannot serve refused with what to do instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1.modeldeployment import Variant
from kubetune.serve import (
    BaseModelArg,
    ServeError,
    adapter_rank,
    base_model_arg,
    command_for,
    lora_problem,
    max_lora_rank,
    resolve_base_model,
    vllm_argv,
)
from kubetune.storage.fetch import FetchResult

BASE = BaseModelArg("HuggingFaceTB/SmolLM2-135M-Instruct", "12fd25f7")


@pytest.mark.parametrize(
    ("variant", "kwargs", "expected"),
    [
        (
            Variant.MERGED,
            {},
            ["vllm", "serve", "/m", "--served-model-name", "bot", "--port", "8000"],
        ),
        (
            Variant.W4A16,
            {"port": 9000, "host": "127.0.0.1"},
            ["vllm", "serve", "/m", "--served-model-name", "bot", "--host", "127.0.0.1",
             "--port", "9000"],
        ),
        (
            Variant.FP8,
            {"extra": ["--max-model-len", "4096", "--port", "9001"]},
            ["vllm", "serve", "/m", "--served-model-name", "bot", "--port", "8000",
             "--max-model-len", "4096", "--port", "9001"],
        ),
        (
            Variant.ADAPTER,
            {"base": BASE, "lora_rank": 16},
            ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "--revision", "12fd25f7",
             "--enable-lora", "--lora-modules", "bot=/m", "--max-lora-rank", "16",
             "--port", "8000"],
        ),
        (
            Variant.ADAPTER,
            {"base": BaseModelArg("/models/base"), "lora_rank": 48},
            ["vllm", "serve", "/models/base", "--enable-lora", "--lora-modules", "bot=/m",
             "--max-lora-rank", "64", "--port", "8000"],
        ),
    ],
    ids=["merged", "quantized-host-port", "extra-args-last", "adapter-hf", "adapter-local"],
)  # fmt: skip
def test_vllm_argv(variant: Variant, kwargs: dict[str, Any], expected: list[str]) -> None:
    assert vllm_argv("/m", variant=variant, served_name="bot", **kwargs) == expected


def test_an_adapter_needs_a_base_model() -> None:
    with pytest.raises(ServeError, match="base model"):
        vllm_argv("/m", variant=Variant.ADAPTER, served_name="bot")


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(1, 8), (8, 8), (9, 16), (16, 16), (100, 128), (300, 320), (512, 512)],
)
def test_max_lora_rank_is_the_smallest_value_vllm_accepts(rank: int, expected: int) -> None:
    assert max_lora_rank(rank) == expected


def test_a_rank_above_what_vllm_serves_is_refused() -> None:
    with pytest.raises(ServeError, match="serve the Merged variant"):
        max_lora_rank(1024)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"r": 16}, 16),
        ({"r": 8, "rank_pattern": {"q_proj": 64, "v_proj": 32}}, 64),
        ({}, 8),
    ],
    ids=["r", "rank-pattern", "peft-default"],
)
def test_adapter_rank(config: dict[str, Any], expected: int) -> None:
    assert adapter_rank(config) == expected


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"peft_type": "LORA", "r": 16}, None),
        ({"peft_type": "LORA", "use_dora": True}, "DoRA"),
        ({"peft_type": "LORA", "modules_to_save": ["lm_head"]}, "modules_to_save (lm_head)"),
        ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
    ],
    ids=["lora", "dora", "modules-to-save", "prefix-tuning"],
)
def test_adapters_vllm_cannot_serve(config: dict[str, Any], problem: str | None) -> None:
    found = lora_problem(config)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


@pytest.mark.parametrize(
    ("uri", "revision", "expected"),
    [
        ("hf://org/base", "abc123", BaseModelArg("org/base", "abc123")),
        ("hf://org/base@v1", None, BaseModelArg("org/base", "v1")),
        ("hf://org/base@v1", "abc123", BaseModelArg("org/base", "abc123")),
        ("hf://org/base", None, BaseModelArg("org/base")),
        ("file:///models/base", None, BaseModelArg("/models/base")),
        ("/models/base", None, BaseModelArg("/models/base")),
        ("builtin://smollm2-135m-instruct", "0.1.0", None),
        ("s3://bucket/base", None, None),
        ("pvc://models/base", None, None),
    ],
    ids=["hf", "hf-uri-revision", "lineage-revision-first", "hf-no-revision", "file", "path",
         "builtin", "s3", "pvc"],
)  # fmt: skip
def test_base_model_arg(uri: str, revision: str | None, expected: BaseModelArg | None) -> None:
    assert base_model_arg(uri, revision) == expected


def test_the_base_model_override_wins_over_the_lineage() -> None:
    lineage = {"uri": "hf://org/base", "revision": "abc123"}
    assert resolve_base_model(lineage, "/local/base") == BaseModelArg("/local/base")
    assert resolve_base_model(lineage, None) == BaseModelArg("org/base", "abc123")


def test_a_run_without_base_model_in_its_lineage_needs_the_override() -> None:
    with pytest.raises(ServeError, match="--base-model"):
        resolve_base_model({}, None)


def fetched(directory: Path, variant: Variant) -> FetchResult:
    return FetchResult(
        directory=directory,
        variant=variant,
        run_uri="s3://bucket/ml-team/support-bot/0123456789ab",
        manifest_digest="sha256:" + "a" * 64,
        job_name="support-bot",
        base_model={"uri": "hf://org/base", "revision": "abc123"},
        files=(),
    )


def test_command_for_an_adapter_reads_its_rank(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 32}))

    argv = command_for(fetched(tmp_path, Variant.ADAPTER), port=8001)

    assert argv == ["vllm", "serve", "org/base", "--revision", "abc123", "--enable-lora",
                    "--lora-modules", f"support-bot={tmp_path}", "--max-lora-rank", "32",
                    "--port", "8001"]  # fmt: skip


def test_command_for_a_dora_adapter_says_to_serve_merged(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))

    with pytest.raises(ServeError, match="serve the Merged variant"):
        command_for(fetched(tmp_path, Variant.ADAPTER))


def test_command_for_merged_needs_no_adapter_config(tmp_path: Path) -> None:
    argv = command_for(fetched(tmp_path, Variant.MERGED))
    assert argv[:5] == ["vllm", "serve", str(tmp_path), "--served-model-name", "support-bot"]
