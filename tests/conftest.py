"""Shared test configuration: offline by default, GPU tests skipped without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    # pyproject sets pytest-asyncio's loop scope; where the plugin is not installed (a GPU
    # machine running only the `gpu` tests) the option is declared here, so the unknown-key
    # warning does not fail the run.
    try:
        import pytest_asyncio  # noqa: F401
    except ImportError:
        parser.addini("asyncio_default_fixture_loop_scope", "used by pytest-asyncio")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `soak` campaigns (randomized, long) run only with `make soak` (KUBETUNE_SOAK=1); they
    # are deselected, not skipped, from the default run.
    if os.environ.get("KUBETUNE_SOAK") != "1":
        kept = [item for item in items if "soak" not in item.keywords]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if "soak" in i.keywords])
            items[:] = kept
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def builtin_model_dir() -> Path:
    """The built-in SmolLM2-135M-Instruct as a plain HF folder (converted once, cached in
    $KUBETUNE_CACHE_DIR or ~/.cache/kubetune/models)."""
    from kubetune.api.v1alpha1.finetunejob import ModelSource
    from kubetune.trainer.resolve import resolve_model

    return resolve_model(ModelSource(uri="builtin://smollm2-135m-instruct")).path


@pytest.fixture(scope="session")
def builtin_tokenizer_dir() -> Path:
    """The built-in tokenizer alone (works from the cache on machines without the package)."""
    from kubetune.trainer.resolve import builtin_tokenizer_dir

    return builtin_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_tokenizer_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the built-in tokenizer, saved as a
    local Hugging Face folder: trains in seconds on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
