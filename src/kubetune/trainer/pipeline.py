"""The recipe: one FineTuneJob run, top to bottom.

validate → resolve the model → prepare data → measure the base model → train the stages →
save and measure the tuned model → gate → merge → publish the manifest (last).

Each step skips what the artifact store already holds, so a restarted pod resumes: the
data is not prepared twice, a finished stage is not trained again, and training resumes
from its latest committed checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason, TrainerConfig, TrainerResult
from kubetune.api.v1alpha1.alignment import StageType
from kubetune.api.v1alpha1.evaluation import EvaluationSpec
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.training import TrainingSpec
from kubetune.storage import ObjectInfo, RunLayout, Store, open_store
from kubetune.storage.manifest import read_manifest, write_manifest
from kubetune.trainer import evaluate, export, models
from kubetune.trainer.data_stage import run_data_stage
from kubetune.trainer.progress import Metrics
from kubetune.trainer.resolve import ResolvedModel, resolve_model
from kubetune.trainer.sft import train_sft

Log = Callable[[str], None]
SUPPORTED_STAGES = (StageType.SFT,)


class PipelineError(Exception):
    """A run that cannot proceed as specified; carries the contract reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_supported(spec: FineTuneJobSpec) -> None:
    """Refuse, before any work, what this version of the trainer cannot do."""
    unsupported = [s.type.value for s in spec.stages if s.type not in SUPPORTED_STAGES]
    if unsupported:
        raise PipelineError(
            Reason.INVALID_SPEC,
            f"stage(s) {', '.join(unsupported)} are not available in this version of the "
            "trainer (available: SFT)",
        )
    evaluate.check_metrics_available(spec.evaluation or EvaluationSpec())
    export.check_export_available(spec)


def _layout(config: TrainerConfig) -> RunLayout:
    run = config.run
    return RunLayout(run.output_uri, run.namespace, run.job_name, run.run_id)


def _open(config: TrainerConfig, layout: RunLayout) -> Store:
    output = config.spec.output
    return open_store(
        layout.output_uri,
        endpoint_url=output.endpoint if output else None,
        region=output.region if output else None,
    )


def _local_copy(store: Store, layout: RunLayout, relative: str, into: Path) -> Path:
    target = into / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(layout.key(relative), target)
    return target


def _upload_folder(
    store: Store, layout: RunLayout, folder: Path, relative: str
) -> list[ObjectInfo]:
    return [
        store.put_file(path, layout.key(relative + path.relative_to(folder).as_posix()))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def _result_from_manifest(store: Store, layout: RunLayout) -> TrainerResult:
    manifest = read_manifest(store, layout)
    gate = manifest.lineage.get("gatePassed")
    return TrainerResult(
        reason=Reason.EVALUATION_GATE_FAILED if gate is False else Reason.SUCCEEDED,
        message="the run was already complete",
        run_uri=layout.run_uri,
        manifest_digest=manifest.digest,
        gate_passed=gate,
        metrics=_headline(manifest.metrics),
    )


def _headline(metrics: dict[str, Any]) -> dict[str, str]:
    tuned = metrics.get("tuned", {}) if isinstance(metrics.get("tuned"), dict) else {}
    return {
        k[:32]: f"{v:.6g}"[:24] for k, v in list(tuned.items())[:16] if isinstance(v, float | int)
    }


def run_pipeline(
    config: TrainerConfig, *, work_dir: Path, log: Log, metrics_port: int = 0
) -> TrainerResult:
    """Run (or resume) the whole job; returns the result for the termination message."""
    import torch

    spec = config.spec
    check_supported(spec)
    layout = _layout(config)
    store = _open(config, layout)
    if store.exists(layout.key(layout.MANIFEST)):
        log(f"Run already complete: {layout.run_uri}")
        return _result_from_manifest(store, layout)
    log(f"Run {layout.run_uri}")
    resolved = resolve_model(spec.model, allow_builtin_random=config.allow_builtin_random)
    tokenizer = models.tokenizer_for(resolved, spec)
    run_data_stage(spec, layout, store, tokenizer_dir=resolved.path, work_dir=work_dir, log=log)
    train_path = _local_copy(store, layout, layout.DATA_TRAIN, work_dir / "run")
    val_path = _local_copy(store, layout, layout.DATA_VAL, work_dir / "run")

    cuda = torch.cuda.is_available()
    _preflight(spec, resolved, cuda, log)
    training = spec.training or TrainingSpec()
    precisions = models.choose_precision(
        training, spec.method, cuda, cuda and torch.cuda.is_bf16_supported()
    )
    torch.manual_seed(training.seed)
    model = models.load_base_model(spec, resolved, precisions, training.seed, work_dir)
    evaluation = spec.evaluation or EvaluationSpec()
    examples = evaluate.load_examples(val_path, evaluation.max_samples)
    base = _base_scores(store, layout, model, tokenizer, examples, evaluation, training, log)

    models.undo_cpu_inference_packing(model)
    checkpointing = models.gradient_checkpointing(spec, cuda)
    model = models.prepare_model(spec, model, str(resolved.path), checkpointing=checkpointing)
    trainable, total = models.trainable_parameters(model)
    log(f"Training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f} %)")
    gauges = Metrics(metrics_port) if metrics_port else None
    try:
        stage = train_sft(
            spec,
            model,
            tokenizer,
            train_path=train_path,
            validation_path=val_path,
            store=store,
            layout=layout,
            work_dir=work_dir,
            precisions=precisions,
            cuda=cuda,
            checkpointing_on=checkpointing,
            metrics=gauges,
            log=log,
        )
    finally:
        if gauges is not None:
            gauges.close()
    files = _upload_folder(
        store,
        layout,
        export.save_trained(spec, stage.model, tokenizer, work_dir / "trained"),
        export.trained_folder_name(spec) + "/",
    )
    log("Evaluating the tuned model")
    tuned = evaluate.score_model(
        stage.model, tokenizer, examples, evaluation, training.batch_size, log
    )
    gate = evaluate.check_gate(evaluation.gate, tuned.metrics, base.metrics)
    for outcome in gate:
        log(f"Gate: {outcome.describe()}")
    gate_passed = all(o.passed for o in gate) if gate else None
    if export.needs_merge(spec):
        log("Merging the adapter into the base weights")
        merged = export.merge_adapter(
            resolved,
            work_dir / "trained",
            tokenizer,
            work_dir / "merged",
            "bfloat16" if precisions.bf16 else "float32",
            training.seed,
        )
        files += _upload_folder(store, layout, merged, "merged/")
    files += _publish_eval(store, layout, work_dir, examples, base, tuned, gate, stage.log)
    if (work_dir / "tensorboard").is_dir():
        files += _upload_folder(store, layout, work_dir / "tensorboard", "tensorboard/")
    summary = {
        "base": base.metrics,
        "tuned": tuned.metrics,
        "delta": {
            k: tuned.metrics[k] - base.metrics[k] for k in tuned.metrics if k in base.metrics
        },
        "training": stage.metrics,
    }
    manifest = write_manifest(
        store,
        layout,
        files + [o for o in store.list(layout.key("data/"))],
        lineage={
            "model": {"uri": resolved.uri, "revision": resolved.revision},
            "runId": layout.run_id,
            "stages": [s.type.value for s in spec.stages],
            "steps": stage.steps,
            "gatePassed": gate_passed,
        },
        metrics=summary,
    )
    log(f"Published {layout.run_uri}/manifest.json ({manifest.digest})")
    return TrainerResult(
        reason=Reason.EVALUATION_GATE_FAILED if gate_passed is False else Reason.SUCCEEDED,
        message="; ".join(o.describe() for o in gate if not o.passed)[:1024],
        run_uri=layout.run_uri,
        manifest_digest=manifest.digest,
        gate_passed=gate_passed,
        metrics=_headline(summary),
        step=stage.steps,
        resumed_from_step=stage.resumed_from_step,
    )


def _preflight(spec: FineTuneJobSpec, resolved: ResolvedModel, cuda: bool, log: Log) -> None:
    """Refuse a job whose estimate exceeds the GPU before any weights are loaded."""
    import torch

    from kubetune.calc import ArchitectureError, load_architecture, preflight

    if not cuda:
        return
    try:
        arch = load_architecture(str(resolved.path))
    except ArchitectureError as exc:
        log(f"Memory preflight skipped: {exc}")
        return
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    verdict = preflight(spec, arch, memory_gib, torch.cuda.device_count())
    log(f"Memory estimate: {verdict.needed_gib:.1f} GiB per GPU of {memory_gib:.1f} GiB")
    if verdict.fits is False:
        raise PipelineError(Reason.INSUFFICIENT_GPU_MEMORY, verdict.advice)


def _base_scores(
    store: Store,
    layout: RunLayout,
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    evaluation: EvaluationSpec,
    training: TrainingSpec,
    log: Log,
) -> evaluate.ModelScores:
    """The base model's scores, measured once per run (kept in eval/base.json)."""
    key = layout.key("eval/base.json")
    if store.exists(key):
        saved = json.loads(store.get_bytes(key))
        return evaluate.ModelScores(saved["metrics"], saved["answers"])
    if not evaluation.compare_base:
        return evaluate.ModelScores()
    log("Evaluating the base model")
    scores = evaluate.score_model(model, tokenizer, examples, evaluation, training.batch_size, log)
    document = {"metrics": scores.metrics, "answers": scores.answers}
    store.put_bytes(json.dumps(document).encode(), key)
    return scores


def _publish_eval(
    store: Store,
    layout: RunLayout,
    work_dir: Path,
    examples: list[dict[str, Any]],
    base: evaluate.ModelScores,
    tuned: evaluate.ModelScores,
    gate: list[evaluate.GateOutcome],
    train_log: Path,
) -> list[ObjectInfo]:
    folder = work_dir / "eval"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    conversations = [e for e in examples if "messages" in e]
    with (folder / "samples.jsonl").open("w", encoding="utf-8") as handle:
        for index, example in enumerate(conversations):
            record = {
                "id": example["id"],
                "prompt": example["messages"][:-1],
                "reference": example["messages"][-1]["content"],
                "base": base.answers[index] if index < len(base.answers) else None,
                "tuned": tuned.answers[index] if index < len(tuned.answers) else None,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics = {
        "base": base.metrics,
        "tuned": tuned.metrics,
        "delta": {
            k: tuned.metrics[k] - base.metrics[k] for k in tuned.metrics if k in base.metrics
        },
        "gate": [
            {
                "rule": o.rule.model_dump(by_alias=True, mode="json"),
                "value": o.value,
                "passed": o.passed,
            }
            for o in gate
        ],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    infos = [
        store.put_file(folder / name, layout.key(f"eval/{name}"))
        for name in ("samples.jsonl", "metrics.json")
    ]
    infos.append(store.put_file(train_log, layout.key("logs/train.jsonl")))
    base_info = [o for o in store.list(layout.key("eval/base.json"))]
    return infos + base_info
