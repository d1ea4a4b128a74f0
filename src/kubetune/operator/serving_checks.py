"""The checks of a ModelDeployment spec against its artifacts, vLLM and the cluster.

Each check appends `ServingProblem`s (field, CamelCase reason, what to change) to a list
so that `serving.plan_serving` reports every problem at once. None of them reads the
cluster: what the reconciler observed arrives as `ClusterFeatures`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.methods import PROMPT_LEARNING_METHODS, Method
from kubetune.api.v1alpha1.modeldeployment import (
    AutoscalingMetric,
    AutoscalingProvider,
    ModelDeploymentSpec,
    ServingResources,
    Variant,
    VLLMSpec,
)
from kubetune.operator.serving_args import lora_rank_for, vllm_record
from kubetune.operator.serving_sources import ResolvedArtifact, ServingProblem, ServingReason

if TYPE_CHECKING:
    from kubetune.operator.settings import GPUClass, OperatorSettings


class Autoscaler(str, Enum):
    """Which autoscaler object scales the Deployment."""

    HPA = "HPA"
    KEDA = "KEDA"


@dataclass(frozen=True)
class ClusterFeatures:
    """What the reconciler found in the cluster and the settings.

    Attributes:
        keda_installed: KEDA's ScaledObject CRD (keda.sh/v1alpha1) is served.
        servicemonitor_crd: the Prometheus Operator's ServiceMonitor CRD is served.
        prometheus_url: the Prometheus server KEDA's prometheus trigger queries.
    """

    keda_installed: bool = False
    servicemonitor_crd: bool = False
    prometheus_url: str | None = None


def check_gpu_class(
    resources: ServingResources, settings: OperatorSettings, problems: list[ServingProblem]
) -> GPUClass | None:
    """The GPU class `resources.gpuClass` names (None without one); an unknown class, or
    more GPUs than one of its nodes has, is a problem."""
    if resources.gpu_class is None:
        return None
    found = settings.gpu_class(resources.gpu_class)
    if found is None:
        known = ", ".join(g.name for g in settings.gpu_classes) or "none are configured"
        problems.append(
            ServingProblem(
                "spec.resources.gpuClass",
                Reason.INVALID_SPEC,
                f"unknown GPU class {resources.gpu_class!r} (known: {known}); choose one, "
                "or remove gpuClass",
            )
        )
    elif resources.gpus > found.gpus_per_node:
        problems.append(
            ServingProblem(
                "spec.resources.gpus",
                Reason.INVALID_SPEC,
                f"{resources.gpus} GPUs per replica, but GPU class {found.name} has at most "
                f"{found.gpus_per_node} per node; lower gpus or choose another gpuClass",
            )
        )
    return found


def merge_node_selector(
    resources: ServingResources, gpu: GPUClass | None, problems: list[ServingProblem]
) -> dict[str, str]:
    """The GPU class's node labels merged with `resources.nodeSelector`; a label that
    contradicts the class is a problem."""
    merged = dict(gpu.node_selector) if gpu else {}
    for key, value in (resources.node_selector or {}).items():
        if gpu is not None and merged.get(key, value) != value:
            problems.append(
                ServingProblem(
                    f"spec.resources.nodeSelector.{key}",
                    Reason.INVALID_SPEC,
                    f"{value!r} contradicts GPU class {gpu.name}, which selects {key}: "
                    f"{merged[key]!r}; remove the label or choose another gpuClass",
                )
            )
        merged[key] = value
    return dict(sorted(merged.items()))


def check_artifact(
    artifact: ResolvedArtifact,
    where: str,
    require_gate: bool,
    problems: list[ServingProblem],
) -> bool:
    """Checks every served artifact gets: a servable method, the variant present, the
    gate. Returns whether the variant itself can be looked at further."""
    run = f"run {artifact.run_id or artifact.run_uri}"
    method = artifact.method
    if method in {m.value for m in PROMPT_LEARNING_METHODS}:
        problems.append(
            ServingProblem(
                where,
                ServingReason.METHOD_NOT_SERVABLE,
                f"{run} was trained with method {method}, which vLLM cannot serve; retrain "
                "with LoRA, QLoRA or Full",
            )
        )
        return False
    if artifact.variant not in artifact.variants:
        have = ", ".join(sorted(v.value for v in artifact.variants)) or "none"
        hint = (
            "it was trained with method Full, which makes no adapter: serve it with "
            "spec.model, variant Merged"
            if artifact.variant == Variant.ADAPTER and method == Method.FULL.value
            else "choose one of those, or add it to the job's export (merge: true, "
            "quantize: [W4A16, W8A8, FP8]) and let it run again"
        )
        problems.append(
            ServingProblem(
                where,
                ServingReason.VARIANT_NOT_AVAILABLE,
                f"{run} has no {artifact.variant.value} variant (it has: {have}); {hint}",
            )
        )
    present = artifact.variant in artifact.variants
    if require_gate and artifact.gate_passed is False:
        problems.append(
            ServingProblem(
                where,
                Reason.EVALUATION_GATE_FAILED,
                f"{run} failed its evaluation gate: improve the job, or set "
                "spec.requireGate: false to serve it anyway",
            )
        )
    return present


def check_adapter(
    artifact: ResolvedArtifact, where: str, alternative: str, problems: list[ServingProblem]
) -> int | None:
    """Checks of an artifact served as a LoRA adapter; returns its rank."""
    run = f"run {artifact.run_id or artifact.run_uri}"
    info = artifact.adapter
    if info is None or info.rank is None:
        problems.append(
            ServingProblem(
                where,
                ServingReason.ARTIFACT_NOT_READY,
                f"the adapter of {run} has no readable adapter_config.json (with its rank r); "
                "re-publish the run",
            )
        )
        return None
    features = [
        text
        for present, text in (
            (info.use_dora, "DoRA (useDoRA)"),
            (info.has_modules_to_save, "modules_to_save (lora.modulesToSave)"),
        )
        if present
    ]
    if features:
        problems.append(
            ServingProblem(
                where,
                ServingReason.ADAPTER_INCOMPATIBLE,
                f"the adapter of {run} uses {' and '.join(features)}, which vLLM cannot "
                f"serve as a LoRA adapter; {alternative}",
            )
        )
    return info.rank


def check_lora_rank(
    ranks: Mapping[str, int], vllm: VLLMSpec, problems: list[ServingProblem]
) -> int | None:
    """`--max-lora-rank`: the spec's, or the smallest vLLM accepts that holds every
    adapter."""
    allowed = vllm_record().max_lora_ranks
    if vllm.max_lora_rank is not None and vllm.max_lora_rank not in allowed:
        problems.append(
            ServingProblem(
                "spec.vllm.maxLoraRank",
                Reason.INVALID_SPEC,
                f"vLLM accepts a maxLoraRank of {', '.join(map(str, allowed))}, not "
                f"{vllm.max_lora_rank}",
            )
        )
        return None
    largest = max(ranks.values(), default=1)
    limit = vllm.max_lora_rank or lora_rank_for(largest)
    for where, rank in ranks.items():
        if limit is None or rank > limit:
            fix = (
                f"raise spec.vllm.maxLoraRank to {lora_rank_for(rank)}"
                if limit is not None and lora_rank_for(rank) is not None
                else "deploy variant Merged instead"
            )
            problems.append(
                ServingProblem(
                    where,
                    ServingReason.ADAPTER_INCOMPATIBLE,
                    f"the adapter has rank {rank}, over the largest rank vLLM is set to "
                    f"serve ({limit or max(allowed)}); {fix}",
                )
            )
    return limit


def check_context(
    artifact: ResolvedArtifact, vllm: VLLMSpec, problems: list[ServingProblem]
) -> None:
    """`vllm.maxModelLen` must fit the model's context length, when it is known."""
    known = artifact.max_position_embeddings
    if vllm.max_model_len is not None and known is not None and vllm.max_model_len > known:
        problems.append(
            ServingProblem(
                "spec.vllm.maxModelLen",
                Reason.INVALID_SPEC,
                f"maxModelLen ({vllm.max_model_len}) exceeds the model's context length "
                f"({known}, max_position_embeddings in config.json); lower it, or remove it "
                "to serve the model's own",
            )
        )


def resolve_base_revision(
    base_uri: str,
    revision: str | None,
    trained: Mapping[str, str | None],
    problems: list[ServingProblem],
) -> str | None:
    """The base model's revision: the spec's, else the one every adapter was trained on."""
    if revision is not None:
        return revision
    revisions = sorted({r for r in trained.values() if r})
    if len(revisions) > 1:
        which = ", ".join(f"{name}: {rev}" for name, rev in sorted(trained.items()) if rev)
        problems.append(
            ServingProblem(
                "spec.baseModel.revision",
                ServingReason.ADAPTER_INCOMPATIBLE,
                f"the adapters were trained on different revisions of {base_uri} ({which}); "
                "set spec.baseModel.revision and serve only adapters trained on it",
            )
        )
        return None
    return revisions[0] if revisions else None


def check_autoscaling(
    spec: ModelDeploymentSpec, features: ClusterFeatures, problems: list[ServingProblem]
) -> tuple[Autoscaler | None, str | None]:
    """Which autoscaler scales the Deployment and the metric it follows (None without
    autoscaling). Auto is KEDA when it is installed and a Prometheus server is known,
    else HPA."""
    auto = spec.autoscaling
    if auto is None:
        return None, None
    target = float(auto.target)
    if target <= 0:
        problems.append(
            ServingProblem(
                "spec.autoscaling.target",
                Reason.INVALID_SPEC,
                "the target must be greater than 0",
            )
        )
    elif auto.metric == AutoscalingMetric.KV_CACHE_USAGE and target > 1:
        problems.append(
            ServingProblem(
                "spec.autoscaling.target",
                Reason.INVALID_SPEC,
                f"KVCacheUsage is a fraction of the KV cache (0 to 1), so a target of "
                f"{auto.target} is never reached; use e.g. 0.8",
            )
        )
    provider = auto.provider
    if provider == AutoscalingProvider.AUTO:
        keda = features.keda_installed and features.prometheus_url is not None
        provider = AutoscalingProvider.KEDA if keda else AutoscalingProvider.HPA
    if provider == AutoscalingProvider.KEDA and not features.keda_installed:
        problems.append(
            ServingProblem(
                "spec.autoscaling.provider",
                Reason.INVALID_SPEC,
                "KEDA is not installed (no ScaledObject CRD, keda.sh/v1alpha1): install KEDA, "
                "or set provider HPA",
                waiting=True,
            )
        )
    elif provider == AutoscalingProvider.KEDA and features.prometheus_url is None:
        problems.append(
            ServingProblem(
                "spec.autoscaling.provider",
                Reason.INVALID_SPEC,
                "the operator settings name no Prometheus server for KEDA's prometheus "
                "trigger (prometheusUrl): ask the platform team to set it, or set provider HPA",
            )
        )
    if provider == AutoscalingProvider.HPA and auto.min_replicas == 0:
        problems.append(
            ServingProblem(
                "spec.autoscaling.minReplicas",
                Reason.INVALID_SPEC,
                "minReplicas 0 needs KEDA (a HorizontalPodAutoscaler keeps at least one "
                "replica): install KEDA and use provider KEDA or Auto, or set minReplicas to 1",
            )
        )
    scaler = Autoscaler.KEDA if provider == AutoscalingProvider.KEDA else Autoscaler.HPA
    return scaler, vllm_record().metrics[auto.metric.value]


def tensor_parallel_size(
    resources: ServingResources, vllm: VLLMSpec, problems: list[ServingProblem]
) -> int:
    """The tensor-parallel size: the spec's, else one shard per GPU."""
    size = vllm.tensor_parallel_size or max(resources.gpus, 1)
    if size > max(resources.gpus, 1):
        problems.append(
            ServingProblem(
                "spec.vllm.tensorParallelSize",
                Reason.INVALID_SPEC,
                f"tensorParallelSize ({size}) exceeds the GPUs per replica "
                f"(spec.resources.gpus: {resources.gpus}); raise gpus or lower it",
            )
        )
    return size
