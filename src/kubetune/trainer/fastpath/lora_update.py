"""The LoRA update inside one GEMM (part of `training.fastPaths.leanAdapters`).

PEFT computes a LoRA layer as `base(x) + B(A(dropout(x))) * scaling`: the (tokens, out)
product of B, then a full-size multiply by the scaling and a full-size add, and in the
backward pass another full-size multiply. On the 8B shape that is about 450 memory-bound
kernels per step. Here the update is one `addmm`: the base output is the GEMM's
accumulator and the scaling its alpha, so the sum and the scale ride in the epilogue; the
backward pass folds the scaling into the small (out, r) and (tokens, r) operands.

Only the plain case is fused: one active adapter, not merged, no DoRA or other variant, no
LoRA bias, no per-row `adapter_names`, no DeepSpeed ZeRO-3 partitioned weight, and the base
output and the adapter's activations in one dtype (always so under autocast). Anything
else runs PEFT's own forward, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


class LoraUpdate(torch.autograd.Function):
    """`result + scale * h @ weight_b.T` as one GEMM; gradients for `h` and `weight_b`
    (the base output's gradient passes through untouched)."""

    @staticmethod
    def forward(
        ctx: Any, result: torch.Tensor, h: torch.Tensor, weight_b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        b = weight_b.to(h.dtype)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            b.t(),
            alpha=scale,
        )
        ctx.save_for_backward(h, b)
        ctx.scale = scale
        ctx.weight_dtype = weight_b.dtype
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        h, b = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.mm(flat, b * ctx.scale).view(h.shape)
        if ctx.needs_input_grad[2]:
            h_flat = h.reshape(-1, h.shape[-1])
            grad_b = torch.mm(flat.t(), h_flat).mul_(ctx.scale).to(ctx.weight_dtype)
        result_grad = grad if ctx.needs_input_grad[0] else None
        return result_grad, grad_h, grad_b, None


def _plain_adapter(layer: Any) -> str | None:
    """The one active adapter's name when the fused update applies to it, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    lora_b = layer.lora_B[name]
    if lora_b.bias is not None or hasattr(lora_b.weight, "ds_id"):
        return None
    return name


def fused_forward(
    layer: Any, fallback: Any, quantized_base: bool, x: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """A LoRA layer's forward with the update as one GEMM; `fallback` is PEFT's forward,
    used for every case this does not cover; `quantized_base`: a bitsandbytes layer."""
    name = None if args or kwargs else _plain_adapter(layer)
    if name is None:
        return fallback(layer, x, *args, **kwargs)
    if quantized_base and not torch.is_autocast_enabled():
        return fallback(layer, x)  # PEFT converts dtypes around the update here
    result = layer.base_layer(x)
    lora_a = layer.lora_A[name]
    lora_b = layer.lora_B[name]
    inputs = x if quantized_base else layer._cast_input_dtype(x, lora_a.weight.dtype)
    h = lora_a(layer.lora_dropout[name](inputs))
    scale = layer.scaling[name]
    if h.dtype != result.dtype or h.device != result.device:
        return (result + lora_b(h) * scale).to(result.dtype)
    return LoraUpdate.apply(result, h, lora_b.weight, scale)


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        original = cls.forward  # type: ignore[attr-defined]
        quantized = cls.__module__.startswith("peft.tuners.lora.bnb")

        def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return fused_forward(self, original, quantized, x, *args, **kwargs)

        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward})
    return _FUSED_CLASSES[cls]


def _fusable_classes() -> tuple[type, ...]:
    from peft.tuners.lora import layer as lora_layer

    classes: list[type] = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:  # bitsandbytes missing: no quantized layers to fuse
        return tuple(classes)
    for name in ("Linear4bit", "Linear8bitLt"):
        if hasattr(lora_bnb, name):
            classes.append(getattr(lora_bnb, name))
    return tuple(classes)


def apply_fused_update(model: Any) -> int:
    """Give every plain LoRA linear layer of `model` the fused update (its class becomes a
    subclass whose forward is `fused_forward`); returns how many layers changed."""
    fusable = _fusable_classes()
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls in fusable:
            module.__class__ = _fused_class(cls)
            count += 1
    return count
