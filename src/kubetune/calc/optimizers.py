"""Optimizer state sizes: which optimizer `Auto` means and how many bytes its states take."""

from __future__ import annotations

from kubetune.api.v1alpha1.methods import Method
from kubetune.api.v1alpha1.training import Optimizer
from kubetune.calc.architectures import Architecture
from kubetune.calc.lora import AdapterSettings, resolve_target_modules

EIGHT_BIT = (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)
"""bitsandbytes 8-bit AdamW: two uint8 states per parameter (block statistics are noise)."""
PAGED = (Optimizer.PAGED_ADAMW_8BIT, Optimizer.PAGED_ADAMW_32BIT)
"""Paged optimizers move states to CPU memory only under pressure; steady state is on the GPU."""


def resolve_optimizer(method: Method, optimizer: Optimizer) -> Optimizer:
    """The optimizer `Auto` stands for: PagedAdamW8bit for QLoRA, AdamW otherwise."""
    if optimizer != Optimizer.AUTO:
        return optimizer
    return Optimizer.PAGED_ADAMW_8BIT if method == Method.QLORA else Optimizer.ADAMW


def _matrices(
    arch: Architecture, method: Method, settings: AdapterSettings
) -> list[tuple[int, int]]:
    """(rows, columns) of every trainable tensor (vectors as (n, 1)), for Adafactor."""
    h, layers = arch.hidden_size, arch.num_layers
    if method == Method.FULL:
        mats = [(o, i) for i, o in arch.linear_shapes().values()] * layers
        mats += [(arch.vocab_size, h)] * (1 if arch.tie_word_embeddings else 2)
        return [*mats, (h * arch.norms_per_layer * layers + h, 1)]
    if method == Method.PREFIX_TUNING:
        return [(settings.num_virtual_tokens, layers * 2 * arch.kv_dim)]
    if method == Method.PROMPT_TUNING:
        return [(settings.num_virtual_tokens, h)]
    mats = [(arch.vocab_size, h)] * len(set(settings.modules_to_save))
    shapes = arch.linear_shapes()
    for module in resolve_target_modules(settings.target_modules):
        if module in shapes:
            fan_in, fan_out = shapes[module]
            count = layers
        else:
            fan_in, fan_out = (
                (arch.vocab_size, h) if module == "embed_tokens" else (h, arch.vocab_size)
            )
            count = 1
        mats += [(settings.rank, fan_in), (fan_out, settings.rank)] * count
        if settings.use_dora:
            mats += [(fan_out, 1)] * count
    return mats


def optimizer_bytes(
    optimizer: Optimizer,
    arch: Architecture,
    method: Method,
    settings: AdapterSettings,
    param_bytes: int,
) -> float:
    """Bytes of optimizer state for the trainable parameters of `method`.

    Args:
        optimizer: a resolved optimizer (not Auto).
        arch: the model.
        method: the tuning method (decides which tensors train).
        settings: adapter settings.
        param_bytes: bytes per trainable parameter (32-bit AdamW keeps states in that dtype).
    """
    mats = _matrices(arch, method, settings)
    count = sum(r * c for r, c in mats)
    if optimizer in EIGHT_BIT:
        return 2.0 * count
    if optimizer in (Optimizer.ADAMW, Optimizer.PAGED_ADAMW_32BIT, Optimizer.AUTO):
        return 2.0 * param_bytes * count
    if optimizer == Optimizer.SGD:
        return 0.0
    # Adafactor: factored second moment (rows + columns) for matrices, full for vectors.
    return 4.0 * sum(r + c if c > 1 else r for r, c in mats)
