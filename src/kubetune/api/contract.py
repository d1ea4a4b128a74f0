"""The contract between the operator and the trainer (DESIGN §4).

- `TrainerConfig`: what the operator renders into a ConfigMap and the trainer validates
  before importing torch. Unknown keys are refused, never dropped.
- `TrainerResult`: what the trainer writes to its termination message; it must fit the
  kubelet's 4096-byte limit, so it carries URIs and digests, never artifacts.
- `Reason` and the exit-code table: which failures are the user's (fail fast), which are
  out of memory (fail fast, with the calculator's advice) and which are infrastructure
  (retried, resuming from the last checkpoint). The operator's podFailurePolicy is built
  from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec

SCHEMA_VERSION = 1
TERMINATION_MESSAGE_LIMIT = 4096
JUDGE_API_KEY_ENV = "KUBETUNE_JUDGE_API_KEY"
"""The trainer pod's environment variable holding the LLM judge's API key (the operator
fills it from evaluation.judge.apiKeySecretRef)."""
"""The kubelet truncates termination messages beyond this many bytes."""


class FailureClass(str, Enum):
    """How the operator treats a failure."""

    USER = "User"
    """The spec or the data is wrong: fail fast, never retried."""

    OUT_OF_MEMORY = "OutOfMemory"
    """Does not fit: fail fast; the message carries the calculator's advice."""

    INFRASTRUCTURE = "Infrastructure"
    """Transient: retried within backoffLimit, resuming from the last checkpoint."""


class Reason(str, Enum):
    """CamelCase reasons used in conditions, events and the trainer's result."""

    # Progress and success.
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    # The user's to fix.
    INVALID_SPEC = "InvalidSpec"
    DATASET_INVALID = "DatasetInvalid"
    DATASET_EMPTY = "DatasetEmpty"
    SOURCE_NOT_FOUND = "SourceNotFound"
    SOURCE_UNAUTHORIZED = "SourceUnauthorized"
    SECRET_NOT_FOUND = "SecretNotFound"
    QUOTA_EXCEEDED = "QuotaExceeded"
    MODEL_NEEDS_REMOTE_CODE = "ModelNeedsRemoteCode"
    PICKLE_REFUSED = "PickleRefused"
    SEQUENCE_TOO_LONG = "SequenceTooLong"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    INSUFFICIENT_MEMORY = "InsufficientMemory"
    LOCAL_URI_IN_CLUSTER = "LocalURIInCluster"
    EVALUATION_GATE_FAILED = "EvaluationGateFailed"
    # Serving (ModelDeployment).
    ARTIFACT_NOT_READY = "ArtifactNotReady"
    VARIANT_NOT_AVAILABLE = "VariantNotAvailable"
    METHOD_NOT_SERVABLE = "MethodNotServable"
    ADAPTER_INCOMPATIBLE = "AdapterIncompatible"
    # Resources.
    OUT_OF_MEMORY = "OutOfMemory"
    # Infrastructure and lifecycle.
    UPLOAD_FAILED = "UploadFailed"
    DOWNLOAD_FAILED = "DownloadFailed"
    INFRASTRUCTURE_ERROR = "InfrastructureError"
    PREEMPTED = "Preempted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    INTERNAL_ERROR = "InternalError"


@dataclass(frozen=True)
class ExitCode:
    """One row of the trainer's exit-code table."""

    code: int
    reason: Reason
    failure_class: FailureClass
    meaning: str


EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(10, Reason.INVALID_SPEC, FailureClass.USER, "the configuration is invalid"),
    ExitCode(
        11,
        Reason.DATASET_INVALID,
        FailureClass.USER,
        "too many invalid rows, or onInvalid: Fail met one",
    ),
    ExitCode(12, Reason.DATASET_EMPTY, FailureClass.USER, "no example survived the filters"),
    ExitCode(
        13,
        Reason.SOURCE_NOT_FOUND,
        FailureClass.USER,
        "a model, dataset or artifact URI does not exist",
    ),
    ExitCode(
        14,
        Reason.SOURCE_UNAUTHORIZED,
        FailureClass.USER,
        "credentials were refused for a source or the output",
    ),
    ExitCode(
        15,
        Reason.MODEL_NEEDS_REMOTE_CODE,
        FailureClass.USER,
        "the model needs trustRemoteCode: true",
    ),
    ExitCode(
        16,
        Reason.PICKLE_REFUSED,
        FailureClass.USER,
        "the model has only pickle weights and allowPickle is false",
    ),
    ExitCode(
        17,
        Reason.SEQUENCE_TOO_LONG,
        FailureClass.USER,
        "maxSeqLength exceeds the model's context length",
    ),
    ExitCode(
        18,
        Reason.INSUFFICIENT_GPU_MEMORY,
        FailureClass.USER,
        "the preflight estimate exceeds the GPU memory",
    ),
    ExitCode(
        19,
        Reason.INSUFFICIENT_MEMORY,
        FailureClass.USER,
        "a CPU run's preflight estimate exceeds the memory the machine has available",
    ),
    ExitCode(
        30,
        Reason.OUT_OF_MEMORY,
        FailureClass.OUT_OF_MEMORY,
        "CUDA or host out of memory during the run",
    ),
    ExitCode(
        40,
        Reason.UPLOAD_FAILED,
        FailureClass.INFRASTRUCTURE,
        "the artifact store failed after all retries",
    ),
    ExitCode(
        41,
        Reason.DOWNLOAD_FAILED,
        FailureClass.INFRASTRUCTURE,
        "a download failed after all retries",
    ),
    ExitCode(
        42, Reason.INFRASTRUCTURE_ERROR, FailureClass.INFRASTRUCTURE, "a device, NCCL or node error"
    ),
    ExitCode(
        43,
        Reason.PREEMPTED,
        FailureClass.INFRASTRUCTURE,
        "stopped by SIGTERM after a best-effort checkpoint",
    ),
)
"""Exit codes of `python -m kubetune.trainer`. 0 means the pipeline ran to the end (the
result still says whether the evaluation gate passed); any other code is an internal error,
treated as infrastructure."""

_BY_CODE = {row.code: row for row in EXIT_CODES}
_BY_REASON = {row.reason: row for row in EXIT_CODES}


def exit_code_for(reason: Reason) -> int:
    """The trainer's exit code for a failure reason."""
    row = _BY_REASON.get(reason)
    return row.code if row else 1


def classify_exit(code: int) -> ExitCode:
    """The table row for an exit code; unknown codes count as infrastructure (retried)."""
    return _BY_CODE.get(
        code, ExitCode(code, Reason.INTERNAL_ERROR, FailureClass.INFRASTRUCTURE, "unexpected")
    )


def codes_of(failure_class: FailureClass) -> list[int]:
    """Exit codes of one failure class, sorted (for the podFailurePolicy)."""
    return sorted(row.code for row in EXIT_CODES if row.failure_class == failure_class)


class RunIdentity(ApiModel):
    """Which run this is, and where its artifacts go."""

    namespace: Annotated[StrictStr, Field(min_length=1, max_length=63)]
    """Namespace of the FineTuneJob ("local" for local runs)."""

    job_name: Annotated[StrictStr, Field(min_length=1, max_length=253)]
    """Name of the FineTuneJob."""

    run_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    """Run id (derived from the training-relevant spec)."""

    output_uri: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    """Root of the artifact store; the run lives at <output>/<namespace>/<job>/<run-id>/."""


class TrainerConfig(ApiModel):
    """Everything the trainer needs, rendered by the operator (or `kubetune run`)."""

    schema_version: Literal[1] = 1
    """Version of this contract; a trainer refuses versions it does not know."""

    run: RunIdentity
    """Run identity and artifact location."""

    spec: FineTuneJobSpec
    """The FineTuneJob's spec, as validated by the API server."""

    metrics_port: Annotated[StrictInt, Field(ge=0, le=65535)] = 9400
    """Port of the Prometheus endpoint for live progress (0 disables it)."""

    allow_builtin_random: bool = False
    """Allow builtin://random/<arch> models (benchmarks and tests; refused in-cluster
    unless the operator settings allow it)."""


MetricKey = Annotated[StrictStr, Field(max_length=32)]
MetricValue = Annotated[StrictStr, Field(max_length=24)]


class TrainerResult(ApiModel):
    """The trainer's final word, written to the termination message (under 4 KiB)."""

    schema_version: Literal[1] = 1
    """Version of this contract."""

    reason: Reason
    """Succeeded, EvaluationGateFailed, or the failure reason."""

    message: Annotated[StrictStr, Field(max_length=1024)] = ""
    """What happened and, on failure, what to change."""

    run_uri: Annotated[StrictStr, Field(max_length=1024)] | None = None
    """The run's artifact root."""

    manifest_digest: Annotated[StrictStr, Field(max_length=80)] | None = None
    """sha256 of manifest.json (absent until the manifest is written)."""

    gate_passed: bool | None = None
    """Whether the evaluation gate passed (absent when there is no gate)."""

    metrics: Annotated[dict[MetricKey, MetricValue], Field(max_length=16)] = {}
    """Headline metrics; the full set is in the manifest and eval/metrics.json."""

    step: Annotated[StrictInt, Field(ge=0)] | None = None
    """Optimizer steps done in the last stage."""

    resumed_from_step: Annotated[StrictInt, Field(ge=0)] | None = None
    """The checkpoint step this attempt resumed from."""

    def to_termination_message(self) -> str:
        """Compact JSON, guaranteed to fit the kubelet's limit."""
        text = self.model_dump_json(by_alias=True, exclude_none=True)
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ValueError(f"TrainerResult is {len(text.encode())} bytes, over the limit")
        return text
