"""What each export.quantize scheme is, as plain data: its llm-compressor recipe, its W4A16
group size, the compressed-tensors format its checkpoint must have, and the text it
calibrates on. No torch here: the checks run before any model is loaded and are unit-tested
on numbers alone (`kubetune.trainer.quantize` runs the recipes).

- W4A16: GPTQ, int4 weights in groups along the input dimension, 16-bit activations.
- W8A8: SmoothQuant then GPTQ, int8 weights per output channel and dynamic per-token int8
  activations.
- FP8: FP8_DYNAMIC, fp8 (e4m3) weights per output channel and dynamic per-token fp8
  activations; needs no calibration data.

`lm_head` stays unquantized in every scheme.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import QuantScheme
from kubetune.trainer.export import ExportError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GROUP_SIZES = (128, 64, 32)
"""W4A16 group sizes vLLM's 4-bit GPU kernel (Marlin) supports, largest (smallest file,
fastest) first; the default is the largest that divides every quantized input dimension."""

UNQUANTIZED = ("lm_head",)
"""Modules every scheme leaves in the merged weights' precision."""

SMOOTHING_STRENGTH = 0.8
"""SmoothQuant's alpha in the W8A8 recipe (llm-compressor's recommended value)."""

FORMATS = {
    QuantScheme.W4A16: "pack-quantized",
    QuantScheme.W8A8: "int-quantized",
    QuantScheme.FP8: "float-quantized",
}
"""The compressed-tensors format each scheme is saved in (what vLLM dispatches on)."""


@dataclass(frozen=True)
class Recipe:
    """What one scheme runs, as plain data (the llm-compressor objects are built from it)."""

    scheme: QuantScheme
    group_size: int | None
    """W4A16's group size; None for the per-channel schemes."""

    @property
    def calibrated(self) -> bool:
        """Whether the recipe needs calibration examples."""
        return self.scheme in (QuantScheme.W4A16, QuantScheme.W8A8)

    @property
    def format(self) -> str:
        """The compressed-tensors format of the saved checkpoint."""
        return FORMATS[self.scheme]

    def modifiers(self) -> list[tuple[str, dict[str, Any]]]:
        """The llm-compressor modifiers, in order, with their arguments."""
        ignore = list(UNQUANTIZED)
        if self.scheme == QuantScheme.W4A16:
            return [
                (
                    "GPTQModifier",
                    {"preset": "W4A16", "group_size": self.group_size, "ignore": ignore},
                )
            ]
        if self.scheme == QuantScheme.W8A8:
            return [
                ("SmoothQuantModifier", {"smoothing_strength": SMOOTHING_STRENGTH}),
                ("GPTQModifier", {"preset": "W8A8", "ignore": ignore}),
            ]
        return [("QuantizationModifier", {"preset": "FP8_DYNAMIC", "ignore": ignore})]

    def describe(self) -> str:
        """One line for logs and the report."""
        kept = ", ".join(UNQUANTIZED) + " kept"
        if self.scheme == QuantScheme.W4A16:
            return f"GPTQ: int4 weights in groups of {self.group_size}, 16-bit activations; {kept}"
        if self.scheme == QuantScheme.W8A8:
            return (
                f"SmoothQuant (strength {SMOOTHING_STRENGTH}) + GPTQ: int8 weights per "
                f"channel, dynamic per-token int8 activations; {kept}"
            )
        return "FP8_DYNAMIC: fp8 weights per channel, dynamic per-token fp8 activations; " + kept


def default_group_size(dims: Iterable[int]) -> int:
    """The largest of `GROUP_SIZES` dividing every input dimension (576 → 64)."""
    values = sorted(set(dims))
    if not values:
        raise ExportError(Reason.INVALID_SPEC, "the model has no Linear layer to quantize")
    for size in GROUP_SIZES:
        if all(d % size == 0 for d in values):
            return size
    odd = next(d for d in values if d % GROUP_SIZES[-1])
    raise ExportError(
        Reason.INVALID_SPEC,
        f"export.quantize W4A16: no group size vLLM's 4-bit kernel supports "
        f"({', '.join(map(str, GROUP_SIZES))}) divides the model's input dimension {odd}; "
        "set export.groupSize to a size that divides every dimension "
        f"({', '.join(map(str, values))}), or use W8A8 or FP8",
    )


def resolve_group_size(requested: int | None, in_features: Mapping[str, int]) -> int:
    """export.groupSize if it divides every layer's input dimension, else the default.

    Raises:
        ExportError: the requested size leaves a remainder in some layer.
    """
    if requested is None:
        return default_group_size(in_features.values())
    for name, dim in sorted(in_features.items(), key=lambda item: item[1]):
        if dim % requested:
            usable = _dividing_sizes(in_features.values())
            hint = (
                f"use {', '.join(map(str, usable))}, or leave it unset for the default"
                if usable
                else "use W8A8 or FP8 instead"
            )
            raise ExportError(
                Reason.INVALID_SPEC,
                f"export.groupSize {requested} does not divide the input dimension {dim} "
                f"of layer {name}; {hint}",
            )
    return requested


def _dividing_sizes(dims: Iterable[int]) -> list[int]:
    values = set(dims)
    return [s for s in GROUP_SIZES if all(d % s == 0 for d in values)]


def calibration_text(tokenizer: PreTrainedTokenizerBase, example: Mapping[str, Any]) -> str:
    """One prepared example as the model sees it: conversations through the chat template,
    preference pairs as prompt plus chosen answer, raw text as is."""
    if "text" in example:
        return str(example["text"])
    messages = example.get("messages") or [*example["prompt"], *example["chosen"]]
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def check_checkpoint(folder: Path, recipe: Recipe) -> str:
    """The format recorded in config.json; fails when vLLM would not see a compressed-tensors
    checkpoint of the expected format."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    method, fmt = quant.get("quant_method"), quant.get("format")
    if method != "compressed-tensors" or fmt != recipe.format:
        raise ExportError(
            Reason.INTERNAL_ERROR,
            f"the {recipe.scheme.value} checkpoint in {folder} is not what vLLM expects: "
            f"config.json has quant_method {method!r} and format {fmt!r} (expected "
            f"'compressed-tensors' and {recipe.format!r})",
        )
    return str(fmt)


def scheme_of(folder: Path) -> QuantScheme:
    """The scheme of a saved variant, from its compressed-tensors format."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    fmt = (config.get("quantization_config") or {}).get("format")
    for scheme, known in FORMATS.items():
        if fmt == known:
            return scheme
    raise ExportError(
        Reason.INTERNAL_ERROR, f"{folder} holds no kubetune quantized variant (format {fmt!r})"
    )
