"""Fine-tuning methods and their settings: LoRA, QLoRA, full, prefix and prompt tuning."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel, Fraction, Rule, Text


class Method(str, Enum):
    """How the model's weights are adapted."""

    LORA = "LoRA"
    QLORA = "QLoRA"
    FULL = "Full"
    PREFIX_TUNING = "PrefixTuning"
    PROMPT_TUNING = "PromptTuning"


ADAPTER_METHODS = (Method.LORA, Method.QLORA)
PROMPT_LEARNING_METHODS = (Method.PREFIX_TUNING, Method.PROMPT_TUNING)

ModuleName = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class LoRASpec(ApiModel):
    """Low-rank adapter settings (method LoRA or QLoRA)."""

    rank: Annotated[StrictInt, Field(ge=1, le=1024)] = 16
    """Rank r of the adapter matrices."""

    alpha: Annotated[StrictInt, Field(ge=1, le=4096)] = 32
    """Scaling numerator: updates are scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)."""

    dropout: Fraction = "0.05"
    """Dropout on the adapter input."""

    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=64)] = ["all-linear"]
    """Module names to adapt, e.g. [q_proj, v_proj], or [all-linear] for every linear layer
    except the output head."""

    modules_to_save: Annotated[list[ModuleName], Field(max_length=16)] | None = None
    """Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).
    vLLM cannot serve such adapters as LoRA: deploy the Merged variant."""

    use_dora: bool = Field(default=False, alias="useDoRA")
    """Weight-decomposed LoRA (DoRA). vLLM cannot serve DoRA adapters: deploy Merged."""

    use_rslora: bool = Field(default=False, alias="useRSLoRA")
    """Rank-stabilized scaling alpha / sqrt(rank)."""


class QuantType(str, Enum):
    """4-bit data type of the frozen base weights."""

    NF4 = "NF4"
    FP4 = "FP4"


class ComputeDtype(str, Enum):
    """Data type of the matrix products on dequantized weights."""

    BF16 = "BF16"
    FP16 = "FP16"
    FP32 = "FP32"


class QLoRASpec(ApiModel):
    """4-bit quantization of the frozen base for QLoRA (bitsandbytes)."""

    quant_type: QuantType = QuantType.NF4
    """NF4 (normal-float, recommended) or FP4."""

    double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bits per parameter saved)."""

    compute_dtype: ComputeDtype = ComputeDtype.BF16
    """Data type of the matrix products (BF16 needs an Ampere or newer GPU)."""


class PrefixTuningSpec(ApiModel):
    """Prefix tuning: trained key/value prefixes in every layer."""

    num_virtual_tokens: Annotated[StrictInt, Field(ge=1, le=512)] = 20
    """Number of virtual tokens in the prefix."""

    prefix_projection: bool = False
    """Reparameterize the prefix through a two-layer MLP (more stable, more memory)."""


class PromptTuningInit(str, Enum):
    """How prompt-tuning embeddings start."""

    RANDOM = "Random"
    TEXT = "Text"


class PromptTuningSpec(ApiModel):
    """Prompt tuning: trained soft-prompt embeddings before the input."""

    rules = (
        Rule(
            cel="self.init != 'Text' || has(self.initText)",
            message="init Text needs initText",
            check=lambda p: p.init != PromptTuningInit.TEXT or p.init_text is not None,
            field_path=".initText",
        ),
    )

    num_virtual_tokens: Annotated[StrictInt, Field(ge=1, le=512)] = 20
    """Number of virtual tokens in the soft prompt."""

    init: PromptTuningInit = PromptTuningInit.RANDOM
    """Random, or Text: start from the embeddings of initText."""

    init_text: Text | None = None
    """Text whose token embeddings initialize the soft prompt (with init Text)."""
