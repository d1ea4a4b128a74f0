"""Will a FineTuneJob fit on its GPUs? The check the trainer and the operator run.

`preflight` reads the spec the way the trainer will run it and returns the estimate, whether
it fits and, when it does not, advice that names changes which do fit. `choose_gpus` sizes
`resources.gpus: Auto`.

How `Auto` settings are read:

- `training.gradientCheckpointing: Auto` is off when the step fits without it, else it
  checkpoints the fewest layers that fit (every n-th layer), else every layer (also when the
  GPU memory is unknown). Chains with a RewardModel or RLHF stage checkpoint every layer:
  their generation and scoring memory is not modelled closely enough to spend the margin.
  Prefix tuning never checkpoints.
- `training.activationOffload: Auto` is on only when the step does not fit with the
  checkpointing above but fits once the checkpointed layers' inputs wait in host memory
  (GPUs only).
- `training.optimizer: Auto` is PagedAdamW8bit for QLoRA, AdamW otherwise.
- `training.precision: Auto` is BF16 (FP16 on GPUs without bf16 takes the same memory).
- Each stage is checked with its own batch size; preference stages (DPO, ORPO, KTO, SimPO,
  RewardModel) run chosen and rejected sequences together; DPO and KTO with method Full keep a
  frozen reference copy, RLHF a reward model (and, with Full, a reference) copy. The worst
  stage decides.
- CPU runs (`host_preflight`) are planned in fp32 against the memory the process may still
  take, with the CPU terms of `TrainingSetup.host`, and refused with InsufficientMemory.
- Without data every sequence is planned at `maxSeqLength`. The trainer knows its prepared
  data before it loads the model and passes, for DPO stages, the most tokens one of their
  micro-batches can hold (`preference_batch_tokens`): preference pairs are usually far
  shorter than `maxSeqLength`, and planning them at it checkpoints layers that need not be.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kubetune.api.v1alpha1.alignment import PREFERENCE_STAGES, StageType
from kubetune.api.v1alpha1.methods import (
    LoRASpec,
    Method,
    PrefixTuningSpec,
    PromptTuningSpec,
    QLoRASpec,
)
from kubetune.api.v1alpha1.training import (
    DistributedStrategy,
    FastPaths,
    Precision,
    Toggle,
    TrainingSpec,
)
from kubetune.calc.architectures import Architecture
from kubetune.calc.lora import AdapterSettings
from kubetune.calc.memory import (
    SHARDED,
    MemoryEstimate,
    TrainingSetup,
    checkpointing_options,
    estimate_memory,
)

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec

INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
"""The contract's reason (`Reason.INSUFFICIENT_GPU_MEMORY`) for a job that cannot fit."""
INSUFFICIENT_MEMORY = "InsufficientMemory"
"""The contract's reason (`Reason.INSUFFICIENT_MEMORY`) for a CPU run that cannot fit."""
MAX_ADVICE = 3
MAX_GPUS = 64
"""The largest GPU count advice may suggest (several nodes beyond GPUS_PER_NODE)."""
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Preflight:
    """The verdict on one job and GPU count.

    Attributes:
        fits: whether the worst stage fits; None when the GPU memory is unknown or gpus is 0.
        needed_gib: GPU memory the worst stage needs per GPU (estimate.total_gib).
        available_gib: memory of one GPU, when known.
        gpus: GPUs checked.
        stage: the stage that needs the most memory.
        setup: how the calculator read the spec for that stage.
        estimate: the breakdown of that stage.
        advice: empty when it fits; else what needs what, and changes that would fit.
        reason: InsufficientGPUMemory when it does not fit, else None.
    """

    fits: bool | None
    needed_gib: float
    available_gib: float | None
    gpus: int
    stage: str
    setup: TrainingSetup
    estimate: MemoryEstimate
    advice: str = ""
    reason: str | None = None


def adapter_settings(spec: FineTuneJobSpec) -> AdapterSettings:
    """The LoRA / prefix / prompt settings of a spec, defaults filled in."""
    lora = spec.lora or LoRASpec()
    prefix = spec.prefix_tuning or PrefixTuningSpec()
    prompt = spec.prompt_tuning or PromptTuningSpec()
    tokens = prompt.num_virtual_tokens
    if spec.method == Method.PREFIX_TUNING:
        tokens = prefix.num_virtual_tokens
    return AdapterSettings(
        rank=lora.rank,
        target_modules=tuple(lora.target_modules),
        use_dora=lora.use_dora,
        modules_to_save=tuple(lora.modules_to_save or ()),
        dropout=float(lora.dropout) > 0,
        num_virtual_tokens=tokens,
        prefix_projection=prefix.prefix_projection,
    )


SEQUENCE_MARGIN = 2
"""Tokens the preference trainer may add to a counted sequence (an end-of-sequence token)."""


def preference_batch_tokens(
    pairs: Iterable[tuple[int, int]], batch_size: int, max_length: int, *, packed: bool
) -> int | None:
    """The most tokens one micro-batch of `batch_size` preference pairs can hold.

    Args:
        pairs: (chosen, rejected) token counts of every pair (prompt included, as the data
            stage counted them).
        batch_size: pairs per micro-batch.
        max_length: the trainer truncates each sequence to this many tokens.
        packed: the batch's sequences sit end to end in one row (packed DPO batches: the
            sum of the `batch_size` longest pairs); else they are padded to the longest
            sequence of the batch (at most the data's longest).

    Returns:
        The bound, or None for no pairs.
    """

    def length(tokens: int) -> int:
        return min(tokens + SEQUENCE_MARGIN, max_length)

    totals = [(length(chosen), length(rejected)) for chosen, rejected in pairs]
    if not totals:
        return None
    if packed:
        return sum(heapq.nlargest(batch_size, (c + r for c, r in totals)))
    return batch_size * 2 * max(max(pair) for pair in totals)


def stage_setups(
    spec: FineTuneJobSpec,
    gpus: int,
    gradient_checkpointing: bool,
    checkpoint_every: int = 1,
    fused_kernels: bool | None = None,
    data_tokens: Mapping[int, int] | None = None,
    *,
    host: bool = False,
    dense_attention: bool = False,
    offload_activations: bool = False,
) -> list[tuple[str, TrainingSetup]]:
    """One TrainingSetup per stage of the spec, as the trainer will run it on `gpus` GPUs per
    pod (sharding spans every node: the setup's GPU count is gpus x distributed.nodes), with
    gradient checkpointing on every `checkpoint_every`-th layer when it is on (their inputs
    in host memory with `offload_activations`). `data_tokens`
    maps a stage's index to the most tokens one of its micro-batches holds in the prepared
    data (stages without an entry are planned at maxSeqLength).

    `fused_kernels` says whether the trainer applies Liger's kernels; None reads
    `fastPaths.fusedKernels` as the trainer image runs it (Auto: on; the image ships them).
    Lean adapters follow `fastPaths.leanAdapters` (Auto: on for LoRA and QLoRA under
    autocast). `host` plans a CPU run (`TrainingSetup.host`: no fast paths), whose attention
    keeps the score matrices when `dense_attention` (eager attention)."""
    training = spec.training or TrainingSpec()
    fast = training.fast_paths or FastPaths()
    distributed = spec.distributed
    full = spec.method == Method.FULL
    if fused_kernels is None:
        fused_kernels = fast.fused_kernels != Toggle.DISABLED and not host
    lean = (
        not host
        and fast.lean_adapters != Toggle.DISABLED
        and spec.method in (Method.LORA, Method.QLORA)
        and training.precision != Precision.FP32
    )
    base = TrainingSetup(
        method=spec.method,
        seq_len=training.max_seq_length,
        batch_size=training.batch_size,
        adapter=adapter_settings(spec),
        gradient_checkpointing=gradient_checkpointing,
        checkpoint_every=checkpoint_every,
        offload_activations=offload_activations and not host,
        precision=training.precision,
        optimizer=training.optimizer,
        gpus=max(gpus, 1) * (distributed.nodes if distributed else 1),
        strategy=distributed.strategy if distributed else DistributedStrategy.NONE,
        cpu_offload=bool(distributed and distributed.cpu_offload),
        double_quant=(spec.qlora or QLoRASpec()).double_quant,
        fused_kernels=fused_kernels,
        lean_adapters=lean,
        gradient_accumulation=training.gradient_accumulation_steps,
        eager_attention=dense_attention,
        host=host,
    )
    setups = []
    known = data_tokens or {}
    for index, stage in enumerate(spec.stages):
        batch = stage.training.batch_size if stage.training and stage.training.batch_size else None
        accumulation = stage.training.gradient_accumulation_steps if stage.training else None
        copies = 0
        if stage.type in (StageType.DPO, StageType.KTO) and full:
            copies = 1
        elif stage.type == StageType.RLHF:
            copies = 2 if full else 1
        setups.append(
            (
                stage.type.value,
                replace(
                    base,
                    batch_size=batch or base.batch_size,
                    gradient_accumulation=accumulation or base.gradient_accumulation,
                    sequences_per_example=2 if stage.type in PREFERENCE_STAGES else 1,
                    frozen_model_copies=copies,
                    data_tokens=known.get(index),
                ),
            )
        )
    return setups


def _worst(
    arch: Architecture, setups: list[tuple[str, TrainingSetup]]
) -> tuple[str, TrainingSetup, MemoryEstimate]:
    rated = [(name, s, estimate_memory(arch, s)) for name, s in setups]
    return max(rated, key=lambda r: r[2].total_gib)


def _evaluate(
    spec: FineTuneJobSpec,
    arch: Architecture,
    gpu_memory_gib: float | None,
    gpus: int,
    fused: bool | None,
    data_tokens: Mapping[int, int] | None,
    host: bool = False,
    dense_attention: bool = False,
) -> tuple[str, TrainingSetup, MemoryEstimate]:
    training = spec.training or TrainingSpec()
    offload = training.activation_offload == Toggle.ENABLED

    def setups(enabled: bool, every: int, offloaded: bool) -> list[tuple[str, TrainingSetup]]:
        return stage_setups(
            spec,
            gpus,
            enabled,
            every,
            fused,
            data_tokens,
            host=host,
            dense_attention=dense_attention,
            offload_activations=offloaded,
        )

    toggle = training.gradient_checkpointing
    if toggle != Toggle.AUTO:
        worst = _worst(arch, setups(toggle == Toggle.ENABLED, 1, offload))
    elif gpu_memory_gib is None or not partial_checkpointing_allowed(spec):
        worst = _worst(arch, setups(True, 1, offload))
    else:
        for every in checkpointing_options(arch.num_layers):  # ends with every layer (1)
            worst = _worst(arch, setups(every > 0, max(every, 1), offload))
            if worst[2].total_gib <= gpu_memory_gib:
                break
    setup = worst[1]
    if (
        training.activation_offload == Toggle.AUTO
        and not host
        and setup.gradient_checkpointing
        and gpu_memory_gib is not None
        and worst[2].total_gib > gpu_memory_gib
    ):  # the last resort before refusing: the checkpointed inputs wait in host memory
        offloaded = _worst(arch, setups(True, setup.checkpoint_every, True))
        if offloaded[2].total_gib <= gpu_memory_gib:
            return offloaded
    return worst


def partial_checkpointing_allowed(spec: FineTuneJobSpec) -> bool:
    """Whether `gradientCheckpointing: Auto` may checkpoint fewer than all layers: not for
    chains with a RewardModel or RLHF stage (see the module docstring)."""
    return not any(s.type in (StageType.REWARD_MODEL, StageType.RLHF) for s in spec.stages)


def preflight(
    spec: FineTuneJobSpec,
    arch: Architecture,
    gpu_memory_gib: float | None,
    gpus: int,
    *,
    fused_kernels: bool | None = None,
    data_tokens: Mapping[int, int] | None = None,
) -> Preflight:
    """Check a job against the GPUs it will get.

    Args:
        spec: the FineTuneJob spec.
        arch: the base model's architecture (`load_architecture`).
        gpu_memory_gib: memory of one GPU, or None when unknown.
        gpus: GPUs per pod (0 means a CPU run: nothing to check).
        fused_kernels: whether the trainer applies Liger's kernels (None: as the trainer
            image would, from `fastPaths.fusedKernels`).
        data_tokens: stage index -> the most tokens one of its micro-batches holds in the
            prepared data (`preference_batch_tokens`); stages without one are planned at
            maxSeqLength.
    """
    stage, setup, estimate = _evaluate(spec, arch, gpu_memory_gib, gpus, fused_kernels, data_tokens)
    needed = estimate.total_gib
    if gpu_memory_gib is None or gpus < 1:
        return Preflight(None, needed, gpu_memory_gib, gpus, stage, setup, estimate)
    if needed <= gpu_memory_gib:
        return Preflight(True, needed, gpu_memory_gib, gpus, stage, setup, estimate)
    advice = advice_text(needed, gpu_memory_gib, alternatives(arch, setup, gpu_memory_gib))
    return Preflight(
        False, needed, gpu_memory_gib, gpus, stage, setup, estimate, advice, INSUFFICIENT_GPU_MEMORY
    )


def host_preflight(
    spec: FineTuneJobSpec,
    arch: Architecture,
    memory_gib: float | None,
    *,
    dense_attention: bool,
    data_tokens: Mapping[int, int] | None = None,
    source: str = "this machine",
) -> Preflight:
    """Check a CPU run (`kubetune run` on a machine without a GPU) against the memory the
    process may still take (`host.memory_budget`), before the weights are loaded.

    The estimate is what training adds to the process: fp32 weights, gradients, optimizer
    state and activations (`TrainingSetup.host`). `gradientCheckpointing: Auto` plans as on
    a GPU: off when the step fits without it, else the fewest checkpointed layers that fit.

    Args:
        spec: the FineTuneJob spec.
        arch: the base model's architecture.
        memory_gib: memory the process may still take, or None when unknown (then Auto is
            off, as CPU runs were before this check: it is slower, and nothing says it is
            needed).
        dense_attention: attention keeps its score matrices (eager attention; SDPA's CPU
            kernels do not).
        data_tokens: as for `preflight`.
        source: what bounds `memory_gib` (`host.HostMemory.source`), for the advice.
    """
    if memory_gib is None:
        stage, setup, estimate = _worst(
            arch,
            stage_setups(
                spec,
                1,
                (spec.training or TrainingSpec()).gradient_checkpointing == Toggle.ENABLED,
                data_tokens=data_tokens,
                host=True,
                dense_attention=dense_attention,
            ),
        )
        return Preflight(None, estimate.total_gib, None, 0, stage, setup, estimate)
    stage, setup, estimate = _evaluate(
        spec, arch, memory_gib, 1, False, data_tokens, host=True, dense_attention=dense_attention
    )
    needed = estimate.total_gib
    if needed <= memory_gib:
        return Preflight(True, needed, memory_gib, 0, stage, setup, estimate)
    options = alternatives(arch, setup, memory_gib)
    advice = advice_text(needed, memory_gib, options, host=source)
    return Preflight(
        False, needed, memory_gib, 0, stage, setup, estimate, advice, INSUFFICIENT_MEMORY
    )


def advice_text(
    needed_gib: float, memory_gib: float, options: list[str], *, host: str | None = None
) -> str:
    """'needs ~N GiB of GPU memory, the GPU has M GiB: <up to three options>'; for a CPU
    run, `host` names what bounds its memory: 'needs ~N GiB more memory, M GiB available
    (this machine): ...'."""
    has = f"{memory_gib:.1f}".removesuffix(".0")
    head = f"needs ~{needed_gib:.0f} GiB of GPU memory, the GPU has {has} GiB"
    if host:
        head = f"needs ~{needed_gib:.0f} GiB more memory, {has} GiB available ({host})"
    if not options:
        combine = (
            "gradient checkpointing, a smaller batch and shorter sequences, or train on a GPU"
            if host
            else "method QLoRA, gradient checkpointing, a smaller batch and more GPUs with "
            "FSDP, or use GPUs with more memory"
        )
        return f"{head}: no single change fits; combine {combine}"
    shown = options[:MAX_ADVICE]
    tail = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + ", or " + shown[-1]
    return f"{head}: {tail}"


def _fits(arch: Architecture, setup: TrainingSetup, memory: float) -> bool:
    return estimate_memory(arch, setup).total_gib <= memory


def alternatives(arch: Architecture, setup: TrainingSetup, memory: float) -> list[str]:
    """Single changes to `setup` that make it fit in `memory` GiB, most convenient first:
    gradient checkpointing, QLoRA, more GPUs with sharding (not for a CPU run), a smaller
    batch, shorter sequences."""
    options = []
    gc_on = replace(setup, gradient_checkpointing=True)
    can_checkpoint = not setup.gradient_checkpointing and setup.method != Method.PREFIX_TUNING
    if can_checkpoint and _fits(arch, gc_on, memory):
        options.append("enable gradient checkpointing")
    if not setup.host:
        options += _gpu_alternatives(arch, setup, gc_on, memory)
    for batch in range(setup.batch_size - 1, 0, -1):
        if _fits(arch, replace(setup, batch_size=batch), memory):
            options.append(
                f"lower training.batchSize to {batch} (raise gradientAccumulationSteps to keep "
                "the effective batch)"
            )
            break
    seq = setup.seq_len // 2
    while seq >= 128:
        if _fits(arch, replace(setup, seq_len=seq), memory):
            options.append(f"lower training.maxSeqLength to {seq}")
            break
        seq //= 2
    return options


def _gpu_alternatives(
    arch: Architecture, setup: TrainingSetup, gc_on: TrainingSetup, memory: float
) -> list[str]:
    """Activation offload, QLoRA, more GPUs with sharding and CPU offload: the changes only
    a GPU run has."""
    options = []
    offloaded = replace(gc_on, offload_activations=True)
    if (
        not setup.offload_activations
        and setup.method != Method.PREFIX_TUNING
        and not _fits(arch, gc_on, memory)
        and _fits(arch, offloaded, memory)
    ):
        gc = "" if setup.gradient_checkpointing else " with gradient checkpointing"
        options.append(
            f"set training.activationOffload to Enabled{gc} (checkpointed layer inputs "
            "in host memory)"
        )
    if setup.method in (Method.LORA, Method.FULL):
        qlora = replace(gc_on, method=Method.QLORA, optimizer=setup.optimizer)
        if _fits(arch, qlora, memory):
            options.append("use method QLoRA")
    strategy = setup.strategy if setup.strategy in SHARDED else DistributedStrategy.FSDP
    for n in range(max(setup.gpus, 1) + 1, MAX_GPUS + 1):
        if _fits(arch, replace(setup, gpus=n, strategy=strategy), memory):
            nodes = f" ({-(-n // GPUS_PER_NODE)} nodes)" if n > GPUS_PER_NODE else ""
            suffix = "" if setup.strategy in SHARDED else " with distributed.strategy FSDP"
            options.append(f"use {n} GPUs{nodes}{suffix}")
            break
    offload = replace(setup, cpu_offload=True)
    sharded = setup.strategy in SHARDED and setup.gpus > 1 and not setup.cpu_offload
    if sharded and _fits(arch, offload, memory):
        options.append("set distributed.cpuOffload (optimizer and gradients in CPU memory)")
    return options


def choose_gpus(
    spec: FineTuneJobSpec, arch: Architecture, gpu_memory_gib: float, max_gpus: int = 8
) -> int | None:
    """The smallest GPU count (1..max_gpus) on which the job fits, for `gpus: Auto`.

    Only sharding strategies (FSDP, DeepSpeed ZeRO-2/3) lower the memory per GPU; with
    None/DDP each GPU holds a full replica, so more GPUs never make a job fit. None when
    nothing fits (the operator then refuses the job with InsufficientGPUMemory and
    `preflight`'s advice).
    """
    for gpus in range(1, max_gpus + 1):
        if preflight(spec, arch, gpu_memory_gib, gpus).fits:
            return gpus
    return None
