"""Quantization: group sizes, the error a user sees, recipes, and checkpoint checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import ExportSpec, QuantScheme
from kubetune.trainer.export import ExportError
from kubetune.trainer.quant_schemes import (
    Recipe,
    calibration_text,
    check_checkpoint,
    default_group_size,
    resolve_group_size,
    scheme_of,
)
from kubetune.trainer.quantize import QuantizedVariant, check_quantize_spec, unavailable_reason

# Input dimensions of the Linear layers of real models (hidden, heads x head_dim, MLP).
SMOLLM2_135M = {
    "model.layers.0.self_attn.q_proj": 576,
    "model.layers.0.self_attn.o_proj": 576,
    "model.layers.0.mlp.gate_proj": 576,
    "model.layers.0.mlp.down_proj": 1536,
}


@pytest.mark.parametrize(
    ("dims", "size"),
    [
        pytest.param([576, 1536], 64, id="smollm2-135m-576"),
        pytest.param([960, 2560], 64, id="smollm2-360m-960"),
        pytest.param([2048, 8192], 128, id="smollm2-1.7b"),
        pytest.param([4096, 14336], 128, id="llama-3.1-8b"),
        pytest.param([896, 4864], 128, id="qwen2.5-0.5b"),
        pytest.param([64, 128], 64, id="tiny-test-model"),
        pytest.param([96, 4096], 32, id="only-32-divides"),
    ],
)
def test_default_group_size_is_the_largest_supported_size_dividing_every_dimension(
    dims: list[int], size: int
) -> None:
    assert default_group_size(dims) == size


def test_no_supported_group_size_divides_refuses_with_the_dimension_and_alternatives() -> None:
    with pytest.raises(ExportError) as info:
        default_group_size([576, 1000])
    message = str(info.value)
    assert info.value.reason == Reason.INVALID_SPEC
    assert "1000" in message
    assert "export.groupSize" in message
    assert "W8A8 or FP8" in message


def test_unset_group_size_takes_the_default() -> None:
    assert resolve_group_size(None, SMOLLM2_135M) == 64


@pytest.mark.parametrize("size", [64, 32, 48, 16])
def test_a_group_size_dividing_every_dimension_is_kept(size: int) -> None:
    assert resolve_group_size(size, SMOLLM2_135M) == size


def test_a_group_size_that_does_not_divide_names_the_field_the_layer_and_what_works() -> None:
    with pytest.raises(ExportError) as info:
        resolve_group_size(128, SMOLLM2_135M)
    message = str(info.value)
    assert info.value.reason == Reason.INVALID_SPEC
    assert message.startswith("export.groupSize 128 does not divide the input dimension 576")
    assert "model.layers.0.self_attn" in message or "model.layers.0.mlp" in message
    assert "use 64, 32" in message


def test_a_group_size_larger_than_a_dimension_is_refused() -> None:
    with pytest.raises(ExportError, match=r"export\.groupSize 1024 does not divide .* 576"):
        resolve_group_size(1024, SMOLLM2_135M)


def test_check_quantize_spec_reads_the_dimensions_of_a_saved_config(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=128,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
    ).save_pretrained(tmp_path)
    check_quantize_spec(ExportSpec(quantize=[QuantScheme.W4A16]), tmp_path)
    check_quantize_spec(ExportSpec(quantize=[QuantScheme.W4A16], group_size=32), tmp_path)
    check_quantize_spec(ExportSpec(quantize=[QuantScheme.FP8], group_size=128), tmp_path)
    with pytest.raises(ExportError, match=r"export\.groupSize 128 does not divide"):
        check_quantize_spec(ExportSpec(quantize=[QuantScheme.W4A16], group_size=128), tmp_path)


# Recipes.


@pytest.mark.parametrize(
    ("scheme", "group", "names", "calibrated", "fmt"),
    [
        (QuantScheme.W4A16, 64, ["GPTQModifier"], True, "pack-quantized"),
        (QuantScheme.W8A8, None, ["SmoothQuantModifier", "GPTQModifier"], True, "int-quantized"),
        (QuantScheme.FP8, None, ["QuantizationModifier"], False, "float-quantized"),
    ],
    ids=["W4A16", "W8A8", "FP8"],
)
def test_recipe_per_scheme(
    scheme: QuantScheme, group: int | None, names: list[str], calibrated: bool, fmt: str
) -> None:
    recipe = Recipe(scheme, group)
    assert [name for name, _ in recipe.modifiers()] == names
    assert recipe.calibrated is calibrated
    assert recipe.format == fmt
    quantizing = [args for name, args in recipe.modifiers() if name != "SmoothQuantModifier"]
    assert all(args["ignore"] == ["lm_head"] for args in quantizing)
    assert "lm_head kept" in recipe.describe()


def test_w4a16_recipe_describes_its_group_size() -> None:
    assert "groups of 64" in Recipe(QuantScheme.W4A16, 64).describe()


def test_built_modifiers_carry_the_recipe() -> None:
    from kubetune.trainer.quantize import build_modifiers

    (gptq,) = build_modifiers(Recipe(QuantScheme.W4A16, 64))
    weights = gptq.config_groups["group_0"].weights
    assert (weights.num_bits, weights.type, weights.strategy) == (4, "int", "group")
    assert weights.group_size == 64
    assert weights.symmetric
    assert gptq.config_groups["group_0"].input_activations is None
    assert gptq.ignore == ["lm_head"]

    smooth, gptq = build_modifiers(Recipe(QuantScheme.W8A8, None))
    assert type(smooth).__name__ == "SmoothQuantModifier"
    assert smooth.smoothing_strength == 0.8
    scheme = gptq.resolved_config.config_groups["group_0"]
    assert (scheme.weights.num_bits, scheme.weights.strategy) == (8, "channel")
    activations = scheme.input_activations
    assert (activations.num_bits, activations.strategy, activations.dynamic) == (8, "token", True)

    (fp8,) = build_modifiers(Recipe(QuantScheme.FP8, None))
    assert type(fp8).__name__ == "QuantizationModifier"
    scheme = fp8.resolved_config.config_groups["group_0"]
    assert (scheme.weights.type, scheme.weights.num_bits) == ("float", 8)
    assert scheme.input_activations.dynamic is True
    assert fp8.ignore == ["lm_head"]


# Calibration text.


class ChatTokenizer:
    """Renders conversations as `<role>content` without a real tokenizer."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> str:
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


@pytest.mark.parametrize(
    ("example", "text"),
    [
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            "<user>Q<assistant>A",
        ),
        ({"text": "raw text"}, "raw text"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            },
            "<user>Q<assistant>good",
        ),
    ],
    ids=["conversation", "text", "preference"],
)
def test_calibration_text(example: dict[str, Any], text: str) -> None:
    assert calibration_text(ChatTokenizer(), example) == text  # type: ignore[arg-type]


# Checkpoint checks.


def write_config(folder: Path, quantization: dict[str, Any] | None) -> Path:
    config: dict[str, Any] = {"model_type": "llama"}
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_compressed_tensors_checkpoint_of_the_expected_format_passes(tmp_path: Path) -> None:
    folder = write_config(
        tmp_path, {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    )
    assert check_checkpoint(folder, Recipe(QuantScheme.W4A16, 64)) == "pack-quantized"
    assert scheme_of(folder) == QuantScheme.W4A16


@pytest.mark.parametrize(
    "quantization",
    [
        None,
        {"quant_method": "gptq", "format": "pack-quantized"},
        {"quant_method": "compressed-tensors", "format": "int-quantized"},
    ],
    ids=["no-quantization-config", "other-method", "other-format"],
)
def test_a_checkpoint_vllm_would_misread_fails_loudly(
    tmp_path: Path, quantization: dict[str, Any] | None
) -> None:
    folder = write_config(tmp_path, quantization)
    with pytest.raises(ExportError, match="not what vLLM expects"):
        check_checkpoint(folder, Recipe(QuantScheme.W4A16, 64))


def test_every_scheme_is_available_on_this_machines_cpu() -> None:
    for scheme in QuantScheme:
        assert unavailable_reason(scheme, "cpu") is None


def test_fp8_is_unavailable_without_torch_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.delattr(torch, "float8_e4m3fn")
    assert "no float8_e4m3fn" in (unavailable_reason(QuantScheme.FP8, "cpu") or "")
    assert unavailable_reason(QuantScheme.W8A8, "cpu") is None


def test_an_unavailable_scheme_raises_for_the_report_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubetune.trainer import quantize

    monkeypatch.setattr(quantize, "unavailable_reason", lambda scheme, device: "no fp8 here")
    with pytest.raises(quantize.SchemeUnavailable) as info:
        quantize.quantize(
            tmp_path / "merged",
            QuantScheme.FP8,
            [],
            tmp_path / "merged",
            tmp_path / "FP8",
            calibration_samples=1,
            group_size=None,
            max_seq_length=8,
            log=print,
        )
    assert info.value.scheme == QuantScheme.FP8
    assert info.value.why == "no fp8 here"
    assert str(info.value) == "FP8 not produced: no fp8 here"
    assert list(tmp_path.iterdir()) == []


def test_variant_summary_is_json_ready(tmp_path: Path) -> None:
    variant = QuantizedVariant(
        scheme=QuantScheme.W4A16,
        folder=tmp_path,
        size_bytes=123,
        seconds=4.56,
        recipe="GPTQ",
        format="pack-quantized",
        group_size=64,
        calibration_samples=8,
    )
    assert json.loads(json.dumps(variant.summary())) == {
        "scheme": "W4A16",
        "sizeBytes": 123,
        "seconds": 4.6,
        "recipe": "GPTQ",
        "format": "pack-quantized",
        "groupSize": 64,
        "calibrationSamples": 8,
    }


def test_merge_drift_warns_only_beyond_tolerance() -> None:
    from kubetune.trainer.export_stage import merge_drift

    assert merge_drift(1.0503, 1.0503) is None
    assert merge_drift(1.06, 1.05) is None  # within 2 %
    assert merge_drift(5.0, None) is None  # nothing to compare with
    warning = merge_drift(25633.4, 17245.8)
    assert warning is not None
    assert "+48.6 %" in warning
    assert "adapter/ is exact" in warning
