"""How many GPUs a training pod gets, on which GPU class, and how long it may take to stop.

`resources.gpus: Auto` is sized with the same calculator the trainer's preflight uses
(`kubetune.calc`), against the GPU classes of the operator settings: the first class (the
named one, else each in the settings' order) on which 1, 2, 4 or 8 GPUs fit. Nothing
fitting refuses the job with `InsufficientGPUMemory` and the calculator's advice. When the
calculator cannot know the model (an hf:// model it has no config for and cannot match by
name), the pod gets one GPU and the trainer's preflight, which reads the real config,
decides; the returned note says so.

The SIGTERM grace period comes from the calculator's checkpoint size: the time to upload
one checkpoint at the settings' bandwidth plus a margin, within [60 s, 3600 s].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.resources import ResourcesSpec
from kubetune.calc import (
    Architecture,
    ArchitectureError,
    MemoryEstimate,
    Preflight,
    estimate_checkpoint,
    load_architecture,
    preflight,
)
from kubetune.calc.optimizers import EIGHT_BIT

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
    from kubetune.operator.settings import GPUClass, OperatorSettings

AUTO_GPU_COUNTS = (1, 2, 4, 8)
"""GPU counts `gpus: Auto` tries, smallest first."""
MIN_GRACE_SECONDS = 60
MAX_GRACE_SECONDS = 3600
MIB = 1024 * 1024
GPUS_FIELD = "spec.resources.gpus"
GPU_CLASS_FIELD = "spec.resources.gpuClass"


class SizingError(Exception):
    """The job cannot be given GPUs: an unknown GPU class, or nothing fits.

    Attributes:
        reason: InvalidSpec or InsufficientGPUMemory.
        field: the spec field to change.
        message: what is wrong and what to change.
    """

    def __init__(self, reason: Reason, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.reason = reason
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GPUSizing:
    """The GPUs of one training pod.

    Attributes:
        gpus: GPUs per pod (0: a CPU pod).
        gpu_class: the GPU class the pod is scheduled on, if any.
        resource_name: extended resource requested for the GPUs.
        node_selector: the GPU class's node labels (the spec's are merged in by the pod
            builder).
        check: the calculator's verdict for this count; None when the architecture is
            unknown.
        termination_grace_seconds: terminationGracePeriodSeconds of the pod.
        checkpoint_bytes: estimated size of one checkpoint, when known.
        note: what a user should know about the choice (e.g. Auto could not be sized);
            empty when there is nothing to say.
    """

    gpus: int
    gpu_class: GPUClass | None
    resource_name: str
    node_selector: dict[str, str]
    check: Preflight | None
    termination_grace_seconds: int
    checkpoint_bytes: int | None = None
    note: str = ""


def model_architecture(uri: str) -> tuple[Architecture | None, str]:
    """The architecture of the model at `uri`, or None and why the calculator cannot know."""
    try:
        return load_architecture(uri), ""
    except ArchitectureError as exc:
        return None, str(exc)


def checkpoint_grace(
    arch: Architecture, estimate: MemoryEstimate, settings: OperatorSettings
) -> tuple[int, int]:
    """(terminationGracePeriodSeconds, checkpoint bytes) for one checkpoint of `estimate`'s
    trainable parameters and optimizer states, uploaded at the settings' bandwidth."""
    state_bytes = 2.0 if estimate.optimizer in EIGHT_BIT else 8.0
    bandwidth = settings.upload_bandwidth_mib_s * MIB
    checkpoint = estimate_checkpoint(
        arch,
        estimate.params,
        optimizer_state_bytes_per_param=state_bytes if estimate.optimizer_gib else 0.0,
        write_mb_s=bandwidth / 1e6,
    )
    seconds = (
        math.ceil(checkpoint.total_bytes / bandwidth) + settings.termination_grace_margin_seconds
    )
    return min(MAX_GRACE_SECONDS, max(MIN_GRACE_SECONDS, seconds)), checkpoint.total_bytes


def _sized(
    gpus: int,
    gpu: GPUClass | None,
    arch: Architecture | None,
    check: Preflight | None,
    settings: OperatorSettings,
    note: str = "",
) -> GPUSizing:
    grace, size = settings.default_termination_grace_seconds, None
    if arch is not None and check is not None:
        grace, size = checkpoint_grace(arch, check.estimate, settings)
    return GPUSizing(
        gpus=gpus,
        gpu_class=gpu,
        resource_name=gpu.resource_name if gpu else settings.gpu_resource_name,
        node_selector=dict(gpu.node_selector) if gpu else {},
        check=check,
        termination_grace_seconds=grace,
        checkpoint_bytes=size,
        note=note,
    )


def _gib(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _counts(gpu: GPUClass) -> list[int]:
    return [n for n in AUTO_GPU_COUNTS if n <= gpu.gpus_per_node]


def _first_fit(
    spec: FineTuneJobSpec, arch: Architecture, gpu: GPUClass
) -> tuple[int, Preflight] | None:
    for gpus in _counts(gpu):
        check = preflight(spec, arch, gpu.memory_gib, gpus)
        if check.fits:
            return gpus, check
    return None


def _refusal(
    spec: FineTuneJobSpec,
    arch: Architecture,
    tried: list[GPUClass],
    named: bool,
    settings: OperatorSettings,
) -> SizingError:
    largest = max(tried, key=lambda g: g.memory_gib)
    advice = preflight(spec, arch, largest.memory_gib, 1).advice
    if named:
        where = (
            f"on up to {max(_counts(largest))} GPUs of class {largest.name} "
            f"({_gib(largest.memory_gib)} GiB each)"
        )
        others = [
            g.name
            for g in settings.gpu_classes
            if g.name != largest.name and _first_fit(spec, arch, g) is not None
        ]
        if others:
            advice += f"; it fits on gpuClass {' or '.join(others)}"
        else:
            advice += "; or ask for a GPU class with more memory"
    else:
        classes = ", ".join(f"{g.name} ({_gib(g.memory_gib)} GiB)" for g in tried)
        where = f"on any GPU class of the operator settings ({classes}), with up to 8 GPUs"
    return SizingError(
        Reason.INSUFFICIENT_GPU_MEMORY,
        GPUS_FIELD,
        f"Auto: the job does not fit {where}: {advice}",
    )


def size_gpus(spec: FineTuneJobSpec, settings: OperatorSettings) -> GPUSizing:
    """The GPUs of the training pod of `spec`.

    Raises:
        SizingError: `resources.gpuClass` is not in the settings (InvalidSpec), or the job
            does not fit (InsufficientGPUMemory) with the calculator's advice.
    """
    resources = spec.resources or ResourcesSpec()
    named: GPUClass | None = None
    if resources.gpu_class is not None:
        named = settings.gpu_class(resources.gpu_class)
        if named is None:
            known = ", ".join(g.name for g in settings.gpu_classes) or "none"
            raise SizingError(
                Reason.INVALID_SPEC,
                GPU_CLASS_FIELD,
                f"unknown GPU class {resources.gpu_class!r} (the operator settings define: "
                f"{known}); use one of them, or remove gpuClass",
            )
    arch, unknown = model_architecture(spec.model.uri)
    if resources.gpus != "Auto":
        return _fixed(spec, settings, resources.gpus, named, arch, unknown)
    if arch is None:
        note = (
            f"resources.gpus Auto: the calculator cannot size {spec.model.uri} ({unknown}); "
            "the pod gets 1 GPU and the trainer's preflight check refuses the job with "
            "InsufficientGPUMemory before loading weights if it does not fit (set "
            "resources.gpus to ask for more)"
        )
        return _sized(1, named, None, None, settings, note)
    classes = [named] if named else list(settings.gpu_classes)
    if not classes:
        check = preflight(spec, arch, None, 1)
        note = (
            "resources.gpus Auto: the operator settings declare no GPU classes, so the GPU "
            "memory is unknown; the pod gets 1 GPU and the trainer's preflight check decides"
        )
        return _sized(1, None, arch, check, settings, note)
    fits = [(gpu, fit) for gpu in classes if (fit := _first_fit(spec, arch, gpu)) is not None]
    # A class the job fits without activation offload (which slows every step) comes first.
    fits.sort(key=lambda pair: pair[1][1].setup.offload_activations)
    if fits:
        gpu, (count, check) = fits[0]
        return _sized(count, gpu, arch, check, settings)
    raise _refusal(spec, arch, classes, named is not None, settings)


def _fixed(
    spec: FineTuneJobSpec,
    settings: OperatorSettings,
    gpus: int,
    named: GPUClass | None,
    arch: Architecture | None,
    unknown: str,
) -> GPUSizing:
    if arch is None:
        note = (
            f"the calculator cannot size {spec.model.uri} ({unknown}); the trainer's preflight "
            "check verifies the GPU memory before loading weights"
            if gpus
            else ""
        )
        return _sized(gpus, named, None, None, settings, note)
    check = preflight(spec, arch, named.memory_gib if named else None, gpus)
    if check.fits is False and named is not None:
        raise SizingError(
            Reason.INSUFFICIENT_GPU_MEMORY,
            GPUS_FIELD,
            f"{gpus} GPU(s) of class {named.name}: {check.advice}",
        )
    return _sized(gpus, named, arch, check, settings)
