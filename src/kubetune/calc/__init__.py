"""Torch-free calculators: architectures, trainable parameters, GPU memory, FLOPs, GPU-hours,
checkpoint sizes and the preflight check. Used by the CLI, the operator and the trainer alike
(docs/calc.md has the formulas and their calibration)."""

from kubetune.calc.architectures import (
    ARCHITECTURES,
    KNOWN_ARCHITECTURES,
    Architecture,
    architecture,
    parameter_count,
)
from kubetune.calc.compute import (
    GPU_CLASSES,
    CheckpointEstimate,
    ComputeEstimate,
    GPUClass,
    estimate_checkpoint,
    estimate_compute,
    flops_per_token,
    gpu_class,
)
from kubetune.calc.config import ArchitectureError, architecture_from_config, load_architecture
from kubetune.calc.lora import AdapterSettings, TrainableParams, trainable_params
from kubetune.calc.memory import MemoryEstimate, TrainingSetup, estimate_memory
from kubetune.calc.preflight import Preflight, choose_gpus, preference_batch_tokens, preflight

__all__ = [
    "ARCHITECTURES",
    "GPU_CLASSES",
    "KNOWN_ARCHITECTURES",
    "AdapterSettings",
    "Architecture",
    "ArchitectureError",
    "CheckpointEstimate",
    "ComputeEstimate",
    "GPUClass",
    "MemoryEstimate",
    "Preflight",
    "TrainableParams",
    "TrainingSetup",
    "architecture",
    "architecture_from_config",
    "choose_gpus",
    "estimate_checkpoint",
    "estimate_compute",
    "estimate_memory",
    "flops_per_token",
    "gpu_class",
    "load_architecture",
    "parameter_count",
    "preference_batch_tokens",
    "preflight",
    "trainable_params",
]
