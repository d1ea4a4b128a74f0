"""Training hyperparameters, checkpoints, fast paths and distributed settings."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StrictInt

from kubetune.api.base import ApiModel, Decimal, Fraction, Rule


class Toggle(str, Enum):
    """A switch that kubetune can also decide for you (Auto)."""

    AUTO = "Auto"
    ENABLED = "Enabled"
    DISABLED = "Disabled"


class Precision(str, Enum):
    """Numeric precision of training; Auto picks BF16 where the hardware has it."""

    AUTO = "Auto"
    BF16 = "BF16"
    FP16 = "FP16"
    FP32 = "FP32"


class Optimizer(str, Enum):
    """Optimizer; Auto is PagedAdamW8bit for QLoRA and AdamW otherwise."""

    AUTO = "Auto"
    ADAMW = "AdamW"
    ADAMW_8BIT = "AdamW8bit"
    PAGED_ADAMW_8BIT = "PagedAdamW8bit"
    PAGED_ADAMW_32BIT = "PagedAdamW32bit"
    ADAFACTOR = "Adafactor"
    SGD = "SGD"


class Schedule(str, Enum):
    """Learning-rate schedule after warmup."""

    COSINE = "Cosine"
    LINEAR = "Linear"
    CONSTANT = "Constant"


class Packing(str, Enum):
    """How examples share a row: Packed concatenates them with per-document attention
    (no padding, no attention across examples); None pads each batch to its longest."""

    NONE = "None"
    PACKED = "Packed"


class AttentionKernel(str, Enum):
    """Attention implementation; Auto picks the fastest correct one for the hardware."""

    AUTO = "Auto"
    SDPA = "SDPA"
    EAGER = "Eager"
    VARLEN = "Varlen"
    FLEX = "Flex"
    FLASH_ATTENTION2 = "FlashAttention2"


class FastPaths(ApiModel):
    """Performance switches; the defaults pick what is fastest and correct."""

    attention: AttentionKernel = AttentionKernel.AUTO
    """Attention kernel for packed and padded batches."""

    compile: Toggle = Toggle.AUTO
    """torch.compile of the model. Auto leaves it off (packed rows change shape every step);
    Enabled is refused until it is supported."""

    fused_kernels: Toggle = Toggle.AUTO
    """Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (the loss is always a fused,
    chunked LM head). Auto: on GPUs for the architectures Liger supports when liger-kernel is
    installed (the trainer image ships it), off on CPUs."""

    lean_adapters: Toggle = Toggle.AUTO
    """LoRA layers skip PEFT's cast of their input to the adapters' fp32, which the BF16/FP16
    autocast turns straight back, and add their update inside the low-rank GEMM instead of
    with separate full-size scale and add kernels (bf16 rounding aside, the same numbers;
    less memory traffic; the update stays unfused under FSDP and DeepSpeed). Auto: on under
    autocast; Disabled keeps PEFT's layers as they are."""


class CheckpointSpec(ApiModel):
    """Periodic checkpoints: the guarantee that a restarted pod loses little work."""

    every_steps: Annotated[StrictInt, Field(ge=1)] = 200
    """Save a checkpoint every this many optimizer steps."""

    keep: Annotated[StrictInt, Field(ge=1, le=100)] = 2
    """How many of the latest checkpoints to keep."""

    delete_on_success: bool = False
    """Delete all checkpoints once the run succeeded."""


class TrainingSpec(ApiModel):
    """Hyperparameters of the training stages."""

    rules = (
        Rule(
            cel="!has(self.epochs) || !has(self.maxSteps)",
            message="set training.epochs or training.maxSteps, not both",
            check=lambda t: t.epochs is None or t.max_steps is None,
            field_path=".maxSteps",
        ),
        Rule(
            cel="!has(self.warmupRatio) || !has(self.warmupSteps)",
            message="set training.warmupRatio or training.warmupSteps, not both",
            check=lambda t: t.warmup_ratio is None or t.warmup_steps is None,
            field_path=".warmupSteps",
        ),
        Rule(
            cel="self.activationOffload != 'Enabled' || self.gradientCheckpointing != 'Disabled'",
            message="training.activationOffload moves the inputs of checkpointed layers to "
            "host memory: set training.gradientCheckpointing to Enabled or Auto, or "
            "activationOffload to Auto or Disabled",
            check=lambda t: (
                t.activation_offload != Toggle.ENABLED
                or t.gradient_checkpointing != Toggle.DISABLED
            ),
            field_path=".activationOffload",
        ),
    )

    epochs: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    """Passes over the training set (default 1 when maxSteps is not set)."""

    max_steps: Annotated[StrictInt, Field(ge=1)] | None = None
    """Stop after this many optimizer steps instead of counting epochs."""

    learning_rate: Decimal = "2e-4"
    """Peak learning rate, e.g. "2e-4" for LoRA, "1e-5" for full fine-tuning."""

    schedule: Schedule = Schedule.COSINE
    """Learning-rate schedule after warmup."""

    warmup_ratio: Fraction | None = None
    """Fraction of the steps spent warming up (default "0.03")."""

    warmup_steps: Annotated[StrictInt, Field(ge=0)] | None = None
    """Warmup steps, instead of warmupRatio."""

    weight_decay: Decimal = "0"
    """Decoupled weight decay."""

    max_grad_norm: Decimal = "1.0"
    """Gradient clipping norm ("0" disables clipping)."""

    batch_size: Annotated[StrictInt, Field(ge=1, le=4096)] = 4
    """Examples per device per micro-batch (with Packed: rows of maxSeqLength tokens)."""

    gradient_accumulation_steps: Annotated[StrictInt, Field(ge=1, le=4096)] = 1
    """Micro-batches accumulated per optimizer step."""

    max_seq_length: Annotated[StrictInt, Field(ge=16, le=1_048_576)] = 2048
    """Longest sequence in tokens; longer examples are dropped by the data stage and counted."""

    packing: Packing = Packing.PACKED
    """Packed (no padding, per-document attention; SFT rows and DPO batches) or None (pad
    each batch)."""

    precision: Precision = Precision.AUTO
    """Numeric precision (Auto: BF16 on GPUs that have it, else FP32)."""

    gradient_checkpointing: Toggle = Toggle.AUTO
    """Recompute activations in the backward pass (Auto: on when the calculator says memory
    is short)."""

    activation_offload: Toggle = Toggle.AUTO
    """Keep the inputs of checkpointed layers in pinned host memory instead of GPU memory:
    frees about layers x tokens x hidden size x 2 bytes per GPU and costs a copy to the host
    and back per layer and step (GPUs only; needs gradient checkpointing). Auto: on when the
    calculator says the step does not fit in GPU memory with every layer checkpointed but
    fits with the offload."""

    optimizer: Optimizer = Optimizer.AUTO
    """Optimizer (Auto: PagedAdamW8bit for QLoRA, AdamW otherwise)."""

    seed: Annotated[StrictInt, Field(ge=0)] = 42
    """Seed for weights initialization, shuffling and dropout."""

    eval_every_steps: Annotated[StrictInt, Field(ge=1)] | None = None
    """Compute the validation loss every this many steps (default: at each epoch end)."""

    log_every_steps: Annotated[StrictInt, Field(ge=1)] = 10
    """Log loss, learning rate and throughput every this many steps."""

    checkpoint: CheckpointSpec | None = None
    """Checkpoint cadence and retention (default every 200 steps, keep 2)."""

    fast_paths: FastPaths | None = None
    """Attention kernel, torch.compile and fused kernels (default Auto)."""


class StageTrainingOverrides(ApiModel):
    """Hyperparameters that one stage sets differently from spec.training."""

    rules = (
        Rule(
            cel="!has(self.epochs) || !has(self.maxSteps)",
            message="set epochs or maxSteps, not both",
            check=lambda t: t.epochs is None or t.max_steps is None,
            field_path=".maxSteps",
        ),
    )

    epochs: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    """Passes over this stage's data."""

    max_steps: Annotated[StrictInt, Field(ge=1)] | None = None
    """Optimizer steps of this stage."""

    learning_rate: Decimal | None = None
    """Peak learning rate of this stage (alignment usually wants less, e.g. "5e-6")."""

    batch_size: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    """Examples per device per micro-batch in this stage."""

    gradient_accumulation_steps: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    """Micro-batches accumulated per optimizer step in this stage."""


class DistributedStrategy(str, Enum):
    """How training is split across GPUs and nodes."""

    NONE = "None"
    DDP = "DDP"
    FSDP = "FSDP"
    DEEPSPEED_ZERO2 = "DeepSpeedZeRO2"
    DEEPSPEED_ZERO3 = "DeepSpeedZeRO3"


class DistributedSpec(ApiModel):
    """Multi-GPU and multi-node training (torchrun; an Indexed Job for several nodes)."""

    nodes: Annotated[StrictInt, Field(ge=1, le=256)] = 1
    """Number of pods (one per node), each with resources.gpus GPUs."""

    strategy: DistributedStrategy = DistributedStrategy.NONE
    """None (one process per GPU is still DDP when gpus > 1), DDP, FSDP or DeepSpeed ZeRO."""

    cpu_offload: bool = False
    """Offload parameters and optimizer state to CPU memory (FSDP, DeepSpeed ZeRO-3)."""
