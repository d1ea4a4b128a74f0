"""What a ModelDeployment serves, resolved from what the operator can see.

The operator holds no storage credentials (DESIGN §8), so it never reads a run's files:

- A `fineTuneJobRef` resolves through the FineTuneJob: its `status.runs` give the newest
  run that succeeded (and passed its gate, unless `requireGate: false`) with its RUN_URI,
  manifest digest and headline metrics; its spec gives the method, the LoRA settings
  (rank, DoRA, modules_to_save) and the variants its export makes. The serving pod's init
  container then fetches exactly that manifest (`--expect-digest`) and verifies every
  file.
- A `uri` (a RUN_URI) is taken as it is: runs never change once published, so the URI
  itself pins the artifact; the init container checks the gate (`--require-gate`) and the
  files. The operator cannot check such an adapter's settings: adapters given by `uri`
  need `spec.vllm.maxLoraRank`, and a shared model cache (keyed by manifest digest) needs
  `fineTuneJobRef` sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from kubetune.api.contract import Reason
from kubetune.api.meta import StorageKind
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.methods import ADAPTER_METHODS, LoRASpec, Method
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, Variant
from kubetune.api.v1alpha1.status import FineTuneJobStatus
from kubetune.operator.serving import Resolution
from kubetune.operator.serving_sources import (
    AdapterInfo,
    JobRun,
    ResolvedArtifact,
    ServingProblem,
    missing_finetunejob,
    resolve_from_finetunejob,
)
from kubetune.operator.status import load_status


def job_variants(ftj: FineTuneJob) -> frozenset[Variant]:
    """The variants a FineTuneJob's runs publish, from its method and export settings."""
    export = ftj.spec.export
    found = set()
    if ftj.spec.method in ADAPTER_METHODS:
        found.add(Variant.ADAPTER)
    if ftj.spec.method == Method.FULL or (export is not None and export.merge):
        found.add(Variant.MERGED)
    for scheme in export.quantize if export is not None else []:
        found.add(Variant(scheme.value))
    return frozenset(found)


def adapter_info(ftj: FineTuneJob) -> AdapterInfo | None:
    """The adapter settings of a FineTuneJob's runs (None for Full fine-tuning)."""
    method = ftj.spec.method
    if method in ADAPTER_METHODS:
        lora = ftj.spec.lora or LoRASpec()
        return AdapterInfo(
            rank=lora.rank,
            use_dora=bool(lora.use_dora),
            has_modules_to_save=bool(lora.modules_to_save),
            peft_type="LORA",
        )
    if method != Method.FULL:
        return AdapterInfo(rank=None, peft_type=method.value)
    return None


def run_metrics(status: FineTuneJobStatus, run_id: str) -> dict[str, str]:
    """The headline metrics of one run: its record in `status.runs`, else the status's own
    when the status describes that run. `status.metrics` belongs to the newest run, so a
    run still training must not take the served run's scores away (that would rewrite the
    Deployment's lineage while it serves the same artifact)."""
    record = next((r for r in status.runs or () if r.run_id == run_id), None)
    if record is not None and record.metrics:
        return dict(record.metrics)
    return dict(status.metrics or {}) if status.run_id == run_id else {}


def artifact_from_job(ftj: FineTuneJob, run: JobRun, variant: Variant) -> ResolvedArtifact:
    """A run of a FineTuneJob as the builders need it."""
    status = ftj.status or FineTuneJobStatus()
    lineage = status.lineage
    dataset_digest = lineage.dataset_digest if lineage else None
    revision = (lineage.model_revision if lineage else None) or ftj.spec.model.revision
    return ResolvedArtifact(
        run_uri=run.run_uri,
        manifest_digest=run.manifest_digest,
        variant=variant,
        variants=job_variants(ftj),
        lineage={
            "model": {"uri": ftj.spec.model.uri, "revision": revision},
            "runId": run.run_id,
            "method": ftj.spec.method.value,
            "dataset": {"digest": dataset_digest} if dataset_digest else {},
            "gatePassed": run.gate_passed,
        },
        metrics=run_metrics(status, run.run_id),
        gate_passed=run.gate_passed,
        adapter=adapter_info(ftj),
        fine_tune_job=ftj.metadata.name,
    )


def artifact_from_uri(
    md: ModelDeployment, uri: str, variant: Variant, rank: int | None
) -> ResolvedArtifact:
    """A RUN_URI taken as it is; the init container verifies it."""
    pinned = "sha256:" + hashlib.sha256(uri.encode()).hexdigest()
    return ResolvedArtifact(
        run_uri=uri,
        manifest_digest=pinned,
        variant=variant,
        variants=frozenset(Variant),
        lineage={"runId": uri.rstrip("/").rsplit("/", 1)[-1]},
        adapter=AdapterInfo(rank=rank, peft_type="LORA") if variant == Variant.ADAPTER else None,
        digest_known=False,
        require_gate=md.spec.require_gate,
    )


def _from_reference(
    md: ModelDeployment,
    finetunejobs: Mapping[tuple[str, str], Mapping[str, Any]],
    name: str,
    variant: Variant,
    field_path: str,
) -> ResolvedArtifact | ServingProblem:
    namespace = md.metadata.namespace or ""
    body = finetunejobs.get((namespace, name))
    if body is None:
        return missing_finetunejob(field_path, name, namespace)
    ftj = FineTuneJob.model_validate(body)
    found = resolve_from_finetunejob(
        name,
        load_status(body.get("status")),
        variant,
        require_gate=md.spec.require_gate,
        field_path=field_path,
    )
    if isinstance(found, ServingProblem):
        return found
    return artifact_from_job(ftj, found, variant)


def resolve(
    md: ModelDeployment, finetunejobs: Mapping[tuple[str, str], Mapping[str, Any]]
) -> Resolution:
    """Every artifact of a ModelDeployment, or the problems that stop it."""
    spec = md.spec
    problems: list[ServingProblem] = []
    cached = spec.model_cache is not None and spec.model_cache.type == StorageKind.PVC
    rank = spec.vllm.max_lora_rank if spec.vllm else None

    def one(ref: Any, uri: str | None, variant: Variant, where: str) -> ResolvedArtifact | None:
        if ref is not None:
            found = _from_reference(md, finetunejobs, ref.name, variant, f"{where}.fineTuneJobRef")
        else:
            assert uri is not None  # the API requires one of them
            if cached:
                problems.append(
                    ServingProblem(
                        "spec.modelCache",
                        Reason.INVALID_SPEC,
                        f"{where}.uri: a shared model cache is keyed by manifest digest, which "
                        "the operator knows only for fineTuneJobRef sources; use "
                        "fineTuneJobRef, or remove modelCache (an emptyDir per pod)",
                    )
                )
                return None
            if variant == Variant.ADAPTER and rank is None:
                problems.append(
                    ServingProblem(
                        "spec.vllm.maxLoraRank",
                        Reason.INVALID_SPEC,
                        f"{where}.uri: the operator does not read runs, so it cannot see this "
                        "adapter's rank: set spec.vllm.maxLoraRank (e.g. 16), or use "
                        "fineTuneJobRef",
                    )
                )
                return None
            found = artifact_from_uri(md, uri, variant, rank)
        if isinstance(found, ServingProblem):
            problems.append(found)
            return None
        return found

    model = None
    if spec.model is not None:
        model = one(spec.model.fine_tune_job_ref, spec.model.uri, spec.model.variant, "spec.model")
    adapters: dict[str, ResolvedArtifact] = {}
    for index, entry in enumerate(spec.adapters):
        found = one(entry.fine_tune_job_ref, entry.uri, Variant.ADAPTER, f"spec.adapters[{index}]")
        if found is not None:
            adapters[entry.name] = found
    return Resolution(model=model, adapters=adapters, problems=tuple(problems))


def referenced_jobs(md: ModelDeployment) -> set[str]:
    """Names of the FineTuneJobs a ModelDeployment serves from (a new run rolls out)."""
    refs = [md.spec.model.fine_tune_job_ref] if md.spec.model else []
    refs += [a.fine_tune_job_ref for a in md.spec.adapters]
    return {ref.name for ref in refs if ref is not None}
