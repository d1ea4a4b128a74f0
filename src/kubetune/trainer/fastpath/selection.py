"""Which attention implementation a model is loaded with (`training.fastPaths.attention`).

Auto picks per-document varlen attention (`kubetune_varlen`) for packed rows on a GPU
where torch's varlen kernel runs, and SDPA otherwise; explicit choices are honoured or
refused with the fix. Importing this module costs nothing: torch and transformers load
only when a choice is made.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.training import AttentionKernel, FastPaths

logger = logging.getLogger(__name__)

ATTENTION_NAME = "kubetune_varlen"
"""The attn_implementation name of kubetune's per-document attention."""

_FIELD = "training.fastPaths.attention"


@dataclass(frozen=True)
class AttentionChoice:
    """An attn_implementation and why it was chosen."""

    name: str
    reason: str


def attention_choice(
    fast_paths: FastPaths | None, cuda: bool, packed: bool, *, model_config: Any = None
) -> AttentionChoice:
    """The attn_implementation for `training.fastPaths.attention`, with the reason.

    Args:
        fast_paths: `spec.training.fastPaths` (None: the defaults).
        cuda: Training runs on a CUDA GPU.
        packed: Batches are padding-free packed rows (`sft.packing_enabled`).
        model_config: The model's config (a transformers config or config.json as a dict,
            e.g. `ResolvedModel.config`), when known: architectures whose attention
            `kubetune_varlen` cannot compute keep SDPA.

    Raises:
        TrainingSetupError: An explicit choice that cannot run here.
    """
    kernel = (fast_paths or FastPaths()).attention
    unsupported = unsupported_architecture(model_config)
    if kernel == AttentionKernel.AUTO:
        if unsupported and packed:
            return AttentionChoice("sdpa", f"{unsupported}: SDPA")
        return _auto(cuda, packed)
    if kernel == AttentionKernel.SDPA:
        return AttentionChoice("sdpa", f"{_FIELD} is SDPA")
    if kernel == AttentionKernel.EAGER:
        return AttentionChoice("eager", f"{_FIELD} is Eager")
    if kernel == AttentionKernel.VARLEN:
        if unsupported:
            raise _refusal(f"{_FIELD} Varlen: {unsupported}; use Auto or SDPA")
        return _varlen(cuda)
    if kernel == AttentionKernel.FLEX:
        raise _refusal(
            f"{_FIELD} Flex is not available yet: transformers' flex_attention fails to "
            "compile with the trainer image's PyTorch; use Auto (per-document varlen "
            "attention on GPUs) or SDPA"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise _refusal(
            f"{_FIELD} FlashAttention2 needs the flash-attn package, which the trainer image "
            "does not ship; use Auto (PyTorch's own FlashAttention varlen kernel for packed "
            "rows) or Varlen"
        )
    return AttentionChoice("flash_attention_2", f"{_FIELD} is FlashAttention2")


def choose_attention(
    fast_paths: FastPaths | None, cuda: bool, packed: bool, *, model_config: Any = None
) -> AttentionChoice:
    """The attn_implementation to load the model with, and why; registers
    `kubetune_varlen` with transformers when that is the choice."""
    choice = attention_choice(fast_paths, cuda, packed, model_config=model_config)
    if choice.name == ATTENTION_NAME:
        from kubetune.trainer.fastpath.attention import register_attention

        register_attention()
    logger.info("Attention implementation %s: %s", choice.name, choice.reason)
    return choice


def unsupported_architecture(model_config: Any) -> str | None:
    """Why `kubetune_varlen` cannot compute this model's attention, or None.

    It refuses attention-logit soft-capping (Gemma 2) and attention sinks (gpt-oss).
    """
    if model_config is None:
        return None

    def field(key: str) -> Any:
        if isinstance(model_config, Mapping):
            return model_config.get(key)
        return getattr(model_config, key, None)

    name = field("model_type") or "this model"
    if field("attn_logit_softcapping"):
        return f"{name} soft-caps attention logits, which the varlen kernel does not"
    if name == "gpt_oss":
        return f"{name} uses attention sinks, which the varlen kernel does not"
    return None


def _auto(cuda: bool, packed: bool) -> AttentionChoice:
    if not packed:
        return AttentionChoice("sdpa", "batches are padded, not packed: SDPA")
    if not cuda:
        return AttentionChoice(
            "sdpa", "packed rows on a CPU: SDPA with transformers' per-document mask"
        )
    from kubetune.trainer.fastpath.attention import varlen_kernel, varlen_kernel_available

    if not varlen_kernel_available():
        import torch

        missing = (
            f"torch {torch.__version__} has no usable torch.nn.attention.varlen.varlen_attn"
            if varlen_kernel() is None
            else "the GPU is older than Ampere (FlashAttention needs compute capability 8.0)"
        )
        return AttentionChoice(
            "sdpa", f"packed rows, but {missing}: SDPA with transformers' per-document mask"
        )
    return AttentionChoice(
        ATTENTION_NAME, "packed rows on a GPU: per-document varlen attention, no dense mask"
    )


def _varlen(cuda: bool) -> AttentionChoice:
    if not cuda:
        return AttentionChoice(
            ATTENTION_NAME, f"{_FIELD} is Varlen; on a CPU it runs one SDPA call per document"
        )
    from kubetune.trainer.fastpath.attention import varlen_kernel_available

    if not varlen_kernel_available():
        raise _refusal(
            f"{_FIELD} Varlen needs torch.nn.attention.varlen.varlen_attn (PyTorch 2.9 or "
            "newer) and an Ampere or newer GPU; use Auto or SDPA"
        )
    return AttentionChoice(ATTENTION_NAME, f"{_FIELD} is Varlen")


def _refusal(message: str) -> Exception:
    from kubetune.trainer.models import TrainingSetupError

    return TrainingSetupError(Reason.INVALID_SPEC, message)
