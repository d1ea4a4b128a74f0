"""Where a ModelDeployment's models come from: artifacts, FineTuneJob runs, fetch steps.

A served model is either a run's artifact (`fineTuneJobRef` or a RUN_URI; verified
against its manifest by `kubetune fetch`) or, for LoRA adapters, the base model the
adapters were trained on. The reconciler resolves each source to a `ResolvedArtifact`:
a `fineTuneJobRef` with `resolve_from_finetunejob` (the job's status says which run and
which manifest digest), then the run's manifest with `artifact_from_manifest`. Every
refusal is a `ServingProblem` naming its field, with a CamelCase reason and what to do.

Each artifact is downloaded by its own init container running the kubetune image:

    kubetune fetch RUN_URI DIR --variant V [--cache-root ROOT]
    kubetune fetch MODEL_URI DIR [--revision REV]        (a base model)

Credentials reach those containers as Secret references only, and only the keys of the
source's scheme: AWS_* for s3://, HF_TOKEN for hf://. The vLLM container gets none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.meta import SecretRef
from kubetune.api.uris import is_local, scheme
from kubetune.api.v1alpha1.modeldeployment import DeploymentLineage, Variant
from kubetune.api.v1alpha1.status import FineTuneJobStatus, RunRecord, RunState
from kubetune.operator.pod import HF_KEYS, S3_KEYS, SecretUse
from kubetune.operator.serving_args import MODELS_DIR
from kubetune.storage.fetch import cache_dir

if TYPE_CHECKING:
    from kubetune.operator.settings import OperatorSettings
    from kubetune.storage.manifest import Manifest

QUANTIZED = frozenset({Variant.W4A16, Variant.W8A8, Variant.FP8})
EVAL_SCORES_LIMIT = 16
FETCH_COMMAND = "kubetune"


ServingReason = Reason
"""ModelDeployment refusals use the contract's catalog: ArtifactNotReady (no servable run
yet, or its files cannot be read), VariantNotAvailable (e.g. W4A16 without
export.quantize), MethodNotServable (prefix and prompt tuning), AdapterIncompatible (DoRA,
modules_to_save, another base model, a rank over the limit)."""


@dataclass(frozen=True)
class ServingProblem:
    """One reason a ModelDeployment cannot be served as specified.

    Attributes:
        field: the spec field to change, e.g. `spec.adapters[1].uri`.
        reason: CamelCase reason for the Ready condition.
        message: what is wrong and what to do.
        waiting: it goes away by itself or once the user creates something (a job still
            training, a FineTuneJob not created yet).
    """

    field: str
    reason: Reason | ServingReason
    message: str
    waiting: bool = False

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_source_uri(field_path: str, uri: str) -> list[ServingProblem]:
    """A RUN_URI the cluster can read (not a local path)."""
    if not is_local(uri):
        return []
    return [
        ServingProblem(
            field_path,
            Reason.LOCAL_URI_IN_CLUSTER,
            f"{uri} is a local path that only your machine can read: upload the run to "
            "s3:// or a PersistentVolumeClaim (pvc://claim/path), or use fineTuneJobRef",
        )
    ]


def check_base_uri(field_path: str, uri: str, settings: OperatorSettings) -> list[ServingProblem]:
    """A base model URI the cluster can fetch: no local path, no random weights unless the
    settings allow them."""
    if is_local(uri):
        return [
            ServingProblem(
                field_path,
                Reason.LOCAL_URI_IN_CLUSTER,
                f"{uri} is a local path that only your machine can read: use hf://, s3:// "
                "or pvc://claim/path",
            )
        ]
    if uri.startswith("builtin://random/") and not settings.allow_builtin_random:
        return [
            ServingProblem(
                field_path,
                Reason.INVALID_SPEC,
                f"{uri} has random weights and the operator settings do not allow it "
                "(allowBuiltinRandom)",
            )
        ]
    return []


def split_revision(uri: str, revision: str | None = None) -> tuple[str, str | None]:
    """A model URI without a trailing slash, and its revision: `revision`, else the
    `@rev` of an hf:// URI."""
    uri = uri.rstrip("/")
    if scheme(uri) == "hf" and "@" in uri:
        uri, _, embedded = uri.partition("@")
        return uri, revision or embedded
    return uri, revision


def same_model(uri: str, revision: str | None, other: str, other_revision: str | None) -> bool:
    """Whether two model references are the same model (revisions compared when both are
    known)."""
    a, a_rev = split_revision(uri, revision)
    b, b_rev = split_revision(other, other_revision)
    return a == b and (a_rev is None or b_rev is None or a_rev == b_rev)


# --- Artifacts -------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    """What vLLM needs to know about a PEFT adapter (from its adapter_config.json)."""

    rank: int | None
    use_dora: bool = False
    has_modules_to_save: bool = False
    peft_type: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AdapterInfo:
        """From the parsed `adapter/adapter_config.json` of a run."""
        rank = config.get("r")
        return cls(
            rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
            use_dora=bool(config.get("use_dora")),
            has_modules_to_save=bool(config.get("modules_to_save")),
            peft_type=str(config["peft_type"]) if config.get("peft_type") else None,
        )


@dataclass(frozen=True)
class ResolvedArtifact:
    """One run's artifact, as the reconciler found it.

    Attributes:
        run_uri: the run's root (holding manifest.json).
        manifest_digest: `sha256:<hex>` of manifest.json; pinned in the pod template.
        variant: the variant to serve (Adapter for adapters of a multi-LoRA deployment).
        variants: the variants the run has (from the manifest's files).
        lineage: the manifest's `lineage` (model, runId, method, dataset, gatePassed …).
        metrics: the manifest's `metrics`.
        gate_passed: whether the run passed its evaluation gate (None: no gate).
        adapter: the adapter's settings, when the run has one.
        max_position_embeddings: the model's context length, if known.
        quantization_method: `quantization_config.quant_method` of the served variant's
            config.json, if known.
        fine_tune_job: the FineTuneJob that made it.
    """

    run_uri: str
    manifest_digest: str
    variant: Variant
    variants: frozenset[Variant]
    lineage: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    gate_passed: bool | None = None
    adapter: AdapterInfo | None = None
    max_position_embeddings: int | None = None
    quantization_method: str | None = None
    fine_tune_job: str | None = None
    digest_known: bool = True
    """False for a RUN_URI source the operator could not read: `manifest_digest` then
    stands for the URI (runs never change once published) and the init container checks
    the gate (`require_gate`)."""
    require_gate: bool = True

    @property
    def method(self) -> str | None:
        """The fine-tuning method (lineage.method)."""
        value = self.lineage.get("method")
        return str(value) if value else None

    @property
    def base_model_uri(self) -> str | None:
        """The base model the run was trained on (lineage.model.uri)."""
        model = self.lineage.get("model")
        return str(model["uri"]) if isinstance(model, Mapping) and model.get("uri") else None

    @property
    def base_model_revision(self) -> str | None:
        """The resolved revision of that base model."""
        model = self.lineage.get("model")
        if isinstance(model, Mapping) and model.get("revision"):
            return str(model["revision"])
        return None

    @property
    def run_id(self) -> str | None:
        """The run id (lineage.runId)."""
        return str(self.lineage["runId"]) if self.lineage.get("runId") else None

    @property
    def dataset_digest(self) -> str | None:
        """sha256 of the run's prepared data."""
        dataset = self.lineage.get("dataset")
        if isinstance(dataset, Mapping) and dataset.get("digest"):
            return str(dataset["digest"])
        return None


def variants_in(paths: Sequence[str]) -> frozenset[Variant]:
    """The variants a run has, from its manifest's file paths."""
    found: set[Variant] = set()
    for path in paths:
        head, _, rest = path.partition("/")
        if head == "adapter":
            found.add(Variant.ADAPTER)
        elif head == "merged":
            found.add(Variant.MERGED)
        elif head == "quantized":
            scheme = rest.split("/", 1)[0]
            found.update(v for v in QUANTIZED if v.value == scheme)
    return frozenset(found)


def _context_length(config: Mapping[str, Any] | None) -> int | None:
    value = (config or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _quant_method(config: Mapping[str, Any] | None) -> str | None:
    quant = (config or {}).get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("quant_method"):
        return str(quant["quant_method"])
    return None


def artifact_from_manifest(
    run_uri: str,
    manifest: Manifest,
    variant: Variant,
    *,
    adapter_config: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    fine_tune_job: str | None = None,
) -> ResolvedArtifact:
    """A ResolvedArtifact from a parsed manifest (and, when read, the run's
    `adapter/adapter_config.json` and the served variant's `config.json`)."""
    gate = manifest.lineage.get("gatePassed", manifest.metrics.get("gatePassed"))
    return ResolvedArtifact(
        run_uri=run_uri,
        manifest_digest=manifest.digest,
        variant=variant,
        variants=variants_in([f.path for f in manifest.files]),
        lineage=dict(manifest.lineage),
        metrics=dict(manifest.metrics),
        gate_passed=gate if isinstance(gate, bool) else None,
        adapter=AdapterInfo.from_config(adapter_config) if adapter_config is not None else None,
        max_position_embeddings=_context_length(model_config),
        quantization_method=_quant_method(model_config),
        fine_tune_job=fine_tune_job or manifest.job_name or None,
    )


def eval_scores(metrics: Mapping[str, Any]) -> dict[str, str] | None:
    """Headline evaluation scores for the status: the tuned model's metrics (or the flat
    numbers of a run record), at most 16, as short decimal strings."""
    tuned = metrics.get("tuned")
    source = tuned if isinstance(tuned, Mapping) else metrics
    scores: dict[str, str] = {}
    for key in sorted(source):
        value = source[key]
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            scores[str(key)[:32]] = f"{value:.6g}"
        elif isinstance(value, str) and value:
            scores[str(key)[:32]] = value[:64]
        if len(scores) == EVAL_SCORES_LIMIT:
            break
    return scores or None


def lineage_of(artifact: ResolvedArtifact) -> DeploymentLineage:
    """Where a served artifact came from, for the status."""
    return DeploymentLineage(
        fine_tune_job=artifact.fine_tune_job,
        run_id=artifact.run_id,
        run_uri=artifact.run_uri,
        dataset_digest=artifact.dataset_digest,
        eval_scores=eval_scores(artifact.metrics),
    )


# --- FineTuneJob references ------------------------------------------------------------


@dataclass(frozen=True)
class JobRun:
    """The run of a FineTuneJob that a reference resolves to."""

    fine_tune_job: str
    run_id: str
    run_uri: str
    manifest_digest: str
    gate_passed: bool | None = None


def _servable(run: RunRecord, require_gate: bool) -> bool:
    if not run.run_uri or not run.manifest_digest:
        return False
    if run.state == RunState.SUCCEEDED:
        return True
    return not require_gate and run.state == RunState.FAILED and run.gate_passed is False


def _job_variants(status: FineTuneJobStatus) -> frozenset[Variant] | None:
    artifacts = status.artifacts
    if artifacts is None:
        return None
    found = {Variant.ADAPTER} if artifacts.adapter else set()
    if artifacts.merged:
        found.add(Variant.MERGED)
    found.update(v for v in QUANTIZED if v.value in (artifacts.quantized or {}))
    return frozenset(found)


def resolve_from_finetunejob(
    ftj_name: str,
    ftj_status: FineTuneJobStatus | None,
    variant: Variant,
    *,
    require_gate: bool = True,
    field_path: str = "spec.model.fineTuneJobRef",
) -> JobRun | ServingProblem:
    """The run a `fineTuneJobRef` serves: the newest succeeded run of `status.runs` (with
    `requireGate: false`, also a run that failed only its evaluation gate), or why none.

    A newer run still training, or one that failed, does not replace a servable older
    run: the deployment keeps serving what passed.
    """
    status = ftj_status or FineTuneJobStatus()
    runs = list(status.runs or ())
    chosen = next((r for r in runs if _servable(r, require_gate)), None)
    if chosen is not None and chosen.run_uri and chosen.manifest_digest:
        available = _job_variants(status) if chosen.run_id == status.run_id else None
        if available is not None and variant not in available:
            have = ", ".join(sorted(v.value for v in available)) or "none"
            return ServingProblem(
                "spec.model.variant" if field_path.startswith("spec.model.") else field_path,
                ServingReason.VARIANT_NOT_AVAILABLE,
                f"run {chosen.run_id} of FineTuneJob {ftj_name} has no {variant.value} "
                f"variant (it has: {have}); choose one of those, or add it to the job's "
                "export (merge: true, quantize: [W4A16, W8A8, FP8])",
            )
        return JobRun(
            ftj_name, chosen.run_id, chosen.run_uri, chosen.manifest_digest, chosen.gate_passed
        )
    gate_failed = next((r for r in runs if r.gate_passed is False and r.manifest_digest), None)
    if gate_failed is not None and require_gate:
        return ServingProblem(
            field_path,
            Reason.EVALUATION_GATE_FAILED,
            f"run {gate_failed.run_id} of FineTuneJob {ftj_name} failed its evaluation gate "
            "and no earlier run passed: improve the job (see its GatePassed condition), or "
            "set spec.requireGate: false to serve it anyway",
        )
    newest = runs[0] if runs else None
    if newest is None:
        stage = status.stage.value if status.stage else "Pending"
        detail = f"it has no run yet (stage {stage})"
    elif newest.state == RunState.RUNNING:
        stage = status.stage.value if status.stage else "Running"
        detail = f"run {newest.run_id} is still running (stage {stage})"
    else:
        detail = f"run {newest.run_id} ended {newest.state.value} (see the job's conditions)"
    return ServingProblem(
        field_path,
        ServingReason.ARTIFACT_NOT_READY,
        f"FineTuneJob {ftj_name} has no servable run: {detail}; the deployment starts when a "
        "run succeeds",
        waiting=True,
    )


def missing_finetunejob(field_path: str, ftj_name: str, namespace: str) -> ServingProblem:
    """The refusal for a `fineTuneJobRef` to a FineTuneJob that does not exist."""
    return ServingProblem(
        field_path,
        Reason.SOURCE_NOT_FOUND,
        f"FineTuneJob {ftj_name} not found in namespace {namespace}: create it, or fix the name",
        waiting=True,
    )


# --- Fetching --------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchStep:
    """One init container of the serving pod: downloads one artifact into `target`.

    Attributes:
        container: the init container's name.
        source: a RUN_URI, or the base model's URI.
        target: the folder in the pod that vLLM reads.
        variant: the run's variant to fetch (None for a base model).
        revision: the base model's revision.
        cache_root: the shared model cache (a PVC) the target lies in.
        credentials: Secret keys the container gets as environment variables.
        digest: the manifest digest the run must have (`--expect-digest`).
        require_gate: whether fetch refuses a run whose gate failed (for RUN_URI sources,
            which the operator cannot read itself).
    """

    container: str
    source: str
    target: str
    variant: Variant | None = None
    revision: str | None = None
    cache_root: str | None = None
    credentials: tuple[SecretUse, ...] = ()
    digest: str | None = None
    require_gate: bool = False

    def args(self) -> list[str]:
        """Arguments of `kubetune` in the init container (see `kubetune fetch --help`): a
        base model is resolved like the trainer resolves it (`--model`); a run's variant
        goes to `target`, or, in the shared cache, to `<cache root>/<sha256 hex>/<variant>`
        (`--cache-root`, which is `target`), pinned to the manifest digest."""
        if self.variant is None:
            args = ["fetch", self.source, self.target, "--model"]
            return args + (["--revision", self.revision] if self.revision else [])
        if self.cache_root:
            args = ["fetch", self.source, "--cache-root", self.cache_root]
        else:
            args = ["fetch", self.source, self.target]
        args += ["--variant", self.variant.value]
        if self.digest:
            args += ["--expect-digest", self.digest]
        if self.require_gate:
            args.append("--require-gate")
        return args

    @property
    def claim(self) -> str | None:
        """The PersistentVolumeClaim of a pvc:// source (mounted read-only)."""
        if scheme(self.source) != "pvc":
            return None
        return self.source.removeprefix("pvc://").split("/", 1)[0]


def secret_env(
    field_path: str,
    ref: SecretRef | None,
    uri: str,
    *,
    all_optional: bool = False,
) -> tuple[SecretUse, ...]:
    """The Secret keys a fetch of `uri` needs: AWS_* for s3://, HF_TOKEN (and HF_ENDPOINT)
    for hf://, nothing for pvc:// and builtin://."""
    if ref is None:
        return ()
    keys = {"s3": S3_KEYS, "hf": HF_KEYS}.get(scheme(uri), ())
    return tuple(
        SecretUse(field_path, ref.name, key, key, all_optional or not required)
        for key, required in keys
    )


def run_target(folder: str, artifact: ResolvedArtifact, cached: bool) -> str:
    """Where a run's variant lies in the pod: `/models/<folder>`, or in the shared cache
    `/models/<manifest digest>/<variant>` (so pods share one download per artifact)."""
    if cached:
        return str(cache_dir(MODELS_DIR, artifact.manifest_digest, artifact.variant))
    return f"{MODELS_DIR}/{folder}"


def base_target(uri: str, revision: str | None, cached: bool) -> str:
    """Where a base model lies in the pod: `/models/base`, or in the shared cache
    `/models/base/<sha256 of uri@revision, 16 hex>`."""
    if not cached:
        return f"{MODELS_DIR}/base"
    key = hashlib.sha256(f"{uri}@{revision or ''}".encode()).hexdigest()[:16]
    return f"{MODELS_DIR}/base/{key}"


def run_fetch(
    container: str,
    artifact: ResolvedArtifact,
    target: str,
    credentials: tuple[SecretUse, ...],
    cached: bool,
) -> FetchStep:
    """The init container that fetches one run's variant."""
    return FetchStep(
        container=container,
        source=artifact.run_uri,
        target=target,
        variant=artifact.variant,
        cache_root=MODELS_DIR if cached else None,
        credentials=credentials,
        digest=artifact.manifest_digest if artifact.digest_known else None,
        require_gate=not artifact.digest_known and artifact.require_gate,
    )


def base_fetch(
    uri: str, revision: str | None, target: str, credentials: tuple[SecretUse, ...]
) -> FetchStep:
    """The init container that fetches the base model of LoRA adapters."""
    return FetchStep(
        container="fetch-base",
        source=uri,
        target=target,
        revision=revision,
        credentials=credentials,
    )
