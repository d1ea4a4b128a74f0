"""ModelDeployment: serve a tuned model, or several LoRA adapters on one base, with vLLM."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import DNS_LABEL_PATTERN, ApiModel, Decimal, Fraction, Quantity, Rule, Uri
from kubetune.api.meta import (
    Affinity,
    Condition,
    LocalObjectRef,
    NodeSelector,
    SecretRef,
    Toleration,
    VolumeSpec,
)
from kubetune.api.uris import ARTIFACT_URI, MODEL_URI, MODEL_URI_HELP, matches
from kubetune.api.v1alpha1.objectmeta import ObjectMeta

MAX_DEPLOYMENT_NAME_LENGTH = 48


class Variant(str, Enum):
    """Which artifact of a run is served."""

    MERGED = "Merged"
    ADAPTER = "Adapter"
    W4A16 = "W4A16"
    W8A8 = "W8A8"
    FP8 = "FP8"


_ONE_SOURCE = Rule(
    cel="has(self.fineTuneJobRef) != has(self.uri)",
    message="set exactly one of fineTuneJobRef and uri",
    check=lambda m: (m.fine_tune_job_ref is None) != (m.uri is None),
)
_RUN_URI = Rule(
    cel="!has(self.uri) || self.uri.matches('" + ARTIFACT_URI + "')",
    message="must be a RUN_URI: s3://bucket/prefix/<namespace>/<job>/<run-id>, "
    "pvc://claim/path or a local path",
    check=lambda m: m.uri is None or matches(ARTIFACT_URI, m.uri),
    field_path=".uri",
)


class ServedModel(ApiModel):
    """A tuned model from a FineTuneJob (its current run) or from a RUN_URI."""

    rules = (_ONE_SOURCE, _RUN_URI)

    fine_tune_job_ref: LocalObjectRef | None = None
    """A FineTuneJob in the same namespace; its latest succeeded run is served."""

    uri: Uri | None = None
    """A RUN_URI (the run's artifact root, holding manifest.json)."""

    variant: Variant = Variant.MERGED
    """Merged, Adapter (on the job's base model), W4A16, W8A8 or FP8."""


class BaseModelSpec(ApiModel):
    """The base model that LoRA adapters are served on."""

    rules = (
        Rule(
            cel="self.uri.matches('" + MODEL_URI + "')",
            message=f"must be {MODEL_URI_HELP}",
            check=lambda m: matches(MODEL_URI, m.uri),
            field_path=".uri",
        ),
    )

    uri: Uri
    """The base model, the same URI the adapters' FineTuneJobs used."""

    revision: Annotated[StrictStr, Field(max_length=256)] | None = None
    """The base model revision; each adapter's must match."""

    credentials_secret_ref: SecretRef | None = None
    """Secret with HF_TOKEN (hf://) or AWS_* keys (s3://)."""


class AdapterSpec(ApiModel):
    """A LoRA adapter served under its own model name."""

    rules = (_ONE_SOURCE, _RUN_URI)

    name: Annotated[StrictStr, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
    """Served model name clients ask for in the OpenAI API."""

    fine_tune_job_ref: LocalObjectRef | None = None
    """A FineTuneJob in the same namespace; its latest succeeded run's adapter is served."""

    uri: Uri | None = None
    """A RUN_URI holding an adapter."""


class AutoscalingMetric(str, Enum):
    """vLLM metric the replica count follows."""

    RUNNING_REQUESTS = "RunningRequests"
    WAITING_REQUESTS = "WaitingRequests"
    KV_CACHE_USAGE = "KVCacheUsage"


class AutoscalingProvider(str, Enum):
    """Which autoscaler scales the Deployment."""

    AUTO = "Auto"
    HPA = "HPA"
    KEDA = "KEDA"


class AutoscalingSpec(ApiModel):
    """Scale replicas on vLLM load."""

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
    )

    min_replicas: Annotated[StrictInt, Field(ge=0, le=1000)] = 1
    """Fewest replicas (0 needs KEDA)."""

    max_replicas: Annotated[StrictInt, Field(ge=1, le=1000)]
    """Most replicas."""

    metric: AutoscalingMetric = AutoscalingMetric.WAITING_REQUESTS
    """Per-replica vLLM metric to follow."""

    target: Decimal = "4"
    """Target value of the metric per replica."""

    provider: AutoscalingProvider = AutoscalingProvider.AUTO
    """Auto (KEDA when installed, else HPA on Prometheus Adapter metrics), HPA or KEDA."""


class ServingResources(ApiModel):
    """What each serving pod gets and where it may run."""

    gpus: Annotated[StrictInt, Field(ge=0, le=64)] = 1
    """GPUs per replica (vLLM tensor parallelism uses them)."""

    gpu_class: Annotated[StrictStr, Field(max_length=63)] | None = None
    """A GPU class from the operator settings."""

    cpu: Quantity | None = None
    """CPU request and limit."""

    memory: Quantity | None = None
    """Memory request and limit."""

    node_selector: NodeSelector | None = None
    """Extra node labels the pods require."""

    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    """Tolerations for tainted GPU nodes."""

    affinity: Affinity | None = None
    """A Kubernetes affinity, copied to the pods as is."""

    shm_size: Quantity | None = None
    """Size of /dev/shm."""


class VLLMSpec(ApiModel):
    """Settings of the vLLM OpenAI-compatible server."""

    image: Annotated[StrictStr, Field(max_length=512)] | None = None
    """vLLM image instead of the operator's pinned one."""

    max_model_len: Annotated[StrictInt, Field(ge=16, le=10_000_000)] | None = None
    """Longest context served (default: the model's)."""

    gpu_memory_utilization: Fraction = "0.9"
    """Share of GPU memory vLLM may use."""

    tensor_parallel_size: Annotated[StrictInt, Field(ge=1, le=64)] | None = None
    """Tensor parallelism (default: resources.gpus)."""

    max_lora_rank: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    """Largest adapter rank (default: the largest served adapter's rank)."""

    max_loras: Annotated[StrictInt, Field(ge=1, le=256)] | None = None
    """Adapters resident on the GPU at once (default: the number of adapters)."""

    extra_args: Annotated[
        list[Annotated[StrictStr, Field(max_length=1024)]], Field(max_length=64)
    ] = []
    """Further vLLM command-line arguments, passed as they are."""


class ModelDeploymentSpec(ApiModel):
    """What to serve and how."""

    rules = (
        Rule(
            cel="has(self.model) != has(self.baseModel)",
            message="set model (one tuned model) or baseModel with adapters (multi-LoRA), not both",
            check=lambda s: (s.model is None) != (s.base_model is None),
        ),
        Rule(
            cel="!has(self.baseModel) || size(self.adapters) > 0",
            message="baseModel needs at least one entry in adapters",
            check=lambda s: s.base_model is None or len(s.adapters) > 0,
            field_path=".adapters",
        ),
        Rule(
            cel="!has(self.model) || size(self.adapters) == 0",
            message="adapters are served on baseModel: move model to baseModel, or remove adapters",
            check=lambda s: s.model is None or len(s.adapters) == 0,
            field_path=".adapters",
        ),
        Rule(
            cel="self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be unique",
            check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
            field_path=".adapters",
        ),
        Rule(
            cel="!has(self.autoscaling) || !has(self.replicas)",
            message="set replicas or autoscaling, not both",
            check=lambda s: s.autoscaling is None or s.replicas is None,
            field_path=".replicas",
        ),
    )

    model: ServedModel | None = None
    """One tuned model: a FineTuneJob's run (or a RUN_URI) and which variant."""

    base_model: BaseModelSpec | None = None
    """The base model for multi-LoRA serving (with adapters)."""

    adapters: Annotated[list[AdapterSpec], Field(max_length=64)] = []
    """LoRA adapters served on baseModel, each under its own name."""

    replicas: Annotated[StrictInt, Field(ge=0, le=1000)] | None = None
    """Fixed number of replicas (default 1)."""

    autoscaling: AutoscalingSpec | None = None
    """Scale on vLLM load instead of a fixed number of replicas."""

    resources: ServingResources | None = None
    """GPUs, CPU, memory and scheduling of each replica."""

    vllm: VLLMSpec | None = Field(default=None, alias="vllm")
    """vLLM server settings."""

    model_cache: VolumeSpec | None = None
    """Where the init container puts the model: an emptyDir per pod (default), or a PVC
    shared by pods and kept across restarts (keyed by the artifact digest)."""

    credentials_secret_ref: SecretRef | None = None
    """Secret with the AWS_* keys to read the artifacts (default: the operator's)."""

    require_gate: bool = True
    """Serve only runs that passed their evaluation gate."""


class DeploymentLineage(ApiModel):
    """Where the served model came from."""

    fine_tune_job: Annotated[StrictStr, Field(max_length=253)] | None = None
    """The FineTuneJob."""

    run_id: Annotated[StrictStr, Field(max_length=64)] | None = None
    """The run."""

    run_uri: Annotated[StrictStr, Field(max_length=4096)] | None = None
    """The run's artifact root."""

    dataset_digest: Annotated[StrictStr, Field(max_length=80)] | None = None
    """sha256 of the run's prepared data."""

    eval_scores: (
        Annotated[dict[str, Annotated[StrictStr, Field(max_length=64)]], Field(max_length=64)]
        | None
    ) = None
    """The run's evaluation metrics."""


class ServedModelStatus(ApiModel):
    """A model name the endpoint answers to."""

    name: Annotated[StrictStr, Field(max_length=253)]
    """Name to put in the OpenAI API's model field."""

    artifact_digest: Annotated[StrictStr, Field(max_length=80)] | None = None
    """sha256 of the manifest it was loaded from."""

    lineage: DeploymentLineage | None = None
    """Where it came from."""


class ModelDeploymentStatus(ApiModel):
    """What the operator observed about a ModelDeployment."""

    observed_generation: Annotated[StrictInt, Field(ge=0)] | None = None
    """The metadata.generation this status describes."""

    conditions: Annotated[list[Condition], Field(max_length=16)] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready (summary), Available, Progressing."""

    endpoint: Annotated[StrictStr, Field(max_length=2048)] | None = None
    """In-cluster OpenAI-compatible base URL, e.g. http://name.ns.svc:8000/v1."""

    served_models: Annotated[list[ServedModelStatus], Field(max_length=65)] | None = None
    """Model names the endpoint serves."""

    artifact_digest: Annotated[StrictStr, Field(max_length=80)] | None = None
    """sha256 of the served manifest (pinned in the pod template)."""

    replicas: Annotated[StrictInt, Field(ge=0)] | None = None
    """Replicas wanted."""

    ready_replicas: Annotated[StrictInt, Field(ge=0)] | None = None
    """Replicas whose model answered a test request."""

    lineage: DeploymentLineage | None = None
    """Where the served model came from (single-model deployments)."""


class ModelDeployment(ApiModel):
    """A ModelDeployment (short name md): vLLM serving of a tuned model or of several LoRA
    adapters on one base, with an OpenAI-compatible endpoint."""

    rules = (
        Rule(
            cel=f"size(self.metadata.name) <= {MAX_DEPLOYMENT_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_DEPLOYMENT_NAME_LENGTH} characters "
            "(it names the Deployment, Service and pods)",
            check=lambda d: len(d.metadata.name or "") <= MAX_DEPLOYMENT_NAME_LENGTH,
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    """kubetune.io/v1alpha1."""

    kind: Literal["ModelDeployment"] = "ModelDeployment"
    """ModelDeployment."""

    metadata: ObjectMeta
    """Standard object metadata."""

    spec: ModelDeploymentSpec
    """What to serve and how."""

    status: ModelDeploymentStatus | None = None
    """What the operator observed (written by the operator only)."""
