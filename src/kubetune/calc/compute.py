"""Compute budget: FLOPs per token, training time and GPU-hours, checkpoint sizes.

FLOPs per trained token (model FLOPs, the numerator of MFU; recomputation by gradient
checkpointing is not counted, it shows up as a lower MFU):

- N = matmul parameters: every decoder linear plus the output head (embedding lookups are
  not products).
- full fine-tuning: 6·N (forward 2·N, backward 4·N: input and weight gradients).
- LoRA, QLoRA, prefix and prompt tuning: 4·N for the frozen base (forward 2·N, backward to the
  activations 2·N, no weight gradients) + 6·N_trainable for the adapter.
- attention, causal, per layer: forward 2·s·d per token (QKᵀ and PV, halved by the causal
  mask), backward twice that: 6·L·d·s per token for every method, d = heads x head_dim and s
  the sequence length (the attended length: for packed rows with per-document attention, the
  mean document length). PaLM's 12·L·h·s counts the full, non-causal square. This is the
  accounting of PERF_BASELINE's MFU numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.v1alpha1.methods import Method
from kubetune.calc.architectures import Architecture, parameter_count
from kubetune.calc.lora import TrainableParams


@dataclass(frozen=True)
class GPUClass:
    """A GPU model: memory and peak dense bf16 (fp16 on T4) tensor throughput.

    Attributes:
        name: the name `--gpu-class` takes.
        memory_gib: memory as the driver reports it, in GiB.
        peak_tflops: dense bf16 tensor TFLOP/s from the data sheet (no sparsity).
        measured_tflops: a measured large bf16 matmul rate, where known.
    """

    name: str
    memory_gib: float
    peak_tflops: float
    measured_tflops: float | None = None


GPU_CLASSES: dict[str, GPUClass] = {
    g.name: g
    for g in (
        GPUClass("H200", 140.0, 989.0, 790.0),
        GPUClass("H100", 79.6, 989.0),
        GPUClass("A100-80GB", 79.2, 312.0),
        GPUClass("A100-40GB", 39.4, 312.0),
        GPUClass("L40S", 45.0, 362.0),
        GPUClass("L4", 22.5, 121.0),
        GPUClass("A10G", 22.5, 125.0),
        GPUClass("T4", 15.0, 65.0),
    )
}
"""Known GPU classes. The H200's 790 TFLOP/s is the 8192³ bf16 matmul measured in the same
runs as PERF_BASELINE.md (754–802); its MFU numbers are against that rate."""

DEFAULT_MFU = 0.2
"""Model FLOPs utilization assumed for time estimates: the Hugging Face stack measured
4.5–11 % (default) and 9–20 % (padding-free) on an H200, fixed-shape packing 43 %."""
DEFAULT_WRITE_MB_S = 200.0
"""Checkpoint write bandwidth (MB/s) assumed for the grace period: a network volume or S3."""


def gpu_class(name: str) -> GPUClass:
    """A GPU class by name (case-insensitive), with the known names in the error.

    Raises:
        KeyError: unknown name.
    """
    for key, gpu in GPU_CLASSES.items():
        if key.lower() == name.lower():
            return gpu
    raise KeyError(f"unknown GPU class {name!r}; known: {', '.join(GPU_CLASSES)}")


@dataclass(frozen=True)
class ComputeEstimate:
    """FLOPs and time of a training run.

    Attributes:
        flops_per_token: model FLOPs per trained token.
        total_flops: flops_per_token x tokens x epochs.
        tokens: trained tokens per epoch.
        epochs: passes over the data.
        gpus: GPUs sharing the work.
        peak_tflops: per-GPU peak the time is based on.
        mfu: assumed model FLOPs utilization.
        seconds: wall-clock training time.
        gpu_hours: seconds x gpus / 3600.
    """

    flops_per_token: float
    total_flops: float
    tokens: int
    epochs: int
    gpus: int
    peak_tflops: float
    mfu: float
    seconds: float
    gpu_hours: float


def flops_per_token(
    arch: Architecture, method: Method, seq_len: int, trainable: int | None = None
) -> float:
    """Model FLOPs per trained token (see the module docstring).

    Args:
        arch: the model.
        method: tuning method.
        seq_len: attended sequence length.
        trainable: trainable parameters of an adapter method (LoRA's 6 x N_trainable).
    """
    n = arch.matmul_params()
    attention = 6 * arch.num_layers * arch.q_dim * seq_len
    if method == Method.FULL:
        return float(6 * n + attention)
    return float(4 * n + 6 * (trainable or 0) + attention)


def estimate_compute(
    arch: Architecture,
    method: Method,
    *,
    seq_len: int,
    tokens: int,
    epochs: int = 1,
    gpus: int = 1,
    peak_tflops: float,
    mfu: float = DEFAULT_MFU,
    trainable: int | None = None,
) -> ComputeEstimate:
    """Total FLOPs, time and GPU-hours of training on `tokens` tokens for `epochs` epochs.

    Raises:
        ValueError: a non-positive MFU, GPU count or peak rate.
    """
    if not 0 < mfu <= 1 or gpus < 1 or peak_tflops <= 0:
        raise ValueError("mfu must be in (0, 1], gpus >= 1 and peak_tflops > 0")
    per_token = flops_per_token(arch, method, seq_len, trainable)
    total = per_token * tokens * epochs
    seconds = total / (gpus * peak_tflops * 1e12 * mfu)
    return ComputeEstimate(
        per_token, total, tokens, epochs, gpus, peak_tflops, mfu, seconds, seconds * gpus / 3600
    )


@dataclass(frozen=True)
class CheckpointEstimate:
    """What a training checkpoint writes and how long that takes.

    Attributes:
        model_bytes: adapter (fp32) or full weights.
        optimizer_bytes: optimizer states saved for resuming.
        total_bytes: model_bytes + optimizer_bytes.
        write_seconds: total_bytes at `write_mb_s` MB/s.
        write_mb_s: assumed bandwidth.
    """

    model_bytes: int
    optimizer_bytes: int
    total_bytes: int
    write_seconds: float
    write_mb_s: float

    def grace_period_seconds(self, margin: float = 1.5, floor: int = 30) -> int:
        """A terminationGracePeriodSeconds that lets the SIGTERM checkpoint finish."""
        return max(floor, int(self.write_seconds * margin) + floor)


def estimate_checkpoint(
    arch: Architecture,
    params: TrainableParams,
    *,
    optimizer_state_bytes_per_param: float = 8.0,
    weight_bytes_per_param: float = 2.0,
    include_optimizer: bool = True,
    write_mb_s: float = DEFAULT_WRITE_MB_S,
) -> CheckpointEstimate:
    """Size of a resumable checkpoint: adapter in fp32 for PEFT methods (weights in
    `weight_bytes_per_param` for full fine-tuning) plus the optimizer states.

    Raises:
        ValueError: a non-positive bandwidth.
    """
    if write_mb_s <= 0:
        raise ValueError("write bandwidth must be positive")
    if params.method == Method.FULL:
        model = int(parameter_count(arch) * weight_bytes_per_param)
    else:
        model = params.trainable * 4
    states = int(params.trainable * optimizer_state_bytes_per_param) if include_optimizer else 0
    total = model + states
    return CheckpointEstimate(model, states, total, total / (write_mb_s * 1e6), write_mb_s)
