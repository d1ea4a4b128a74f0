"""One calculation for `kubetune calc`: memory, parameters, compute and checkpoint, as a
readable table or as JSON (schema in docs/calc.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeVar

from kubetune.calc.architectures import Architecture, parameter_count
from kubetune.calc.compute import (
    DEFAULT_MFU,
    DEFAULT_WRITE_MB_S,
    CheckpointEstimate,
    ComputeEstimate,
    GPUClass,
    estimate_checkpoint,
    estimate_compute,
    flops_per_token,
)
from kubetune.calc.config import ArchitectureError
from kubetune.calc.memory import (
    MemoryEstimate,
    TrainingSetup,
    estimate_memory,
    least_checkpointing,
    with_checkpointing,
)
from kubetune.calc.optimizers import EIGHT_BIT
from kubetune.calc.preflight import advice_text, alternatives

SCHEMA_VERSION = 1
E = TypeVar("E", bound=Enum)


_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """A token count as people write it: 250000, 2.5e5, 250K, 20M, 1.5B.

    Raises:
        ValueError: not a positive count.
    """
    value = text.strip().lower().replace("_", "").replace(",", "")
    scale = _SCALE.get(value[-1:], 1.0)
    number = float(value[:-1] if scale != 1.0 else value)
    if number <= 0:
        raise ValueError(f"not a positive count: {text!r}")
    return int(number * scale)


def parse_enum(enum: type[E], value: str, option: str) -> E:
    """The member of `enum` whose value matches `value`, ignoring case.

    Raises:
        ArchitectureError: no such member; the message lists the values.
    """
    for member in enum:
        if str(member.value).lower() == value.lower():
            return member
    names = ", ".join(str(m.value) for m in enum)
    raise ArchitectureError(f"{option} {value!r} is not one of {names}")


@dataclass(frozen=True)
class Calculation:
    """Everything `kubetune calc` prints.

    Attributes:
        arch: the model.
        setup: the training setup (gradient checkpointing resolved).
        memory: the memory breakdown per GPU.
        gpu: the GPU class, if named.
        gpu_memory_gib: memory of one GPU, if known.
        fits: whether `memory.total_gib` fits; None when the GPU memory is unknown.
        advice: what to change when it does not fit.
        flops_per_token: model FLOPs per trained token.
        compute: FLOPs, time and GPU-hours for `--tokens`, when given.
        checkpoint: size and write time of a resumable checkpoint.
    """

    arch: Architecture
    setup: TrainingSetup
    memory: MemoryEstimate
    gpu: GPUClass | None
    gpu_memory_gib: float | None
    fits: bool | None
    advice: str
    flops_per_token: float
    compute: ComputeEstimate | None
    checkpoint: CheckpointEstimate


def calculate(
    arch: Architecture,
    setup: TrainingSetup,
    *,
    auto_checkpointing: bool = False,
    auto_offload: bool = False,
    gpu: GPUClass | None = None,
    gpu_memory_gib: float | None = None,
    tokens: int | None = None,
    epochs: int = 1,
    mfu: float = DEFAULT_MFU,
    write_mb_s: float = DEFAULT_WRITE_MB_S,
) -> Calculation:
    """Run every calculator on one setup.

    Args:
        arch: the model.
        setup: the training setup.
        auto_checkpointing: decide gradient checkpointing like `Auto` does (off when the step
            fits without it, else the fewest checkpointed layers that fit) instead of taking
            `setup.gradient_checkpointing`.
        auto_offload: decide activation offload like `Auto` does (only when the step does
            not fit otherwise, checkpointing on) instead of taking `setup.offload_activations`.
        gpu: a GPU class (its memory and peak rate), if known.
        gpu_memory_gib: memory of one GPU (default: the class's).
        tokens: trained tokens per epoch, for time and GPU-hours.
        epochs: passes over the tokens.
        mfu: model FLOPs utilization for the time estimate.
        write_mb_s: checkpoint write bandwidth, MB/s.
    """
    memory_gib = gpu_memory_gib if gpu_memory_gib is not None else gpu.memory_gib if gpu else None
    if auto_checkpointing:
        every = least_checkpointing(arch, setup, memory_gib) if memory_gib is not None else 1
        setup = with_checkpointing(setup, every)
    memory = estimate_memory(arch, setup)
    if auto_offload and memory_gib is not None and memory.total_gib > memory_gib:
        offloaded = replace(setup, gradient_checkpointing=True, offload_activations=True)
        offloaded_memory = estimate_memory(arch, offloaded)
        if offloaded_memory.total_gib <= memory_gib:
            setup, memory = offloaded, offloaded_memory
    setup = replace(setup, gradient_checkpointing=memory.gradient_checkpointing)
    fits = None if memory_gib is None else memory.total_gib <= memory_gib
    advice = ""
    if fits is False and memory_gib is not None:
        advice = advice_text(memory.total_gib, memory_gib, alternatives(arch, setup, memory_gib))
    trainable = memory.params.trainable
    per_token = flops_per_token(arch, setup.method, setup.seq_len, trainable)
    compute = None
    if tokens is not None and gpu is not None:
        compute = estimate_compute(
            arch,
            setup.method,
            seq_len=setup.seq_len,
            tokens=tokens,
            epochs=epochs,
            gpus=setup.gpus,
            peak_tflops=gpu.peak_tflops,
            mfu=mfu,
            trainable=trainable,
        )
    state_bytes = 2.0 if memory.optimizer in EIGHT_BIT else 8.0
    checkpoint = estimate_checkpoint(
        arch,
        memory.params,
        optimizer_state_bytes_per_param=state_bytes if memory.optimizer_gib else 0.0,
        write_mb_s=write_mb_s,
    )
    return Calculation(
        arch, setup, memory, gpu, memory_gib, fits, advice, per_token, compute, checkpoint
    )


def to_json(calc: Calculation) -> dict[str, Any]:
    """The documented JSON form (docs/calc.md, schemaVersion 1)."""
    arch, setup, mem = calc.arch, calc.setup, calc.memory
    adapter = setup.adapter
    compute = calc.compute
    return {
        "schemaVersion": SCHEMA_VERSION,
        "model": {
            "name": arch.name,
            "modelType": arch.model_type,
            "parameters": parameter_count(arch),
            "hiddenSize": arch.hidden_size,
            "intermediateSize": arch.intermediate_size,
            "layers": arch.num_layers,
            "heads": arch.num_heads,
            "kvHeads": arch.num_kv_heads,
            "headDim": arch.head_dim,
            "vocabSize": arch.vocab_size,
            "tiedEmbeddings": arch.tie_word_embeddings,
        },
        "setup": {
            "method": setup.method.value,
            "seqLen": setup.seq_len,
            "batchSize": setup.batch_size,
            "tokensPerMicroBatch": mem.tokens_per_micro_batch,
            "gradientCheckpointing": mem.gradient_checkpointing,
            "checkpointedLayers": mem.checkpointed_layers,
            "activationOffload": mem.host_offload_gib > 0,
            "precision": mem.precision.value,
            "optimizer": mem.optimizer.value,
            "gpus": setup.gpus,
            "strategy": setup.strategy.value,
            "fusedLoss": setup.fused_loss,
            "lora": {
                "rank": adapter.rank,
                "targetModules": list(adapter.target_modules),
                "useDoRA": adapter.use_dora,
            },
        },
        "parameters": {
            "trainable": mem.params.trainable,
            "total": mem.params.total,
            "trainablePercent": round(mem.params.percent, 4),
            "byModule": dict(mem.params.by_module),
        },
        "memory": {
            "weightsGiB": _r(mem.weights_gib),
            "trainableGiB": _r(mem.trainable_gib),
            "gradientsGiB": _r(mem.gradients_gib),
            "optimizerGiB": _r(mem.optimizer_gib),
            "activationsGiB": _r(mem.activations_gib),
            "logitsGiB": _r(mem.logits_gib),
            "overlapGiB": _r(mem.overlap_gib),
            "allocatedGiB": _r(mem.allocated_gib),
            "fragmentationGiB": _r(mem.fragmentation_gib),
            "cudaContextGiB": _r(mem.cuda_context_gib),
            "totalGiB": _r(mem.total_gib),
            "hostOffloadGiB": _r(mem.host_offload_gib),
            "notes": list(mem.notes),
        },
        "gpu": {
            "class": calc.gpu.name if calc.gpu else None,
            "memoryGiB": calc.gpu_memory_gib,
            "peakTFLOPs": calc.gpu.peak_tflops if calc.gpu else None,
            "fits": calc.fits,
            "advice": calc.advice or None,
        },
        "compute": {
            "flopsPerToken": calc.flops_per_token,
            "tokens": compute.tokens if compute else None,
            "epochs": compute.epochs if compute else None,
            "totalFlops": compute.total_flops if compute else None,
            "mfu": compute.mfu if compute else None,
            "seconds": round(compute.seconds, 1) if compute else None,
            "gpuHours": round(compute.gpu_hours, 3) if compute else None,
        },
        "checkpoint": {
            "modelBytes": calc.checkpoint.model_bytes,
            "optimizerBytes": calc.checkpoint.optimizer_bytes,
            "totalBytes": calc.checkpoint.total_bytes,
            "writeMBps": calc.checkpoint.write_mb_s,
            "writeSeconds": round(calc.checkpoint.write_seconds, 1),
            "gracePeriodSeconds": calc.checkpoint.grace_period_seconds(),
        },
    }


def _r(value: float) -> float:
    return round(value, 3)


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render_text(calc: Calculation) -> str:
    """The breakdown as an aligned plain-text table."""
    arch, setup, mem = calc.arch, calc.setup, calc.memory
    gc = "off"
    if mem.gradient_checkpointing:
        layers = mem.checkpointed_layers
        gc = "on" if layers == arch.num_layers else f"on for {layers} of {arch.num_layers} layers"
        if mem.host_offload_gib:
            gc += ", inputs offloaded to host memory"
    pairs = "2 x " if setup.sequences_per_example == 2 else ""
    lines = [
        f"{arch.name} ({arch.model_type}, {_count(parameter_count(arch))} parameters): "
        f"{setup.method.value}, {mem.tokens_per_micro_batch:,} tokens per micro-batch "
        f"({setup.batch_size} x {pairs}{setup.seq_len}), "
        f"{mem.precision.value}, {mem.optimizer.value}, gradient checkpointing {gc}, "
        + (f"{setup.gpus} GPUs, {setup.strategy.value}" if setup.gpus > 1 else "1 GPU"),
        "",
        "GPU memory per GPU                 GiB",
    ]
    for label, gib in mem.components():
        if gib:
            lines.append(f"  {label:<30} {gib:8.2f}")
    lines.append(f"  {'total':<30} {mem.total_gib:8.2f}")
    if calc.fits is not None:
        where = calc.gpu.name if calc.gpu else "the GPU"
        verdict = "yes" if calc.fits else "NO"
        lines.append(f"  fits {where} ({calc.gpu_memory_gib:.1f} GiB): {verdict}")
    if calc.advice:
        lines.append(f"  {calc.advice}")
    lines.extend(f"  note: {note}" for note in mem.notes)
    p = mem.params
    lines += [
        "",
        f"trainable parameters   {p.trainable:,} of {p.total:,} ({p.percent:.3f} %)",
        f"FLOPs per token        {_count(calc.flops_per_token)}",
    ]
    if calc.compute:
        c = calc.compute
        lines += [
            f"total FLOPs            {c.total_flops:.3e} "
            f"({_count(c.tokens)} tokens x {c.epochs} epoch(s))",
            f"time at {c.mfu:.0%} MFU        {_duration(c.seconds)} on {c.gpus} x "
            f"{calc.gpu.name if calc.gpu else 'GPU'} ({c.peak_tflops:.0f} TFLOP/s peak), "
            f"{c.gpu_hours:.2f} GPU-hours",
        ]
    ck = calc.checkpoint
    lines.append(
        f"checkpoint             {ck.total_bytes / 1e9:.2f} GB "
        f"(model {ck.model_bytes / 1e9:.2f} GB + optimizer {ck.optimizer_bytes / 1e9:.2f} GB), "
        f"{ck.write_seconds:.0f} s at "
        f"{ck.write_mb_s:.0f} MB/s, grace period {ck.grace_period_seconds()} s"
    )
    return "\n".join(lines)
