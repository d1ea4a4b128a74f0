"""Fused kernels and lean LoRA layers (`training.fastPaths.fusedKernels`, `leanAdapters`,
`compile`).

- Fused kernels: Liger's Triton kernels replace the RMSNorm, RoPE and SwiGLU of the
  architectures Liger supports (fewer, larger kernels per layer; its fused cross-entropy is
  not used: TRL's chunked LM-head loss already never builds the logits). Triton needs a GPU.
- Lean adapters: PEFT casts every LoRA layer's input to the adapters' fp32, and the bf16
  autocast casts it straight back before the matmul: two full copies of the activations
  per adapted module, forward and backward, for the same numbers. Under autocast the cast
  is skipped (PEFT's own `cast_input_dtype_enabled` switch), and the adapter's update is
  added inside its low-rank GEMM instead of by separate full-size scale and add kernels
  (`lora_update.py`).
- torch.compile: not supported yet (packed rows change shape every step); Enabled is refused.

The choices are pure functions of the spec and the machine; `apply_*` change the model.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.training import FastPaths, Toggle

logger = logging.getLogger(__name__)

_FUSED = "training.fastPaths.fusedKernels"
_LEAN = "training.fastPaths.leanAdapters"
_COMPILE = "training.fastPaths.compile"
LIGER_KERNEL_CONFIG = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}
"""What Liger replaces: the layer kernels only (TRL's LM head computes the loss)."""


@dataclass(frozen=True)
class KernelChoice:
    """Whether a fast path is on, and why."""

    enabled: bool
    reason: str


def fused_kernels_choice(
    fast_paths: FastPaths | None, cuda: bool, model_type: str | None
) -> KernelChoice:
    """Liger's fused kernels for `training.fastPaths.fusedKernels`.

    Args:
        fast_paths: `spec.training.fastPaths` (None: the defaults).
        cuda: Training runs on a CUDA GPU.
        model_type: The model's `config.model_type`.

    Raises:
        TrainingSetupError: Enabled where the kernels cannot run.
    """
    toggle = (fast_paths or FastPaths()).fused_kernels
    if toggle == Toggle.DISABLED:
        return KernelChoice(False, f"{_FUSED} is Disabled")
    missing = _fused_kernels_missing(cuda, model_type)
    if missing is None:
        return KernelChoice(True, f"Liger kernels for {model_type}")
    if toggle == Toggle.ENABLED:
        raise _refusal(f"{_FUSED} Enabled: {missing}; use Auto or Disabled")
    return KernelChoice(False, missing)


def _fused_kernels_missing(cuda: bool, model_type: str | None) -> str | None:
    if not cuda:
        return "Liger's Triton kernels need a GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed (pip install 'kubetune[fast]')"
    supported = liger_model_types()
    if model_type not in supported:
        return f"Liger has no kernels for model type {model_type!r}"
    return None


FOREIGN_LIGER_BACKENDS = ("._ascend.", "._cutedsl.")
"""Liger's backends for other hardware (Ascend NPUs) and for the optional CuTe DSL: on the
trainer image they cannot be imported, and Liger warns about each, in every process."""


class _ForeignBackendNoise(logging.Filter):
    """Drops Liger's warnings that a backend for other hardware could not be imported;
    every other record, a failing CUDA backend included, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "could not be imported" in message
            and any(name in message for name in FOREIGN_LIGER_BACKENDS)
        )


def quiet_foreign_liger_backends() -> None:
    """Keep Liger's warnings about other hardware's backends out of the job's log (call
    before importing liger_kernel; idempotent)."""
    registry = logging.getLogger("liger_kernel.backends.registry")
    if not any(isinstance(f, _ForeignBackendNoise) for f in registry.filters):
        registry.addFilter(_ForeignBackendNoise())


def liger_model_types() -> frozenset[str]:
    """The model types liger-kernel patches (empty when it is not installed)."""
    quiet_foreign_liger_backends()
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return frozenset()
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def apply_fused_kernels(model: Any) -> None:
    """Patch a loaded transformers model (before PEFT wraps it) with Liger's kernels."""
    quiet_foreign_liger_backends()
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNEL_CONFIG)


def lean_adapters_choice(fast_paths: FastPaths | None, autocast: bool) -> KernelChoice:
    """Whether LoRA layers skip PEFT's fp32 input cast (`training.fastPaths.leanAdapters`):
    only under BF16/FP16 autocast, which makes the cast a round trip."""
    toggle = (fast_paths or FastPaths()).lean_adapters
    if toggle == Toggle.DISABLED:
        return KernelChoice(False, f"{_LEAN} is Disabled")
    if not autocast:
        if toggle == Toggle.ENABLED:
            raise _refusal(
                f"{_LEAN} Enabled needs BF16 or FP16 training (without autocast the adapters' "
                "fp32 needs the cast); use Auto"
            )
        return KernelChoice(False, "no autocast: the adapters compute in fp32")
    return KernelChoice(True, "under autocast the fp32 input cast is a round trip")


def apply_lean_adapters(model: Any, *, fuse_update: bool = True) -> int:
    """Turn off PEFT's input cast on every LoRA layer and, with `fuse_update`, fuse the
    update of the plain linear ones (`lora_update.apply_fused_update`; the trainer leaves it
    off under FSDP and DeepSpeed, which manage the parameters themselves); returns how many
    layers changed."""
    from kubetune.trainer.fastpath.lora_update import apply_fused_update

    count = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            count += 1
    if fuse_update:
        apply_fused_update(model)
    return count


def check_compile(fast_paths: FastPaths | None) -> None:
    """Refuse `compile: Enabled`, which the trainer does not support yet."""
    if (fast_paths or FastPaths()).compile == Toggle.ENABLED:
        raise _refusal(
            f"{_COMPILE} Enabled is not supported yet: packed rows change shape every step, "
            "which recompiles the model; use Auto (off) or Disabled"
        )


def _refusal(message: str) -> Exception:
    from kubetune.trainer.models import TrainingSetupError

    return TrainingSetupError(Reason.INVALID_SPEC, message)
