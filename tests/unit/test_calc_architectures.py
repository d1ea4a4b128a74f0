"""The architecture table matches the published parameter counts; configs and model names
resolve to architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.calc import (
    ARCHITECTURES,
    KNOWN_ARCHITECTURES,
    ArchitectureError,
    architecture,
    architecture_from_config,
    load_architecture,
    parameter_count,
)
from kubetune.calc.config import match_known_name

# Published totals (model cards; Gemma-3 4B/12B/27B: the technical report's embedding +
# non-embedding counts of the language model, without the 417M vision encoder), in millions.
PUBLISHED = {
    "smollm2-135m": 134.5,
    "smollm2-360m": 361.8,
    "llama-3.2-1b": 1235.8,
    "llama-3.2-3b": 3212.7,
    "llama-3.1-8b": 8030.3,
    "llama-3.1-70b": 70553.7,
    "qwen2.5-0.5b": 494.0,
    "qwen2.5-1.5b": 1543.7,
    "qwen2.5-3b": 3085.9,
    "qwen2.5-7b": 7615.6,
    "qwen2.5-14b": 14770.0,
    "qwen2.5-32b": 32763.9,
    "qwen2.5-72b": 72706.2,
    "mistral-7b": 7248.0,
    "gemma-2-2b": 2614.3,
    "gemma-2-9b": 9241.7,
    "gemma-2-27b": 27227.1,
    "gemma-3-1b": 999.9,
    "gemma-3-4b": 675 + 3209,
    "gemma-3-12b": 1012 + 10759,
    "gemma-3-27b": 1416 + 25600,
}
# Model-card headline sizes (rounded, as marketed), in billions: within 2 %.
HEADLINE = {
    "qwen2.5-3b": 3.09,
    "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5,
    "qwen2.5-72b": 72.7,
    "gemma-2-2b": 2.61,
    "gemma-2-9b": 9.24,
    "gemma-2-27b": 27.2,
    "gemma-3-1b": 1.0,
}


def test_every_architecture_has_a_published_count() -> None:
    assert set(PUBLISHED) == set(KNOWN_ARCHITECTURES)


def test_builtin_random_builds_a_subset_of_the_known_architectures() -> None:
    # The CRD lists these names and the trainer builds them; the rest are calculator-only.
    assert set(ARCHITECTURES) < set(KNOWN_ARCHITECTURES)
    assert all(ARCHITECTURES[n] is KNOWN_ARCHITECTURES[n] for n in ARCHITECTURES)
    assert {a.model_type for a in ARCHITECTURES.values()} == {"llama", "qwen2", "mistral"}


@pytest.mark.parametrize(("name", "millions"), PUBLISHED.items(), ids=list(PUBLISHED))
def test_parameter_count_matches_the_published_count(name: str, millions: float) -> None:
    assert parameter_count(KNOWN_ARCHITECTURES[name]) / 1e6 == pytest.approx(millions, rel=2e-3)


@pytest.mark.parametrize(("name", "billions"), HEADLINE.items(), ids=list(HEADLINE))
def test_parameter_count_is_near_the_headline_size(name: str, billions: float) -> None:
    assert parameter_count(KNOWN_ARCHITECTURES[name]) / 1e9 == pytest.approx(billions, rel=0.02)


@pytest.mark.parametrize(
    ("name", "head_dim", "q_dim"),
    [("gemma-2-9b", 256, 4096), ("gemma-3-27b", 128, 4096), ("llama-3.1-8b", 128, 4096)],
)
def test_gemma_head_dim_is_explicit_not_hidden_over_heads(
    name: str, head_dim: int, q_dim: int
) -> None:
    arch = KNOWN_ARCHITECTURES[name]
    assert (arch.head_dim, arch.q_dim) == (head_dim, q_dim)


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"llama-3\.1-8b"):
        architecture("gpt-5")


LLAMA_8B_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "head_dim": 128,
}
# A multimodal Gemma 3 config: the language model sits in text_config, with defaults omitted.
GEMMA_3_4B_CONFIG = {
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
    },
    "vision_config": {"hidden_size": 1152},
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LLAMA_8B_CONFIG, "llama-3.1-8b"),
        (GEMMA_3_4B_CONFIG, "gemma-3-4b"),
        ({**LLAMA_8B_CONFIG, "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
          "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
          "vocab_size": 152064, "head_dim": None, "max_position_embeddings": 32768},
         "qwen2.5-7b"),
    ],
    ids=["llama", "gemma3-multimodal", "qwen2"],
)  # fmt: skip
def test_architecture_from_config_matches_the_table(
    config: dict[str, object], expected: str
) -> None:
    arch = architecture_from_config(config)
    assert parameter_count(arch) == parameter_count(KNOWN_ARCHITECTURES[expected])
    assert arch.head_dim == KNOWN_ARCHITECTURES[expected].head_dim


def test_config_without_dimensions_says_what_to_pass() -> None:
    with pytest.raises(ArchitectureError, match=r"lacks hidden_size.*--arch"):
        architecture_from_config({"model_type": "llama", "num_hidden_layers": 2})


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llama-3.1-8b", "llama-3.1-8b"),
        ("builtin://random/llama-3.2-3b", "llama-3.2-3b"),
        ("gemma-2-9b", "gemma-2-9b"),
        ("builtin://smollm2-135m-instruct", "smollm2-135m"),
        ("s3://models/qwen2.5-7b-instruct", "qwen2.5-7b"),
        ("pvc://models/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b"),
    ],
)
def test_load_architecture_from_names_and_uris(model: str, expected: str) -> None:
    assert load_architecture(model) == KNOWN_ARCHITECTURES[expected]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
        ("Qwen/Qwen2.5-72B-Instruct@main", "qwen2.5-72b"),
        ("acme/my-own-model", None),
    ],
)
def test_model_names_match_the_table(name: str, expected: str | None) -> None:
    assert match_known_name(name) == expected


def test_load_architecture_reads_a_folder_or_its_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    by_folder = load_architecture(str(tmp_path))
    by_file = load_architecture(f"file://{tmp_path / 'config.json'}")
    assert parameter_count(by_folder) == parameter_count(by_file) == 8_030_261_248


def test_load_architecture_reads_the_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(GEMMA_3_4B_CONFIG))
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert load_architecture("hf://acme/tiny").q_dim == 2048
    assert load_architecture("hf://acme/tiny@main").name == "hf://acme/tiny@main"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("gpt-5", r"unknown architecture 'gpt-5'; known: .*llama-3\.1-8b"),
        ("builtin://random/gpt-5", r"builtin://random/ builds .*qwen2\.5-7b.*, not 'gpt-5'$"),
        ("builtin://random/gemma-2-9b", r"not 'gemma-2-9b'; pass --arch gemma-2-9b"),
        ("hf://acme/unknown-model", r"not in the local Hugging Face cache.*--arch"),
        ("s3://bucket/custom", r"cannot read s3://bucket/custom here: pass --arch"),
        ("./no/such/folder", r"no such folder"),
    ],
)
def test_load_architecture_errors_say_what_to_do(
    model: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ArchitectureError, match=message):
        load_architecture(model)
