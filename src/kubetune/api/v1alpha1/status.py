"""Status of a FineTuneJob, written only by the operator."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel
from kubetune.api.meta import Condition

Str = Annotated[StrictStr, Field(max_length=4096)]
Digest = Annotated[StrictStr, Field(max_length=80)]
MetricValues = Annotated[
    dict[str, Annotated[StrictStr, Field(max_length=64)]], Field(max_length=64)
]


class JobStage(str, Enum):
    """Where a FineTuneJob is in its lifecycle."""

    PENDING = "Pending"
    PREPARING = "Preparing"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    EXPORTING = "Exporting"
    PUBLISHING = "Publishing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class StageState(str, Enum):
    """State of one training stage."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"


class StageStatus(ApiModel):
    """Progress and results of one entry of spec.stages."""

    name: Annotated[StrictStr, Field(max_length=63)]
    """Stage type (SFT, DPO, …)."""

    state: StageState = StageState.PENDING
    """Pending, Running, Succeeded, Failed or Skipped."""

    step: Annotated[StrictInt, Field(ge=0)] | None = None
    """Optimizer steps done."""

    total_steps: Annotated[StrictInt, Field(ge=0)] | None = None
    """Optimizer steps planned."""

    metrics: MetricValues | None = None
    """Final metrics of the stage (e.g. DPO reward accuracy), as decimal strings."""


class Progress(ApiModel):
    """Live training progress, polled from the trainer's metrics endpoint."""

    step: Annotated[StrictInt, Field(ge=0)] | None = None
    """Optimizer steps done in the current stage."""

    total_steps: Annotated[StrictInt, Field(ge=0)] | None = None
    """Optimizer steps planned in the current stage."""

    percent: Annotated[StrictStr, Field(max_length=8)] | None = None
    """Progress of the current stage, e.g. "42%"."""

    epoch: Annotated[StrictStr, Field(max_length=32)] | None = None
    """Current epoch as a decimal string."""

    loss: Annotated[StrictStr, Field(max_length=32)] | None = None
    """Latest training loss."""

    eval_loss: Annotated[StrictStr, Field(max_length=32)] | None = None
    """Latest validation loss."""

    learning_rate: Annotated[StrictStr, Field(max_length=32)] | None = None
    """Current learning rate."""

    tokens_per_second: Annotated[StrictStr, Field(max_length=32)] | None = None
    """Training throughput in real (non-padding) tokens per second."""

    eta_seconds: Annotated[StrictInt, Field(ge=0)] | None = None
    """Estimated seconds until the current stage ends."""

    eta: Annotated[StrictStr, Field(max_length=32)] | None = None
    """The same estimate for people, e.g. "12m"."""

    update_time: Annotated[StrictStr, Field(max_length=64)] | None = None
    """When this progress was observed (RFC 3339)."""


class Artifacts(ApiModel):
    """Where the run's artifacts are (RUN_URI and paths under it)."""

    run_uri: Str | None = None
    """The run's root; manifest.json there marks it complete."""

    manifest_digest: Digest | None = None
    """sha256 of manifest.json: what a ModelDeployment pins."""

    adapter: Str | None = None
    """The adapter (LoRA / QLoRA / prefix / prompt)."""

    merged: Str | None = None
    """Merged full weights (vLLM-loadable)."""

    quantized: Annotated[dict[str, Str], Field(max_length=8)] | None = None
    """Quantized variants by scheme (W4A16, W8A8, FP8)."""

    report: Str | None = None
    """The evaluation report (eval/report.html)."""


class RunState(str, Enum):
    """Outcome of a run."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUPERSEDED = "Superseded"


class RunRecord(ApiModel):
    """One run of this FineTuneJob (a run per training-relevant spec)."""

    run_id: Annotated[StrictStr, Field(max_length=64)]
    """Run id, derived from the training-relevant spec."""

    spec_hash: Annotated[StrictStr, Field(max_length=80)] | None = None
    """Canonical hash of the training-relevant spec."""

    state: RunState
    """Running, Succeeded, Failed or Superseded (a spec change started a new run)."""

    start_time: Annotated[StrictStr, Field(max_length=64)] | None = None
    """When the run started (RFC 3339)."""

    completion_time: Annotated[StrictStr, Field(max_length=64)] | None = None
    """When the run ended (RFC 3339)."""

    run_uri: Str | None = None
    """The run's artifact root."""

    manifest_digest: Digest | None = None
    """sha256 of the run's manifest.json."""

    metrics: MetricValues | None = None
    """Headline metrics of the run."""

    gate_passed: bool | None = None
    """Whether the evaluation gate passed."""


class Lineage(ApiModel):
    """What this run was made from."""

    model_uri: Str | None = None
    """The base model."""

    model_revision: Annotated[StrictStr, Field(max_length=256)] | None = None
    """The resolved revision of the base model."""

    dataset_digest: Digest | None = None
    """sha256 over the prepared training and validation files."""

    spec_hash: Annotated[StrictStr, Field(max_length=80)] | None = None
    """Canonical hash of the training-relevant spec."""

    trust_remote_code: bool | None = None
    """Whether the run may execute Python code shipped with the model
    (spec.model.trustRemoteCode; false unless the job asks)."""

    allow_pickle: bool | None = None
    """Whether the run may load pickle weights (spec.model.allowPickle; false unless the
    job asks)."""


class TrackingUrls(ApiModel):
    """Links to experiment tracking."""

    tensorboard: Str | None = None
    """TensorBoard (log directory or URL)."""

    mlflow: Str | None = None
    """The MLflow run."""


class FineTuneJobStatus(ApiModel):
    """What the operator observed about a FineTuneJob."""

    observed_generation: Annotated[StrictInt, Field(ge=0)] | None = None
    """The metadata.generation this status describes."""

    conditions: Annotated[list[Condition], Field(max_length=16)] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Succeeded (summary), DataPrepared, Trained, Evaluated, Exported, GatePassed."""

    stage: JobStage | None = None
    """Pending, Preparing, Training, Evaluating, Exporting, Publishing, Succeeded, Failed
    or Suspended."""

    stages: Annotated[list[StageStatus], Field(max_length=6)] | None = None
    """One entry per spec.stages entry."""

    progress: Progress | None = None
    """Live progress of the current stage."""

    run_id: Annotated[StrictStr, Field(max_length=64)] | None = None
    """The current run."""

    resumed_from_step: Annotated[StrictInt, Field(ge=0)] | None = None
    """The checkpoint step the current attempt resumed from."""

    runs: Annotated[list[RunRecord], Field(max_length=10)] | None = None
    """The last 10 runs, newest first."""

    artifacts: Artifacts | None = None
    """Artifacts of the current run."""

    metrics: MetricValues | None = None
    """Evaluation metrics of the current run (tuned, base and deltas) as decimal strings."""

    lineage: Lineage | None = None
    """What the current run was made from."""

    gpu_hours: Annotated[StrictStr, Field(max_length=32)] | None = None
    """GPU-hours used by all attempts of the current run."""

    tracking_urls: TrackingUrls | None = None
    """Links to TensorBoard and MLflow."""

    start_time: Annotated[StrictStr, Field(max_length=64)] | None = None
    """When the current run started (RFC 3339)."""

    completion_time: Annotated[StrictStr, Field(max_length=64)] | None = None
    """When the current run ended (RFC 3339)."""
