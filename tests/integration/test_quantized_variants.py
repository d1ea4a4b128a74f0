"""Quantized variants through llm-compressor: tiny random model per scheme, SmolLM2 (slow)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1.evaluation import QuantScheme
from kubetune.trainer.data.builtin import quickstart_rows
from kubetune.trainer.export import ExportError
from kubetune.trainer.quantize import (
    QuantizedVariant,
    evaluate_variant,
    quantize,
    safetensors_bytes,
)


def conversations(count: int, skip: int = 0) -> list[dict[str, Any]]:
    """Quickstart rows in the prepared messages form."""
    rows: Iterator[dict[str, str]] = quickstart_rows(count + skip)
    examples = []
    for index, row in enumerate(rows):
        if index >= skip:
            examples.append(
                {
                    "id": str(index),
                    "messages": [
                        {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                        {"role": "assistant", "content": row["output"]},
                    ],
                }
            )
    return examples


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run(
    model_dir: Path, scheme: QuantScheme, out: Path, lines: list[str], **overrides: Any
) -> QuantizedVariant:
    settings: dict[str, Any] = {
        "calibration_samples": 4,
        "group_size": None,
        "max_seq_length": 64,
        "log": lines.append,
    }
    settings.update(overrides)
    return quantize(model_dir, scheme, conversations(8), model_dir, out, **settings)


EXPECTED = {
    QuantScheme.W4A16: ("pack-quantized", {"type": "int", "num_bits": 4, "group_size": 64}, None),
    QuantScheme.W8A8: (
        "int-quantized",
        {"type": "int", "num_bits": 8, "strategy": "channel"},
        {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True},
    ),
    QuantScheme.FP8: (
        "float-quantized",
        {"type": "float", "num_bits": 8, "strategy": "channel"},
        {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True},
    ),
}


@pytest.mark.parametrize("scheme", list(QuantScheme), ids=[s.value for s in QuantScheme])
def test_each_scheme_gives_a_vllm_checkpoint_that_transformers_reloads_and_runs(
    tiny_model_dir: Path,
    tmp_path: Path,
    scheme: QuantScheme,
    capfd: pytest.CaptureFixture[str],
) -> None:
    before = digest(tiny_model_dir)
    lines: list[str] = []
    variant = run(tiny_model_dir, scheme, tmp_path / scheme.value, lines)

    fmt, weights, activations = EXPECTED[scheme]
    folder = tmp_path / scheme.value
    assert variant.folder == folder
    assert variant.format == fmt
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == fmt
    assert quant["ignore"] == ["lm_head"]
    (group,) = quant["config_groups"].values()
    assert weights.items() <= group["weights"].items()
    if activations is None:
        assert group["input_activations"] is None
    else:
        assert activations.items() <= group["input_activations"].items()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert not folder.with_name(folder.name + ".partial").exists()
    assert variant.size_bytes == safetensors_bytes(folder) > 0
    assert variant.calibration_samples == (0 if scheme == QuantScheme.FP8 else 4)
    assert variant.group_size == (64 if scheme == QuantScheme.W4A16 else None)
    assert digest(tiny_model_dir) == before, "quantizing changed the merged folder"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    scores = evaluate_variant(folder, conversations(4, skip=100), tokenizer, 4, new_tokens=3)
    assert math.isfinite(scores["Perplexity"])
    assert scores["Perplexity"] > 1
    assert math.isclose(scores["Perplexity"], math.exp(scores["EvalLoss"]))
    assert isinstance(scores["Sample"], str)

    assert lines[0].startswith(f"Quantizing to {scheme.value} (")
    assert lines[-1].startswith(f"Quantized {scheme.value} in ")
    assert not [line for line in lines if "llm-compressor info" in line]
    captured = capfd.readouterr()
    assert "Compression lifecycle" not in captured.out + captured.err
    assert "METRIC" not in captured.out + captured.err


def test_a_group_size_that_does_not_divide_fails_before_quantizing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    lines: list[str] = []
    with pytest.raises(ExportError, match=r"export\.groupSize 48 does not divide .* 64"):
        run(tiny_model_dir, QuantScheme.W4A16, tmp_path / "q", lines, group_size=48)
    assert not (tmp_path / "q").exists()
    assert lines == []


def test_a_requantized_variant_replaces_the_previous_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "FP8"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    run(tiny_model_dir, QuantScheme.FP8, out, [])
    assert not (out / "stale.safetensors").exists()
    assert (out / "model.safetensors").is_file()


def test_a_failed_quantization_keeps_the_previous_variant_and_no_partial_folder(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer import quantize as module

    out = tmp_path / "FP8"
    run(tiny_model_dir, QuantScheme.FP8, out, [])
    before = digest(out)

    def broken(folder: Path, recipe: object) -> str:
        raise ExportError(module.Reason.INTERNAL_ERROR, "not what vLLM expects")

    monkeypatch.setattr(module, "check_checkpoint", broken)
    with pytest.raises(ExportError, match="not what vLLM expects"):
        run(tiny_model_dir, QuantScheme.FP8, out, [])
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FP8"]


@pytest.mark.slow
def test_smollm2_w4a16_with_eight_calibration_examples(
    builtin_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.evaluate import eval_loss

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    held_out = conversations(24, skip=1000)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir)
    base = math.exp(eval_loss(model, tokenizer, held_out, 8))
    del model

    variant = quantize(
        builtin_model_dir,
        QuantScheme.W4A16,
        conversations(8),
        builtin_model_dir,
        tmp_path / "W4A16",
        calibration_samples=8,
        group_size=None,
        max_seq_length=256,
        log=print,
    )
    scores = evaluate_variant(variant.folder, held_out, tokenizer, 8)
    merged = safetensors_bytes(builtin_model_dir)
    print(
        f"W4A16 (group {variant.group_size}, 8 examples): {variant.seconds:.0f} s, "
        f"{variant.size_bytes / 1e6:.0f} MB of {merged / 1e6:.0f} MB, "
        f"perplexity {base:.3f} -> {scores['Perplexity']:.3f}, sample {scores['Sample']!r}"
    )
    assert variant.group_size == 64
    assert variant.size_bytes < 0.4 * merged
    assert math.isfinite(scores["Perplexity"])
    assert scores["Perplexity"] < 1.5 * base
