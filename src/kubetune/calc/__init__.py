"""Torch-free calculators: architectures, parameter counts (and, with the trainer, memory,
FLOPs and GPU-hours). Used by the CLI, the operator and the trainer alike."""

from kubetune.calc.architectures import ARCHITECTURES, Architecture, architecture, parameter_count

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "parameter_count"]
