"""What a ModelDeployment serves, and whether it may: artifacts, checks and the plan.

The reconciler gathers the facts (the FineTuneJob's status, the run's manifest, the
adapter's `adapter_config.json`, the model's `config.json`) and hands them over as
`ResolvedArtifact`s; `plan_serving` checks them against the spec all at once and returns
a `ServingPlan` (what to fetch, the vLLM command line, GPUs, replicas, the autoscaler), or
raises `ServingError` listing every problem with its field and what to change. Nothing
here talks to the API server or the artifact store.

The other serving modules: `serving_sources` (artifacts, FineTuneJob references, the
init containers' fetches), `serving_checks` (the checks), `serving_args` (the vLLM
command line and its recorded flags), `serving_objects` (the Kubernetes objects) and
`serving_status` (the status). This module is the entry point and re-exports what the
reconciler needs.

Rules that come from vLLM and from the method (DESIGN §8): prefix and prompt tuning runs
are not servable; DoRA adapters and adapters with `modules_to_save` are not servable as
LoRA adapters (deploy variant Merged); an adapter is served on the exact base model and
revision it was trained on; a run that failed its evaluation gate is refused unless
`requireGate: false`. A QLoRA adapter is served on the unquantized base.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kubetune.api.contract import Reason
from kubetune.api.meta import SecretRef, StorageKind
from kubetune.api.uris import scheme
from kubetune.api.v1alpha1.modeldeployment import (
    DeploymentLineage,
    ModelDeployment,
    ModelDeploymentSpec,
    ServedModelStatus,
    ServingResources,
    Variant,
    VLLMSpec,
)
from kubetune.operator import names
from kubetune.operator.serving_args import (
    PORT,
    LoRAModule,
    build_vllm_args,
    check_extra_args,
)
from kubetune.operator.serving_checks import (
    Autoscaler,
    ClusterFeatures,
    check_adapter,
    check_artifact,
    check_autoscaling,
    check_context,
    check_gpu_class,
    check_lora_rank,
    merge_node_selector,
    resolve_base_revision,
    tensor_parallel_size,
)
from kubetune.operator.serving_sources import (
    QUANTIZED,
    AdapterInfo,
    FetchStep,
    JobRun,
    ResolvedArtifact,
    ServingProblem,
    ServingReason,
    artifact_from_manifest,
    base_fetch,
    base_target,
    check_base_uri,
    check_source_uri,
    lineage_of,
    missing_finetunejob,
    resolve_from_finetunejob,
    run_fetch,
    run_target,
    same_model,
    secret_env,
    split_revision,
)

if TYPE_CHECKING:
    from kubetune.operator.settings import OperatorSettings

__all__ = [
    "AdapterInfo",
    "Autoscaler",
    "ClusterFeatures",
    "JobRun",
    "Resolution",
    "ResolvedArtifact",
    "ServingError",
    "ServingPlan",
    "ServingProblem",
    "ServingReason",
    "artifact_from_manifest",
    "cache_claim_name",
    "combined_digest",
    "deployment_name",
    "endpoint",
    "missing_finetunejob",
    "plan_serving",
    "resolve_from_finetunejob",
    "selector_labels",
    "service_name",
    "serving_labels",
]

COMPONENT_SERVING = "serving"
LABEL_MODELDEPLOYMENT = names.LABEL_MODELDEPLOYMENT
COMPRESSED_TENSORS = "compressed-tensors"
ARTIFACT_SECRET_FIELD = "spec.credentialsSecretRef"
BASE_SECRET_FIELD = "spec.baseModel.credentialsSecretRef"
ANNOTATION_FINETUNEJOB = "kubetune.io/finetunejob"
ANNOTATION_RUN_ID = "kubetune.io/run-id"
ANNOTATION_RUN_URI = "kubetune.io/run-uri"
ANNOTATION_DATASET_DIGEST = "kubetune.io/dataset-digest"
ANNOTATION_EVAL_SCORES = "kubetune.io/eval-scores"
ANNOTATION_ADAPTERS = "kubetune.io/adapters"


def deployment_name(md_name: str) -> str:
    """Name of the Deployment (and of the PodDisruptionBudget and autoscaler)."""
    return names.fit_name(md_name)


def service_name(md_name: str) -> str:
    """Name of the Service: the ModelDeployment's, with a `kt-` prefix when it starts with
    a digit (a Service name must start with a letter)."""
    name = names.fit_name(md_name)
    return name if name[0].isalpha() else names.fit_name(f"kt-{md_name}")


def cache_claim_name(md_name: str) -> str:
    """Name of the model-cache PersistentVolumeClaim the operator creates."""
    return names.fit_name(f"{md_name}-model-cache")


def selector_labels(md_name: str) -> dict[str, str]:
    """The labels that select a ModelDeployment's pods (immutable in the Deployment)."""
    return {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_COMPONENT: COMPONENT_SERVING,
        LABEL_MODELDEPLOYMENT: md_name,
    }


def serving_labels(md_name: str) -> dict[str, str]:
    """Labels of every object a ModelDeployment owns, and of its pods."""
    return {**selector_labels(md_name), names.LABEL_MANAGED_BY: names.MANAGER}


def endpoint(md_name: str, namespace: str) -> str:
    """The in-cluster OpenAI-compatible base URL."""
    return f"http://{service_name(md_name)}.{namespace}.svc:{PORT}/v1"


class ServingError(Exception):
    """The ModelDeployment cannot be served as specified. `problems` lists every reason,
    each naming its field; `reason` is the first one's (for the Ready condition)."""

    def __init__(self, problems: Sequence[ServingProblem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = tuple(problems)

    @property
    def reason(self) -> str:
        """The first problem's reason, for the Ready condition."""
        return str(self.problems[0].reason.value)

    @property
    def waiting(self) -> bool:
        """Every problem goes away by itself or once the user creates something (a job
        still training, a FineTuneJob not created yet): retry later rather than fail."""
        return all(p.waiting for p in self.problems)


# --- The plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """The artifacts of a ModelDeployment as the reconciler resolved them.

    Attributes:
        model: the artifact of `spec.model`.
        adapters: the artifact of each `spec.adapters[]` entry, by adapter name.
        problems: why some could not be resolved (e.g. `resolve_from_finetunejob`'s
            refusals, a FineTuneJob not found, a manifest that could not be read).
    """

    model: ResolvedArtifact | None = None
    adapters: Mapping[str, ResolvedArtifact] = field(default_factory=dict)
    problems: tuple[ServingProblem, ...] = ()


@dataclass(frozen=True)
class ServingPlan:
    """Everything the builders need to render a ModelDeployment's objects.

    Attributes:
        served_models: names the endpoint answers to, with digests and lineage.
        artifact_digest: pinned in the pod template (`kubetune.io/artifact-digest`): the
            manifest digest, or for several adapters a digest over base and adapters.
        lineage: where the model came from (single-model deployments).
        fetches: one init container per artifact.
        vllm_args: arguments of `vllm serve`.
        image: the vLLM image.
        gpus: GPUs per replica.
        gpu_resource: the extended resource that counts them.
        node_selector: the GPU class's labels merged with `resources.nodeSelector`.
        replicas: fixed replicas, or None when an autoscaler owns the count.
        min_replicas: the fewest replicas expected (for the PodDisruptionBudget).
        autoscaler: HPA, KEDA or None.
        metric: the Prometheus metric the autoscaler follows.
        lineage_annotations: short provenance for the Deployment's annotations.
    """

    served_models: tuple[ServedModelStatus, ...]
    artifact_digest: str
    lineage: DeploymentLineage | None
    fetches: tuple[FetchStep, ...]
    vllm_args: tuple[str, ...]
    image: str
    gpus: int
    gpu_resource: str
    node_selector: dict[str, str]
    replicas: int | None
    min_replicas: int
    autoscaler: Autoscaler | None
    metric: str | None
    lineage_annotations: dict[str, str]


def combined_digest(base: str, adapters: Mapping[str, str]) -> str:
    """`sha256:<hex>` over a base model identity and each adapter's manifest digest, so
    that changing any of them rolls the pods and changing none changes nothing."""
    text = json.dumps({"base": base, "adapters": dict(sorted(adapters.items()))}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _artifact_secret(spec: ModelDeploymentSpec, settings: OperatorSettings) -> SecretRef | None:
    if spec.credentials_secret_ref is not None:
        return spec.credentials_secret_ref
    if settings.default_output_credentials_secret:
        return SecretRef(name=settings.default_output_credentials_secret)
    return None


@dataclass(frozen=True)
class _Served:
    """What the model part of the spec decided."""

    model_path: str
    served_name: str
    fetches: tuple[FetchStep, ...]
    served_models: tuple[ServedModelStatus, ...]
    digest: str
    lineage: DeploymentLineage | None
    annotations: dict[str, str]
    lora_modules: tuple[LoRAModule, ...] = ()
    max_lora_rank: int | None = None
    max_loras: int | None = None
    quantized: bool = False


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _lineage_annotations(lineage: DeploymentLineage) -> dict[str, str]:
    pairs = {
        ANNOTATION_FINETUNEJOB: lineage.fine_tune_job,
        ANNOTATION_RUN_ID: lineage.run_id,
        ANNOTATION_RUN_URI: lineage.run_uri,
        ANNOTATION_DATASET_DIGEST: lineage.dataset_digest,
        ANNOTATION_EVAL_SCORES: _compact(lineage.eval_scores) if lineage.eval_scores else None,
    }
    return {key: value for key, value in pairs.items() if value}


def _single(
    md_name: str,
    spec: ModelDeploymentSpec,
    artifact: ResolvedArtifact | None,
    settings: OperatorSettings,
    cached: bool,
    problems: list[ServingProblem],
) -> _Served | None:
    """One run's variant: a merged or quantized model, or an adapter on its base."""
    source = spec.model
    assert source is not None
    where = "spec.model.fineTuneJobRef" if source.fine_tune_job_ref else "spec.model.uri"
    if source.uri:
        problems += check_source_uri("spec.model.uri", source.uri)
    if artifact is None:
        return None
    if artifact.variant != source.variant:
        raise ValueError(
            f"spec.model.variant is {source.variant.value} but the artifact was resolved "
            f"for {artifact.variant.value}"
        )
    servable = check_artifact(artifact, where, spec.require_gate, problems)
    check_context(artifact, spec.vllm or VLLMSpec(), problems)
    secret = _artifact_secret(spec, settings)
    credentials = secret_env(ARTIFACT_SECRET_FIELD, secret, artifact.run_uri)
    lineage = lineage_of(artifact)
    served = ServedModelStatus(
        name=md_name, artifact_digest=artifact.manifest_digest, lineage=lineage
    )
    if artifact.variant != Variant.ADAPTER:
        target = run_target("model", artifact, cached)
        quantized = artifact.variant in QUANTIZED and artifact.quantization_method in (
            None,
            COMPRESSED_TENSORS,
        )
        return _Served(
            model_path=target,
            served_name=md_name,
            fetches=(run_fetch("fetch-model", artifact, target, credentials, cached),),
            served_models=(served,),
            digest=artifact.manifest_digest,
            lineage=lineage,
            annotations=_lineage_annotations(lineage),
            quantized=quantized,
        )
    rank = None
    if servable:
        rank = check_adapter(
            artifact,
            "spec.model.variant",
            "deploy variant Merged (export.merge: true on the FineTuneJob)",
            problems,
        )
    limit = check_lora_rank(
        {"spec.model.variant": rank} if rank else {}, spec.vllm or VLLMSpec(), problems
    )
    if artifact.base_model_uri is None:
        problems.append(
            ServingProblem(
                where,
                ServingReason.ARTIFACT_NOT_READY,
                f"the manifest of {artifact.run_uri} does not say which base model the adapter "
                "was trained on (lineage.model.uri); re-publish the run",
            )
        )
        return None
    problems += check_base_uri(where, artifact.base_model_uri, settings)
    base_uri, base_revision = split_revision(artifact.base_model_uri, artifact.base_model_revision)
    base_credentials = secret_env(
        ARTIFACT_SECRET_FIELD, secret, base_uri, all_optional=scheme(base_uri) == "hf"
    )
    base_dir = base_target(base_uri, base_revision, cached)
    adapter_dir = run_target("adapter", artifact, cached)
    return _Served(
        model_path=base_dir,
        served_name=f"{md_name}-base",
        fetches=(
            base_fetch(base_uri, base_revision, base_dir, base_credentials),
            run_fetch("fetch-adapter", artifact, adapter_dir, credentials, cached),
        ),
        served_models=(served, ServedModelStatus(name=f"{md_name}-base")),
        digest=artifact.manifest_digest,
        lineage=lineage,
        annotations=_lineage_annotations(lineage),
        lora_modules=(LoRAModule(md_name, adapter_dir),),
        max_lora_rank=limit,
        max_loras=1,
    )


def _multi(
    md_name: str,
    spec: ModelDeploymentSpec,
    artifacts: Mapping[str, ResolvedArtifact],
    settings: OperatorSettings,
    cached: bool,
    problems: list[ServingProblem],
) -> _Served | None:
    """LoRA adapters on one base model."""
    base = spec.base_model
    assert base is not None
    vllm = spec.vllm or VLLMSpec()
    problems += check_base_uri("spec.baseModel.uri", base.uri, settings)
    base_uri, base_revision = split_revision(base.uri, base.revision)
    secret = _artifact_secret(spec, settings)
    ranks: dict[str, int] = {}
    trained: dict[str, str | None] = {}
    fetches: list[FetchStep] = []
    modules: list[LoRAModule] = []
    served: list[ServedModelStatus] = [ServedModelStatus(name=md_name)]
    digests: dict[str, str] = {}
    adapters_note: list[dict[str, str]] = []
    for index, entry in enumerate(spec.adapters):
        at = f"spec.adapters[{index}]"
        where = f"{at}.fineTuneJobRef" if entry.fine_tune_job_ref else f"{at}.uri"
        if entry.uri:
            problems += check_source_uri(f"{at}.uri", entry.uri)
        if entry.name == md_name:
            problems.append(
                ServingProblem(
                    f"{at}.name",
                    Reason.INVALID_SPEC,
                    f"{entry.name!r} is the name the base model is served under "
                    "(metadata.name); give the adapter another name",
                )
            )
        artifact = artifacts.get(entry.name)
        if artifact is None:
            continue
        if artifact.variant != Variant.ADAPTER:
            raise ValueError(f"adapter {entry.name} was resolved as {artifact.variant.value}")
        if check_artifact(artifact, where, spec.require_gate, problems):
            rank = check_adapter(
                artifact, where, "serve it alone with spec.model, variant Merged", problems
            )
            if rank is not None:
                ranks[where] = rank
        used = artifact.base_model_uri
        if used is None or not same_model(
            base_uri, base_revision, used, artifact.base_model_revision
        ):
            trained_on = f"{used}@{artifact.base_model_revision}" if used else "an unknown base"
            problems.append(
                ServingProblem(
                    where,
                    ServingReason.ADAPTER_INCOMPATIBLE,
                    f"adapter {entry.name} (run {artifact.run_id or artifact.run_uri}) was "
                    f"trained on {trained_on}, not on spec.baseModel {base.uri}"
                    f"{'@' + base_revision if base_revision else ''}; serve it on its own base "
                    "model, or retrain it on this one",
                )
            )
        else:
            trained[entry.name] = artifact.base_model_revision
        target = run_target(f"adapters/{entry.name}", artifact, cached)
        credentials = secret_env(ARTIFACT_SECRET_FIELD, secret, artifact.run_uri)
        fetches.append(run_fetch(f"fetch-adapter-{index}", artifact, target, credentials, cached))
        modules.append(LoRAModule(entry.name, target))
        lineage = lineage_of(artifact)
        served.append(
            ServedModelStatus(
                name=entry.name, artifact_digest=artifact.manifest_digest, lineage=lineage
            )
        )
        digests[entry.name] = artifact.manifest_digest
        note = {
            "name": entry.name,
            "fineTuneJob": lineage.fine_tune_job,
            "runId": lineage.run_id,
            "digest": artifact.manifest_digest,
        }
        adapters_note.append({k: v for k, v in note.items() if v})
    base_revision = resolve_base_revision(base_uri, base_revision, trained, problems)
    limit = check_lora_rank(ranks, vllm, problems)
    base_dir = base_target(base_uri, base_revision, cached)
    base_credentials = secret_env(BASE_SECRET_FIELD, base.credentials_secret_ref, base_uri)
    return _Served(
        model_path=base_dir,
        served_name=md_name,
        fetches=(base_fetch(base_uri, base_revision, base_dir, base_credentials), *fetches),
        served_models=tuple(served),
        digest=combined_digest(f"{base_uri}@{base_revision or ''}", digests),
        lineage=None,
        annotations={ANNOTATION_ADAPTERS: _compact(adapters_note)},
        lora_modules=tuple(modules),
        max_lora_rank=limit,
        max_loras=vllm.max_loras or len(spec.adapters),
    )


def plan_serving(
    md: ModelDeployment,
    resolution: Resolution,
    settings: OperatorSettings,
    features: ClusterFeatures,
) -> ServingPlan:
    """Decide what a ModelDeployment runs, or refuse it with every problem at once.

    Raises:
        ServingError: the spec, the artifacts or the cluster keep it from being served;
            each problem names its field and what to change.
        ValueError: the ModelDeployment has no name, or an artifact the spec asks for was
            neither resolved nor explained by a problem in `resolution`.
    """
    md_name = md.metadata.name
    if not md_name:
        raise ValueError("the ModelDeployment needs metadata.name")
    spec = md.spec
    problems = list(resolution.problems)
    vllm = spec.vllm or VLLMSpec()
    resources = spec.resources or ServingResources()
    image = vllm.image or settings.vllm_image
    gpu = check_gpu_class(resources, settings, problems)
    node_selector = merge_node_selector(resources, gpu, problems)
    tensor_parallel = tensor_parallel_size(resources, vllm, problems)
    problems += [
        ServingProblem(p.field, Reason.INVALID_SPEC, p.message)
        for p in check_extra_args(vllm.extra_args, image)
    ]
    cached = spec.model_cache is not None and spec.model_cache.type == StorageKind.PVC
    if spec.model is not None:
        chosen = _single(md_name, spec, resolution.model, settings, cached, problems)
    else:
        chosen = _multi(md_name, spec, resolution.adapters, settings, cached, problems)
    autoscaler, metric = check_autoscaling(spec, features, problems)
    if problems:
        raise ServingError(problems)
    if chosen is None or (spec.model is None and len(resolution.adapters) != len(spec.adapters)):
        raise ValueError("an artifact of the spec was not resolved and no problem says why")
    fixed = None if spec.autoscaling else (1 if spec.replicas is None else spec.replicas)
    args = build_vllm_args(
        chosen.model_path,
        chosen.served_name,
        tensor_parallel_size=tensor_parallel,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        max_model_len=vllm.max_model_len,
        quantized=chosen.quantized,
        lora_modules=chosen.lora_modules,
        max_lora_rank=chosen.max_lora_rank,
        max_loras=chosen.max_loras,
        extra_args=vllm.extra_args,
    )
    return ServingPlan(
        served_models=chosen.served_models,
        artifact_digest=chosen.digest,
        lineage=chosen.lineage,
        fetches=chosen.fetches,
        vllm_args=tuple(args),
        image=image,
        gpus=resources.gpus,
        gpu_resource=gpu.resource_name if gpu else settings.gpu_resource_name,
        node_selector=node_selector,
        replicas=fixed,
        min_replicas=spec.autoscaling.min_replicas if spec.autoscaling else (fixed or 0),
        autoscaler=autoscaler,
        metric=metric,
        lineage_annotations=chosen.annotations,
    )
