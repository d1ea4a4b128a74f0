"""FineTuneJob: raw data to a tuned, evaluated, exported model, in one object."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel, Rule, Uri
from kubetune.api.meta import SecretRef
from kubetune.api.uris import (
    MODEL_URI,
    MODEL_URI_HELP,
    OUTPUT_URI,
    OUTPUT_URI_HELP,
    matches,
)
from kubetune.api.v1alpha1.alignment import AlignmentSpec, StageSpec, StageType
from kubetune.api.v1alpha1.dataset import DatasetSpec
from kubetune.api.v1alpha1.evaluation import EvaluationSpec, ExportSpec
from kubetune.api.v1alpha1.methods import (
    ADAPTER_METHODS,
    PROMPT_LEARNING_METHODS,
    LoRASpec,
    Method,
    PrefixTuningSpec,
    PromptTuningSpec,
    QLoRASpec,
)
from kubetune.api.v1alpha1.objectmeta import ObjectMeta
from kubetune.api.v1alpha1.resources import ResourcesSpec, TrackingSpec
from kubetune.api.v1alpha1.status import FineTuneJobStatus
from kubetune.api.v1alpha1.training import (
    DistributedSpec,
    DistributedStrategy,
    Toggle,
    TrainingSpec,
)
from kubetune.calc.architectures import ARCHITECTURES

MAX_JOB_NAME_LENGTH = 48
"""FineTuneJob names leave room for the suffixes of the Jobs, Services and pods they own."""


class ModelSource(ApiModel):
    """The base model to tune."""

    rules = (
        Rule(
            cel="self.uri.matches('" + MODEL_URI + "')",
            message=f"must be {MODEL_URI_HELP}",
            check=lambda m: matches(MODEL_URI, m.uri),
            field_path=".uri",
        ),
        Rule(
            cel="!self.uri.startsWith('builtin://random/') || self.uri in ["
            + ", ".join(f"'builtin://random/{name}'" for name in sorted(ARCHITECTURES))
            + "]",
            message="unknown architecture; builtin://random/ knows "
            + ", ".join(sorted(ARCHITECTURES)),
            check=lambda m: (
                not m.uri.startswith("builtin://random/")
                or m.uri.removeprefix("builtin://random/") in ARCHITECTURES
            ),
            field_path=".uri",
        ),
    )

    uri: Uri
    """Where the model is: hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path,
    builtin://smollm2-135m-instruct (shipped with kubetune), builtin://random/<arch> (random
    weights, for benchmarks and tests) or a local path (local runs only)."""

    revision: Annotated[StrictStr, Field(max_length=256)] | None = None
    """Branch, tag or commit of an hf:// model; pin a commit for reproducible runs."""

    credentials_secret_ref: SecretRef | None = None
    """Secret with HF_TOKEN (hf://) or AWS_* keys (s3://)."""

    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off by default: a model that needs it is
    refused with ModelNeedsRemoteCode."""

    allow_pickle: bool = False
    """Load pickle (.bin) weights. Off by default: only safetensors are loaded, else the
    job is refused with PickleRefused."""


class DeletePolicy(str, Enum):
    """What happens to a run's artifacts when the FineTuneJob is deleted."""

    RETAIN = "Retain"
    DELETE = "Delete"


class OutputSpec(ApiModel):
    """Where the run's artifacts go: <uri>/<namespace>/<job>/<run-id>/."""

    rules = (
        Rule(
            cel="self.uri.matches('" + OUTPUT_URI + "')",
            message=f"must be {OUTPUT_URI_HELP}",
            check=lambda o: matches(OUTPUT_URI, o.uri),
            field_path=".uri",
        ),
    )

    uri: Uri
    """Root of the artifact store, e.g. s3://ml-artifacts/kubetune."""

    credentials_secret_ref: SecretRef | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (default: the operator's)."""

    endpoint: Annotated[StrictStr, Field(max_length=2048)] | None = None
    """S3 endpoint URL for MinIO, Ceph and other S3-compatible stores."""

    region: Annotated[StrictStr, Field(max_length=64)] | None = None
    """S3 region."""

    delete_policy: DeletePolicy = DeletePolicy.RETAIN
    """Retain (default) or Delete the artifacts when the FineTuneJob is deleted."""


def _has_stage(spec: FineTuneJobSpec, stage: StageType) -> bool:
    return any(s.type == stage for s in spec.stages)


def _rlhf_follows_reward_model(spec: FineTuneJobSpec) -> bool:
    types = [s.type for s in spec.stages]
    if StageType.RLHF not in types:
        return True
    return len(types) >= 2 and types[-1] == StageType.RLHF and types[-2] == StageType.REWARD_MODEL


def _settings_match_method(setting: str, methods: tuple[Method, ...]) -> Rule:
    names = ", ".join(m.value for m in methods)
    cel_methods = ", ".join(f"'{m.value}'" for m in methods)
    return Rule(
        cel=f"!has(self.{setting}) || self.method in [{cel_methods}]",
        message=f"{setting} settings apply only to method {names}; remove them or change "
        "the method",
        check=lambda s: getattr(s, _SNAKE[setting]) is None or s.method in methods,
        field_path=f".{setting}",
    )


_SNAKE = {
    "lora": "lora",
    "qlora": "qlora",
    "prefixTuning": "prefix_tuning",
    "promptTuning": "prompt_tuning",
}


def _alignment_needs_stage(setting: str, attr: str, stage: StageType) -> Rule:
    return Rule(
        cel=f"!has(self.alignment) || !has(self.alignment.{setting}) || "
        f"self.stages.exists(s, s.type == '{stage.value}')",
        message=f"alignment.{setting} is set but spec.stages has no {stage.value} stage",
        check=lambda s: (
            s.alignment is None or getattr(s.alignment, attr) is None or _has_stage(s, stage)
        ),
        field_path=".alignment",
    )


class FineTuneJobSpec(ApiModel):
    """The whole path from raw data to deployable artifacts."""

    rules = (
        _settings_match_method("lora", ADAPTER_METHODS),
        _settings_match_method("qlora", (Method.QLORA,)),
        _settings_match_method("prefixTuning", (Method.PREFIX_TUNING,)),
        _settings_match_method("promptTuning", (Method.PROMPT_TUNING,)),
        Rule(
            cel="!(self.method in ['PrefixTuning', 'PromptTuning']) || !has(self.export) || "
            "(!self.export.merge && size(self.export.quantize) == 0)",
            message="prefix and prompt tuning cannot be merged or quantized (and vLLM does "
            "not serve them): remove export.merge and export.quantize, or use LoRA",
            check=lambda s: (
                s.method not in PROMPT_LEARNING_METHODS
                or s.export is None
                or (not s.export.merge and not s.export.quantize)
            ),
            field_path=".export",
        ),
        Rule(
            cel="self.method != 'PrefixTuning' || !has(self.training) || "
            "self.training.gradientCheckpointing != 'Enabled'",
            message="prefix tuning does not train with gradient checkpointing: set "
            "training.gradientCheckpointing to Auto or Disabled",
            check=lambda s: (
                s.method != Method.PREFIX_TUNING
                or s.training is None
                or s.training.gradient_checkpointing != Toggle.ENABLED
            ),
            field_path=".training.gradientCheckpointing",
        ),
        Rule(
            cel="self.stages.all(s, self.stages.exists_one(t, t.type == s.type))",
            message="each stage type may appear once in spec.stages",
            check=lambda s: len({x.type for x in s.stages}) == len(s.stages),
            field_path=".stages",
        ),
        Rule(
            cel="!self.stages.exists(s, s.type == 'RLHF') || (size(self.stages) >= 2 && "
            "self.stages[size(self.stages) - 1].type == 'RLHF' && "
            "self.stages[size(self.stages) - 2].type == 'RewardModel')",
            message="an RLHF stage must come last, right after a RewardModel stage, e.g. "
            "[SFT, RewardModel, RLHF]",
            check=_rlhf_follows_reward_model,
            field_path=".stages",
        ),
        _alignment_needs_stage("dpo", "dpo", StageType.DPO),
        _alignment_needs_stage("orpo", "orpo", StageType.ORPO),
        _alignment_needs_stage("kto", "kto", StageType.KTO),
        _alignment_needs_stage("simpo", "simpo", StageType.SIMPO),
        _alignment_needs_stage("rewardModel", "reward_model", StageType.REWARD_MODEL),
        _alignment_needs_stage("rlhf", "rlhf", StageType.RLHF),
        Rule(
            cel="!has(self.distributed) || self.distributed.nodes == 1 || "
            "self.distributed.strategy != 'None'",
            message="more than one node needs distributed.strategy (DDP, FSDP, "
            "DeepSpeedZeRO2 or DeepSpeedZeRO3)",
            check=lambda s: (
                s.distributed is None
                or s.distributed.nodes == 1
                or s.distributed.strategy != DistributedStrategy.NONE
            ),
            field_path=".distributed.strategy",
        ),
    )

    model: ModelSource
    """The base model."""

    dataset: DatasetSpec
    """The raw training data and how to clean and split it."""

    method: Method = Method.LORA
    """LoRA, QLoRA, Full, PrefixTuning or PromptTuning."""

    lora: LoRASpec | None = None
    """LoRA settings (method LoRA or QLoRA; default rank 16, alpha 32, all-linear)."""

    qlora: QLoRASpec | None = None
    """4-bit base quantization (method QLoRA; default NF4 with double quantization)."""

    prefix_tuning: PrefixTuningSpec | None = None
    """Prefix tuning settings (method PrefixTuning)."""

    prompt_tuning: PromptTuningSpec | None = None
    """Prompt tuning settings (method PromptTuning)."""

    stages: Annotated[list[StageSpec], Field(min_length=1, max_length=6)] = [
        StageSpec(type=StageType.SFT)
    ]
    """Training stages in order, e.g. [{type: SFT}, {type: DPO}] or
    [{type: SFT}, {type: RewardModel}, {type: RLHF}]."""

    alignment: AlignmentSpec | None = None
    """Settings of the alignment stages."""

    training: TrainingSpec | None = None
    """Hyperparameters (defaults suit LoRA)."""

    distributed: DistributedSpec | None = None
    """Multi-GPU and multi-node settings."""

    evaluation: EvaluationSpec | None = None
    """Metrics, base-vs-tuned comparison and the rollout gate (default: perplexity)."""

    export: ExportSpec | None = None
    """Merge and quantization (default: the adapter only)."""

    output: OutputSpec | None = None
    """Artifact store root (required in a cluster; local runs default to ./artifacts)."""

    resources: ResourcesSpec | None = None
    """GPUs, CPU, memory, scheduling and scratch space of the training pod."""

    tracking: TrackingSpec | None = None
    """TensorBoard and MLflow."""

    suspend: bool = False
    """Stop the workload (checkpoints stay); set back to false to resume."""

    queue_name: Annotated[StrictStr, Field(max_length=63)] | None = None
    """Kueue LocalQueue; Kueue then admits the Job (and owns its suspend field)."""

    active_deadline_seconds: Annotated[StrictInt, Field(ge=1)] | None = None
    """Fail the run (DeadlineExceeded) when it runs longer than this."""

    backoff_limit: Annotated[StrictInt, Field(ge=0, le=100)] = 3
    """Retries after infrastructure failures (user errors and out-of-memory never retry)."""

    ttl_seconds_after_finished: Annotated[StrictInt, Field(ge=0)] | None = None
    """Remove the finished Job and its pods after this long (never the FineTuneJob)."""


class FineTuneJob(ApiModel):
    """A FineTuneJob (short name ftj): data preparation, training, alignment, evaluation,
    merge and quantization into an artifact store, reconciled by the kubetune operator."""

    rules = (
        Rule(
            cel=f"size(self.metadata.name) <= {MAX_JOB_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters (it "
            "names the Jobs, Services and pods the job owns)",
            check=lambda j: len(j.metadata.name or "") <= MAX_JOB_NAME_LENGTH,
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    """kubetune.io/v1alpha1."""

    kind: Literal["FineTuneJob"] = "FineTuneJob"
    """FineTuneJob."""

    metadata: ObjectMeta
    """Standard object metadata."""

    spec: FineTuneJobSpec
    """What to train and how."""

    status: FineTuneJobStatus | None = None
    """What the operator observed (written by the operator only)."""
