"""Per-document attention for packed (padding-free) rows, registered with transformers as
the attention implementation `kubetune_varlen`.

A padding-free batch is one row holding several documents whose `position_ids` restart at
each document (TRL's padding-free collator also passes the boundaries as `cu_seq_lens_q`
and the longest document as `max_length_q`). Each token must attend only to the earlier
tokens of its own document. transformers' SDPA path gets that right only by building a
dense tokens x tokens mask, most of it masked out, and not at all when the model runs with
a key/value cache (the default of a plain forward call): documents then leak into each
other.

This implementation builds no such mask. A packed row goes to

- `torch.nn.attention.varlen.varlen_attn` (FlashAttention's variable-length kernel, causal
  through `window_size=(-1, 0)`) on a CUDA GPU in bf16/fp16: one call per layer;
- a loop of causal SDPA calls, one per document, everywhere else (CPU, fp32 without
  autocast, attention dropout): the reference the fast path is tested against.

Batches that are not packed rows (a 2D padding mask, or a cache holding earlier tokens, as
in generation) take transformers' own SDPA path with the mask it builds, so evaluation and
generation behave exactly as with `attn_implementation="sdpa"`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kubetune.trainer.fastpath.documents import (
    Documents,
    LastDocuments,
    documents_from_cu_seqlens,
    documents_from_position_ids,
    rows_as_documents,
)
from kubetune.trainer.fastpath.selection import ATTENTION_NAME

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)
_LAST_DOCUMENTS = LastDocuments()
"""Boundaries of the current step, shared by all layers (see documents.py)."""


@dataclass(frozen=True)
class VarlenKernel:
    """torch's variable-length attention and the keyword arguments this torch accepts."""

    fn: Callable[..., Any]
    window: bool
    """Takes `window_size` (torch 2.10+); else only `is_causal` (torch 2.9)."""
    gqa: bool
    """Takes `enable_gqa`; else key/value heads are repeated to the query heads."""
    scale: bool
    """Takes `scale`; else the query is rescaled."""


@functools.cache
def varlen_kernel() -> VarlenKernel | None:
    """torch's varlen_attn with its capabilities, or None when this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    window = "window_size" in params
    if not window and "is_causal" not in params:
        return None
    return VarlenKernel(varlen_attn, window, "enable_gqa" in params, "scale" in params)


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def varlen_kernel_available(device: torch.device | None = None) -> bool:
    """Whether varlen_attn can run on `device` (default: the current CUDA device): torch
    has it, and the GPU is Ampere or newer (FlashAttention's requirement)."""
    if not torch.cuda.is_available() or varlen_kernel() is None:
        return False
    index = device.index if device is not None and device.index is not None else None
    return _capability_ok(torch.cuda.current_device() if index is None else index)


@functools.cache
def _note_once(message: str) -> None:
    logger.warning(message)


def document_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each document of a packed row (transformers' attention interface).

    Args:
        module: The attention layer (for `is_causal` and the model's name in errors).
        query: (batch, heads, tokens, head_dim).
        key: (batch, kv_heads, kv_tokens, head_dim); likewise `value`.
        attention_mask: None for rows without padding; else the SDPA mask of
            `document_mask`, and the call goes to transformers' SDPA path.
        dropout: Attention dropout (the per-document loop applies it).
        scaling: Softmax scale (default head_dim ** -0.5).
        is_causal: Overrides `module.is_causal`.
        sliding_window: Attend to at most this many tokens (Mistral, Qwen2 layers).
        softcap: Not supported (refused).
        s_aux: Not supported (refused).
        **kwargs: `cu_seq_lens_q` and `max_length_q` (TRL's padding-free collator) or
            `position_ids` give the documents; everything else is ignored.

    Returns:
        The output (batch, tokens, heads, head_dim) and no attention weights.
    """
    if softcap is not None or s_aux is not None:
        raise ValueError(
            f"attn_implementation {ATTENTION_NAME} supports neither attention-logit "
            f"soft-capping nor attention sinks, which {type(module).__name__} uses; set "
            "training.fastPaths.attention to SDPA"
        )
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = attention_window(causal, sliding_window)
    documents = _documents(query, kwargs)
    if _use_varlen(query, value, dropout):
        return varlen_attention(query, key, value, documents, scale, window), None
    return per_document_attention(query, key, value, documents, scale, window, dropout), None


def document_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask interface for `kubetune_varlen`: no mask for rows without padding
    and without earlier cached tokens (the attention finds the documents itself), else the
    SDPA mask for the SDPA path."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        attention_mask=attention_mask,
        **kwargs,
    )


def register_attention() -> str:
    """Register `kubetune_varlen` with transformers (idempotent); returns the name to pass
    as `attn_implementation`."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, document_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, document_mask)
    return ATTENTION_NAME


def attention_window(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right) window: (-1, 0) is causal, (-1, -1) attends to all.

    transformers' sliding window of W lets a token see itself and the W - 1 tokens before.
    """
    left = sliding_window - 1 if sliding_window else -1
    if causal:
        return left, 0
    return left, left


def _documents(query: torch.Tensor, kwargs: dict[str, Any]) -> Documents:
    batch, _, length, _ = query.shape
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if batch == 1 and isinstance(cu_seqlens, torch.Tensor):
        max_len = kwargs.get("max_length_q")
        return _LAST_DOCUMENTS.get(
            cu_seqlens,
            ("cu", query.device, length),
            lambda: documents_from_cu_seqlens(cu_seqlens, max_len, query.device),
        )
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor):
        return _LAST_DOCUMENTS.get(
            position_ids,
            ("positions", query.device, batch),
            lambda: documents_from_position_ids(position_ids, batch, query.device),
        )
    return rows_as_documents(batch, length, query.device)


def _use_varlen(query: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    if query.device.type != "cuda" or not varlen_kernel_available(query.device):
        return False
    if dropout > 0:
        _note_once(
            f"{ATTENTION_NAME}: attention dropout is on, which the varlen kernel lacks; "
            "using the slower per-document SDPA loop"
        )
        return False
    if query.shape[-1] != value.shape[-1]:
        return False
    if query.dtype not in _HALF and not torch.is_autocast_enabled("cuda"):
        _note_once(
            f"{ATTENTION_NAME}: {query.dtype} without autocast; the varlen kernel needs bf16 "
            "or fp16, using the slower per-document SDPA loop"
        )
        return False
    return True


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: Documents,
    scale: float,
    window: tuple[int, int],
) -> torch.Tensor:
    """torch's varlen_attn over the flattened rows: (batch, tokens, heads, head_dim)."""
    kernel = varlen_kernel()
    if kernel is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available")
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    dtype = query.dtype if query.dtype in _HALF else torch.get_autocast_dtype("cuda")
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim).to(dtype)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, head_dim).to(dtype)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, head_dim).to(dtype)
    options: dict[str, Any] = {}
    if kv_heads != heads:
        if kernel.gqa:
            options["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    if kernel.window:
        options["window_size"] = window
    elif window[0] == -1:
        options["is_causal"] = window[1] == 0
    else:
        raise ValueError(
            f"{ATTENTION_NAME}: sliding-window attention needs torch 2.10 or newer "
            f"(varlen_attn with window_size); this is torch {torch.__version__}"
        )
    if kernel.scale:
        options["scale"] = scale
    elif scale != head_dim**-0.5:
        q = q * (scale * head_dim**0.5)
    out = kernel.fn(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        documents.cu_seqlens,
        documents.cu_seqlens,
        documents.max_len,
        documents.max_len,
        **options,
    )
    return out.view(batch, length, heads, head_dim)


def per_document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: Documents,
    scale: float,
    window: tuple[int, int],
    dropout: float = 0.0,
) -> torch.Tensor:
    """One SDPA call per document (the reference path): (batch, tokens, heads, head_dim)."""
    batch, heads, length, _ = query.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # (batch, h, t, d) -> (1, h, batch * t, d)
        return x.transpose(0, 1).reshape(1, x.shape[1], batch * length, x.shape[-1])

    q, k, v = flat(query), flat(key), flat(value)
    gqa = k.shape[1] != heads
    offsets = documents.offsets
    outputs = []
    for start, end in itertools.pairwise(offsets):
        if end <= start:
            continue
        mask = window_mask(end - start, window, query.device)
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, start:end],
                v[:, :, start:end],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None and window[1] == 0,
                scale=scale,
                enable_gqa=gqa,
            )
        )
    out = torch.cat(outputs, dim=2)  # (1, heads, batch * tokens, head_dim)
    return out[0].transpose(0, 1).reshape(batch, length, heads, out.shape[-1])


def window_mask(length: int, window: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """A boolean (length, length) mask for a window that is more than causal or full
    attention; None when `is_causal` (or nothing) expresses it."""
    left, right = window
    if left < 0 or left >= length - 1:
        return None
    index = torch.arange(length, device=device)
    distance = index[:, None] - index[None, :]  # query minus key position
    mask = distance <= left
    if right >= 0:
        mask &= -distance <= right
    return mask
