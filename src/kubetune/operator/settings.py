"""Operator settings: what the platform team decides once for every FineTuneJob.

The Helm chart renders its values into a YAML (or JSON) file and points
`KUBETUNE_OPERATOR_SETTINGS` at it; `KUBETUNE_TRAINER_IMAGE` and `KUBETUNE_VLLM_IMAGE`
override the images (handy in development and for air-gapped mirrors). Keys are camelCase
like the rest of the API (`gpuClasses: [{name, memoryGiB, nodeSelector}]`); unknown keys are
refused so a typo in the values never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kubetune import __version__
from kubetune.api.base import DNS_LABEL_PATTERN, QUANTITY_PATTERN

SETTINGS_ENV = "KUBETUNE_OPERATOR_SETTINGS"
"""Path of the settings file (YAML or JSON)."""
TRAINER_IMAGE_ENV = "KUBETUNE_TRAINER_IMAGE"
"""Overrides `trainerImage`."""
VLLM_IMAGE_ENV = "KUBETUNE_VLLM_IMAGE"
"""Overrides `vllmImage`."""

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/kubetune-trainer:{__version__}"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

QuantityStr = Annotated[StrictStr, Field(pattern=QUANTITY_PATTERN, max_length=64)]
LabelValue = Annotated[StrictStr, Field(max_length=63)]


class SettingsError(Exception):
    """The settings file is missing or invalid; the message names the setting to fix."""


class _Settings(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


class GPUClass(_Settings):
    """A kind of GPU node that FineTuneJobs may ask for by name (`resources.gpuClass`)."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
    """Name users put in `spec.resources.gpuClass`, e.g. h100-80gb."""

    memory_gib: float = Field(gt=0, le=4096, alias="memoryGiB")
    """Memory of one GPU in GiB, as the driver reports it (an H100 80GB reports ~79.6)."""

    node_selector: dict[StrictStr, LabelValue] = {}
    """Node labels that put a pod on this class, e.g.
    {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}."""

    resource_name: Annotated[StrictStr, Field(min_length=1, max_length=253)] = DEFAULT_GPU_RESOURCE
    """Extended resource that counts these GPUs."""

    gpus_per_node: int = Field(default=8, ge=1, le=64)
    """Most GPUs one pod may ask for on this class (`gpus: Auto` tries 1, 2, 4, 8 up to it)."""


class OperatorSettings(_Settings):
    """Everything the operator reads from its settings file."""

    trainer_image: Annotated[StrictStr, Field(min_length=1, max_length=512)] = DEFAULT_TRAINER_IMAGE
    """Image of the training pods (a FineTuneJob may override it: `resources.image`)."""

    vllm_image: Annotated[StrictStr, Field(min_length=1, max_length=512)] = DEFAULT_VLLM_IMAGE
    """Image of the vLLM servers of ModelDeployments."""

    image_pull_secrets: list[Annotated[StrictStr, Field(min_length=1, max_length=253)]] = []
    """Secrets (in each job's namespace) for pulling the images from a private registry."""

    gpu_classes: list[GPUClass] = []
    """GPU classes jobs can name; `gpus: Auto` without a class tries them in this order."""

    gpu_resource_name: Annotated[StrictStr, Field(min_length=1, max_length=253)] = (
        DEFAULT_GPU_RESOURCE
    )
    """Extended resource for GPUs when a job names no GPU class."""

    default_cpu: QuantityStr = "8"
    """CPU request and limit of a training pod without `resources.cpu`."""

    default_memory: QuantityStr = "64Gi"
    """Memory request and limit of a training pod without `resources.memory`."""

    default_shm_size: QuantityStr = "16Gi"
    """Size of /dev/shm without `resources.shmSize` (data loaders and NCCL use it)."""

    default_scratch_size: QuantityStr = "200Gi"
    """Size of the scratch volume (model cache, data, checkpoints) without
    `resources.scratch.size`."""

    run_as_user: int = Field(default=1000, ge=1, le=2147483647)
    """UID of the training pods (never 0: pods run as non-root)."""

    run_as_group: int = Field(default=1000, ge=1, le=2147483647)
    """GID of the training pods."""

    fs_group: int = Field(default=1000, ge=1, le=2147483647)
    """Group owning the mounted volumes, so the non-root trainer can write them."""

    upload_bandwidth_mib_s: float = Field(
        default=200.0, gt=0, le=1_000_000, alias="uploadBandwidthMiBps"
    )
    """Assumed checkpoint upload rate (MiB/s) from which the SIGTERM grace period is sized."""

    termination_grace_margin_seconds: int = Field(default=60, ge=0, le=3600)
    """Added to the checkpoint upload time in the grace period."""

    default_termination_grace_seconds: int = Field(default=600, ge=60, le=3600)
    """Grace period when the calculator does not know the model's architecture."""

    allow_builtin_random: bool = False
    """Allow `builtin://random/<arch>` models (random weights, for benchmarks and tests)."""

    metrics_port: int = Field(default=9400, ge=0, le=65535)
    """Port of the trainer's Prometheus endpoint (0 disables it)."""

    rendezvous_port: int = Field(default=29500, ge=1, le=65535)
    """torchrun rendezvous port on node 0 of multi-node jobs."""

    default_output_credentials_secret: (
        Annotated[StrictStr, Field(min_length=1, max_length=253)] | None
    ) = None
    """Secret (in each job's namespace) with AWS_* keys for an s3:// output that names no
    `credentialsSecretRef`."""

    watch_namespaces: list[Annotated[StrictStr, Field(min_length=1, max_length=63)]] = []
    """Namespaces to watch; empty watches the whole cluster."""

    prometheus_url: Annotated[StrictStr, Field(min_length=1, max_length=2048)] | None = None
    """Prometheus server KEDA's prometheus trigger queries for vLLM metrics (ModelDeployment
    autoscaling with provider KEDA), e.g. http://prometheus-operated.monitoring.svc:9090."""

    status_poll_interval_seconds: int = Field(default=30, ge=1, le=3600)
    """How often the progress of running jobs is read from their metrics endpoint."""

    @model_validator(mode="after")
    def _unique_gpu_classes(self) -> OperatorSettings:
        seen: set[str] = set()
        for index, gpu in enumerate(self.gpu_classes):
            if gpu.name in seen:
                raise ValueError(f"gpuClasses[{index}].name {gpu.name!r} is listed twice")
            seen.add(gpu.name)
        return self

    def gpu_class(self, name: str) -> GPUClass | None:
        """The GPU class called `name`, or None."""
        return next((g for g in self.gpu_classes if g.name == name), None)


_PATTERN_HELP = {
    QUANTITY_PATTERN: "is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)",
    DNS_LABEL_PATTERN: "is not a DNS label (lowercase letters, digits and '-')",
}


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ""
        for part in item["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        message = item["msg"].removeprefix("Value error, ")
        pattern = (item.get("ctx") or {}).get("pattern")
        if item["type"] == "string_pattern_mismatch" and pattern in _PATTERN_HELP:
            message = f"{item['input']!r} {_PATTERN_HELP[pattern]}"
        lines.append(f"{where}: {message}" if where else message)
    return f"invalid operator settings ({source}):\n  " + "\n  ".join(lines)


def parse_settings(data: Mapping[str, Any], source: str = "settings") -> OperatorSettings:
    """Validate settings from a mapping (the parsed file).

    Raises:
        SettingsError: a key is unknown or a value is invalid; each problem is named.
    """
    try:
        return OperatorSettings.model_validate(dict(data))
    except ValidationError as exc:
        raise SettingsError(_describe(exc, source)) from None


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """The operator settings: the file named by `KUBETUNE_OPERATOR_SETTINGS` (defaults when
    unset), then the image overrides from the environment.

    Raises:
        SettingsError: the file cannot be read or parsed, or a setting is invalid.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    path = env.get(SETTINGS_ENV)
    source = "defaults"
    if path:
        source = f"{SETTINGS_ENV}={path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(
                f"cannot read the operator settings file {path} ({SETTINGS_ENV}): "
                f"{exc.strerror or exc}"
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SettingsError(f"operator settings file {path} is not YAML/JSON: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SettingsError(
                f"operator settings file {path} must hold a mapping of settings, not "
                f"{type(loaded).__name__}"
            )
        data = loaded
    overrides = (
        (TRAINER_IMAGE_ENV, "trainerImage", "trainer_image"),
        (VLLM_IMAGE_ENV, "vllmImage", "vllm_image"),
    )
    for variable, key, field_name in overrides:
        if env.get(variable):
            data.pop(field_name, None)
            data[key] = env[variable]
    return parse_settings(data, source)
