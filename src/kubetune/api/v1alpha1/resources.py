"""Pod resources, scheduling and experiment tracking of a FineTuneJob."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel, Quantity, Rule
from kubetune.api.meta import Affinity, NodeSelector, StorageKind, Toleration, VolumeSpec
from kubetune.api.uris import ENDPOINT_URL, matches

GPUCount = Annotated[
    StrictInt | Literal["Auto"],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": "^Auto$"}),
]


class ResourcesSpec(ApiModel):
    """What the training pod gets and where it may run."""

    rules = (
        Rule(
            cel="type(self.gpus) == string || self.gpus >= 0",
            message="gpus must be Auto or a number of GPUs (0 or more)",
            check=lambda r: r.gpus == "Auto" or r.gpus >= 0,
            field_path=".gpus",
        ),
        Rule(
            cel="!has(self.scratch) || !has(self.scratch.claimName) || self.scratch.type == 'PVC'",
            message="scratch.claimName needs scratch.type PVC",
            check=lambda r: (
                r.scratch is None
                or r.scratch.claim_name is None
                or r.scratch.type == StorageKind.PVC
            ),
            field_path=".scratch",
        ),
    )

    gpus: GPUCount = "Auto"
    """GPUs per pod: a number, or Auto to size from the GPU memory calculator against the
    GPU class (the job is refused with InsufficientGPUMemory if nothing fits)."""

    gpu_class: Annotated[StrictStr, Field(max_length=63)] | None = None
    """A GPU class from the operator settings (name, memory, node selector)."""

    cpu: Quantity | None = None
    """CPU request and limit, e.g. "8" (default: from the operator settings)."""

    memory: Quantity | None = None
    """Memory request and limit, e.g. "64Gi" (default: sized from the model)."""

    node_selector: NodeSelector | None = None
    """Extra node labels the pod requires (merged with the GPU class's)."""

    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    """Tolerations for tainted GPU nodes."""

    affinity: Affinity | None = None
    """A Kubernetes affinity, copied to the pod as is."""

    scratch: VolumeSpec | None = None
    """Scratch volume for the model cache, data and checkpoints (default: an emptyDir)."""

    shm_size: Quantity | None = None
    """Size of /dev/shm (default: sized for the data loaders and NCCL)."""

    image: Annotated[StrictStr, Field(max_length=512)] | None = None
    """Trainer image instead of the operator's default."""

    service_account_name: Annotated[StrictStr, Field(max_length=253)] | None = None
    """Service account of the pod (e.g. for IRSA / workload identity to S3)."""

    priority_class_name: Annotated[StrictStr, Field(max_length=253)] | None = None
    """PriorityClass of the pod."""


class TensorBoardSpec(ApiModel):
    """TensorBoard event files, written next to the run's artifacts."""

    enabled: bool = True
    """Write TensorBoard event files under RUN_URI/tensorboard/."""

    url: Annotated[StrictStr, Field(max_length=2048)] | None = None
    """A TensorBoard URL to link from the status (the operator adds the run path)."""


class MLflowSpec(ApiModel):
    """An MLflow tracking server."""

    rules = (
        Rule(
            cel="self.trackingUri.matches('" + ENDPOINT_URL + "')",
            message="must be an http:// or https:// URL",
            check=lambda m: matches(ENDPOINT_URL, m.tracking_uri),
            field_path=".trackingUri",
        ),
    )

    tracking_uri: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    """URL of the MLflow tracking server."""

    experiment_name: Annotated[StrictStr, Field(max_length=256)] | None = None
    """Experiment name (default: namespace/job)."""


class TrackingSpec(ApiModel):
    """Experiment tracking; the links go into status.trackingUrls."""

    tensorboard: TensorBoardSpec | None = Field(default=None, alias="tensorBoard")
    """TensorBoard event files."""

    mlflow: MLflowSpec | None = Field(default=None, alias="mlflow")
    """MLflow run logging."""
