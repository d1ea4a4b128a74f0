"""Trainable-parameter counts: hand-computed cases, and PEFT itself on tiny random models."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from kubetune.api.v1alpha1.methods import Method
from kubetune.calc import (
    KNOWN_ARCHITECTURES,
    AdapterSettings,
    architecture_from_config,
    trainable_params,
)
from kubetune.calc.architectures import parameter_count
from kubetune.calc.lora import resolve_target_modules

QV = ("q_proj", "v_proj")

# (architecture, method, settings, trainable) — each worked out by hand in the comment.
HAND_COMPUTED = {
    # per layer: q,o 16*(4096+4096); k,v 16*(4096+1024); gate,up,down 16*(4096+14336): x 32
    "llama-3.1-8b-r16-all-linear": (
        "llama-3.1-8b", Method.LORA, AdapterSettings(rank=16), 41_943_040
    ),
    # per layer: q 8*(2048+2048) + v 8*(2048+512) = 53,248; x 16
    "llama-3.2-1b-r8-q-v": (
        "llama-3.2-1b", Method.LORA, AdapterSettings(rank=8, target_modules=QV), 851_968
    ),
    # per layer: q,o 16*1152; k,v 16*768; gate,up,down 16*2112 = 162,816; x 30
    "smollm2-135m-r16-all-linear": (
        "smollm2-135m", Method.QLORA, AdapterSettings(rank=16), 4_884_480
    ),
    # LoRA as above + DoRA magnitudes: per layer 4096+1024+1024+4096+14336+14336+4096; x 32
    "llama-3.1-8b-r16-dora": (
        "llama-3.1-8b", Method.LORA, AdapterSettings(rank=16, use_dora=True),
        41_943_040 + 32 * 43_008,
    ),
    # q,v LoRA + a full lm_head copy: 128256*4096
    "llama-3.1-8b-q-v-lm-head": (
        "llama-3.1-8b", Method.LORA,
        AdapterSettings(rank=16, target_modules=QV, modules_to_save=("lm_head",)),
        32 * (16 * 8192 + 16 * 5120) + 128_256 * 4096,
    ),
    # 20 virtual tokens x 32 layers x 2 (k, v) x 8 kv heads x 128
    "llama-3.1-8b-prefix": ("llama-3.1-8b", Method.PREFIX_TUNING, AdapterSettings(), 1_310_720),
    # 20 virtual tokens x 4096
    "llama-3.1-8b-prompt": ("llama-3.1-8b", Method.PROMPT_TUNING, AdapterSettings(), 81_920),
    "llama-3.2-1b-full": ("llama-3.2-1b", Method.FULL, AdapterSettings(), 1_235_814_400),
}  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "method", "settings", "expected"), HAND_COMPUTED.values(), ids=list(HAND_COMPUTED)
)
def test_trainable_parameters_match_hand_computation(
    arch: str, method: Method, settings: AdapterSettings, expected: int
) -> None:
    assert trainable_params(KNOWN_ARCHITECTURES[arch], method, settings).trainable == expected


def test_trainable_percent_is_against_all_parameters() -> None:
    params = trainable_params(KNOWN_ARCHITECTURES["llama-3.1-8b"], Method.LORA)
    assert params.total == 8_030_261_248 + 41_943_040
    assert params.percent == pytest.approx(0.5196, abs=1e-4)
    assert dict(params.by_module)["down_proj"] == 32 * 16 * (14336 + 4096)


def test_all_linear_expands_to_the_layer_linears_and_unknown_names_are_refused() -> None:
    assert resolve_target_modules(["v_proj", "all-linear"]) == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown target module 'qkv'; known: all-linear"):
        resolve_target_modules(["qkv"])


# --- PEFT itself, on tiny random models of each family --------------------------------------

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}


def tiny_configs() -> dict[str, Any]:
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

    return {
        "llama": LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2),
        "qwen2-tied-bias": Qwen2Config(
            **TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        ),
        "gemma2-head-dim": Gemma2Config(
            **TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=32
        ),
        "gemma3-qk-norm": Gemma3TextConfig(
            **TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=32
        ),
    }


def peft_configs() -> dict[str, tuple[Any, Method, AdapterSettings]]:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    return {
        "lora-all-linear": (
            LoraConfig(r=4, target_modules="all-linear"), Method.LORA, AdapterSettings(rank=4)
        ),
        "lora-q-v": (
            LoraConfig(r=4, target_modules=list(QV)), Method.LORA,
            AdapterSettings(rank=4, target_modules=QV),
        ),
        "dora": (
            LoraConfig(r=4, target_modules="all-linear", use_dora=True), Method.LORA,
            AdapterSettings(rank=4, use_dora=True),
        ),
        "prefix": (
            PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
            Method.PREFIX_TUNING, AdapterSettings(num_virtual_tokens=5),
        ),
        "prefix-projection": (
            PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM", prefix_projection=True),
            Method.PREFIX_TUNING, AdapterSettings(num_virtual_tokens=5, prefix_projection=True),
        ),
        "prompt": (
            PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
            Method.PROMPT_TUNING, AdapterSettings(num_virtual_tokens=5),
        ),
    }  # fmt: skip


MODELS = ["llama", "qwen2-tied-bias", "gemma2-head-dim", "gemma3-qk-norm"]
ADAPTERS = ["lora-all-linear", "lora-q-v", "dora", "prefix", "prefix-projection", "prompt"]


@pytest.mark.parametrize("model", MODELS)
def test_parameter_count_matches_transformers(model: str) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_configs()[model]
    built = AutoModelForCausalLM.from_config(config)
    arch = architecture_from_config(config.to_dict())
    assert parameter_count(arch) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("model", MODELS)
def test_trainable_parameters_match_peft(model: str, adapter: str) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_configs()[model]
    peft_config, method, settings = peft_configs()[adapter]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice on tied embeddings
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    ours = trainable_params(architecture_from_config(config.to_dict()), method, settings)
    assert (ours.trainable, ours.total) == (trainable, total)


def test_modules_to_save_match_peft() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_configs()["llama"]
    peft_config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_config)
    settings = AdapterSettings(rank=4, target_modules=("q_proj",), modules_to_save=("lm_head",))
    ours = trainable_params(architecture_from_config(config.to_dict()), Method.LORA, settings)
    assert (ours.trainable, ours.total) == peft_model.get_nb_trainable_parameters()
