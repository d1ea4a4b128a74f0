"""The recipe: one FineTuneJob run, top to bottom.

validate → resolve the model → prepare data → measure the base model → train the stages →
save and measure the tuned model → judge → gate → merge → quantize → publish the
evaluation files and the report → publish the manifest (last).

Each step skips what the artifact store already holds, so a restarted pod resumes: the
data is not prepared twice, a finished stage is not trained again, and training resumes
from its latest committed checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason, TrainerConfig, TrainerResult
from kubetune.api.v1alpha1.alignment import StageType
from kubetune.api.v1alpha1.evaluation import EvaluationSpec, ExportSpec
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.training import TrainingSpec
from kubetune.storage import ObjectInfo, RunLayout, Store, open_store, spec_hash
from kubetune.storage.manifest import read_manifest, write_manifest
from kubetune.trainer import (
    distributed,
    dpo,
    eval_stage,
    evaluate,
    export,
    export_stage,
    fastpath,
    models,
    stages,
)
from kubetune.trainer.data_stage import (
    EVAL_DATA,
    run_data_stage,
    run_eval_data_stage,
    run_stage_data_stage,
)
from kubetune.trainer.eval_publish import EvalRecord, publish_eval
from kubetune.trainer.fastpath import kernels
from kubetune.trainer.progress import Metrics
from kubetune.trainer.resolve import ResolvedModel, resolve_model
from kubetune.trainer.reward_stage import REWARD_MODEL_DIR
from kubetune.trainer.sft import TRAIN_LOG, packing_enabled
from kubetune.trainer.stages import StageData

if TYPE_CHECKING:
    from kubetune.calc.architectures import Architecture
    from kubetune.calc.memory import TrainingSetup

Log = Callable[[str], None]


class PipelineError(Exception):
    """A run that cannot proceed as specified; carries the contract reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_supported(spec: FineTuneJobSpec) -> None:
    """Refuse, before any work, what this version of the trainer cannot do."""
    stages.check_stages(spec)
    kernels.check_compile((spec.training or TrainingSpec()).fast_paths)


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
    """Every file under `folder`, as `relative/<path>`; a symbolic link that leads out of
    the folder is refused (it would publish a file the run did not make)."""
    from kubetune.storage.errors import InvalidKey

    root = folder.resolve()
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and root not in path.resolve().parents:
            raise InvalidKey(f"{path} links outside {folder}; refusing to publish it")
        if path.is_file():
            files.append(path)
    return [
        store.put_file(path, layout.key(relative + path.relative_to(folder).as_posix()))
        for path in files
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
    """Run (or resume) the whole job; returns the result for the termination message.
    With `metrics_port`, progress and the current pipeline step are served for Prometheus
    and the operator for the whole run."""
    # Only rank 0 serves them: it is the process whose progress and phase the run reports.
    gauges = Metrics(metrics_port) if metrics_port and distributed.topology().main else None
    try:
        return _run_pipeline(config, work_dir=work_dir, log=log, gauges=gauges)
    finally:
        if gauges is not None:
            gauges.close()


def _phase(gauges: Metrics | None, phase: str) -> None:
    if gauges is not None:
        gauges.set_phase(phase)


def _run_pipeline(
    config: TrainerConfig, *, work_dir: Path, log: Log, gauges: Metrics | None
) -> TrainerResult:
    import torch

    spec = config.spec
    check_supported(spec)
    cuda = torch.cuda.is_available()
    topo = distributed.topology()
    distributed.check(spec, topo, cuda=cuda)
    layout = _layout(config)
    store = distributed.store_for(_open(config, layout), topo)
    if store.exists(layout.key(layout.MANIFEST)):
        log(f"Run already complete: {layout.run_uri}")
        return _result_from_manifest(store, layout)
    distributed.start(topo, cuda=cuda)
    work_dir = topo.work_dir(work_dir)
    if not topo.main:
        log = _silent  # rank 0 tells the story; the other ranks' failures come as results
    log(f"Run {layout.run_uri}" + (f" ({topo.describe()})" if topo.distributed else ""))
    _phase(gauges, "Preparing")
    with distributed.main_first(topo):  # rank 0 converts, prepares and publishes the data
        resolved = resolve_model(spec.model, allow_builtin_random=config.allow_builtin_random)
        _check_export(spec, resolved)
        tokenizer = models.tokenizer_for(resolved, spec)
        data = run_data_stage(
            spec, layout, store, tokenizer_dir=resolved.path, work_dir=work_dir, log=log
        )
        has_eval_set = run_eval_data_stage(
            spec, layout, store, tokenizer_dir=resolved.path, work_dir=work_dir, log=log
        )
        stage_data = _stage_data(spec, layout, store, resolved.path, data.report, work_dir, log)
    train_path = _local_copy(store, layout, layout.DATA_TRAIN, work_dir / "run")
    val_path = _local_copy(store, layout, layout.DATA_VAL, work_dir / "run")
    eval_path = _local_copy(store, layout, EVAL_DATA, work_dir / "run") if has_eval_set else None
    evaluation = spec.evaluation or EvaluationSpec()
    inputs = eval_stage.prepare_inputs(evaluation, val_path, eval_path, work_dir, log)

    training = spec.training or TrainingSpec()
    fused = kernels.fused_kernels_choice(
        training.fast_paths, cuda, resolved.config.get("model_type")
    )
    attention = fastpath.choose_attention(
        training.fast_paths, cuda, packing_enabled(spec), model_config=resolved.config
    )
    data_tokens = _data_tokens(spec, stage_data, attention.name)
    planned = _preflight(spec, resolved, cuda, fused.enabled, data_tokens, attention.name, log)
    precisions = models.choose_precision(
        training, spec.method, cuda, cuda and torch.cuda.is_bf16_supported()
    )
    torch.manual_seed(training.seed)
    log(f"Attention: {attention.name} ({attention.reason})")
    lean = kernels.lean_adapters_choice(training.fast_paths, precisions.bf16 or precisions.fp16)
    model = models.load_base_model(
        spec, resolved, precisions, training.seed, work_dir, attn_implementation=attention.name
    )
    log(f"Fused kernels: {'on' if fused.enabled else 'off'} ({fused.reason})")
    if fused.enabled:
        kernels.apply_fused_kernels(model)
    base = None
    if topo.main:
        base = eval_stage.base_scores(
            store, layout, model, tokenizer, inputs, evaluation, training.batch_size, log
        )

    models.undo_cpu_inference_packing(model)
    checkpointing = models.gradient_checkpointing(spec, cuda, planned)
    log(f"Gradient checkpointing: {checkpointing.describe()}")
    if checkpointing.enabled and cuda:
        log(f"Activation offload: {checkpointing.describe_offload()}")
    model = models.prepare_model(spec, model, str(resolved.path), checkpointing=checkpointing)
    fuse_update = not distributed.shards_parameters(spec)
    if lean.enabled and kernels.apply_lean_adapters(model, fuse_update=fuse_update):
        update = " and add their update inside the low-rank GEMM" if fuse_update else ""
        log(f"Lean adapters: LoRA layers skip the fp32 input cast{update} ({lean.reason})")
    trainable, total = models.trainable_parameters(model)
    log(f"Training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f} %)")
    _continue_log(store, layout, work_dir)
    _phase(gauges, "Training")
    stage = stages.run_stages(
        spec,
        model,
        tokenizer,
        stage_data,
        resolved=resolved,
        store=store,
        layout=layout,
        work_dir=work_dir,
        precisions=precisions,
        cuda=cuda,
        checkpointing_on=checkpointing,
        metrics=gauges,
        max_validation=evaluation.max_samples,
        log=log,
    )
    if topo.distributed:
        # The weights are sharded across the processes: the stage gathered them into rank
        # 0's folder. The other ranks are done; rank 0 reads the weights back and goes on.
        trained_dir = work_dir / "trained"
        distributed.barrier(topo)
        distributed.finish(topo)
        if not topo.main:
            return _worker_result(topo, layout, stage.steps)
        model = stage.model = None  # type: ignore[assignment]
        _free_accelerator_memory()
        stage.model = models.load_trained(
            spec, resolved, trained_dir, precisions, training.seed, work_dir, attention.name
        )
    else:
        trained_dir = export.save_trained(spec, stage.model, tokenizer, work_dir / "trained")
    assert base is not None  # rank 0 (or the only process) measured the base model
    files = _upload_folder(store, layout, trained_dir, export.trained_folder_name(spec) + "/")
    _phase(gauges, "Evaluating")
    log("Evaluating the tuned model")
    tuned = eval_stage.score_model(
        stage.model, tokenizer, inputs, evaluation, training.batch_size, log
    )
    judged = eval_stage.run_judge(evaluation, inputs, base, tuned, log)
    gate = evaluate.check_gate(evaluation.gate, tuned.metrics, base.metrics)
    for outcome in gate:
        log(f"Gate: {outcome.describe()}")
    gate_passed = all(o.passed for o in gate) if gate else None
    steps, resumed_from, stage_records = stage.steps, stage.resumed_from_step, stage.stages
    training_metrics = stage_records[-1]["metrics"] if stage_records else {}
    train_log = stage.log or work_dir / "logs" / "train.jsonl"
    del model, stage  # the export stage loads what it needs; free the training copy
    _free_accelerator_memory()

    _phase(gauges, "Exporting")
    exported = export_stage.run_export(
        spec,
        resolved,
        trained_dir,
        tokenizer,
        work_dir=work_dir,
        dtype_name="bfloat16" if precisions.bf16 else "float32",
        calibration=evaluate.load_examples(
            train_path, (spec.export or ExportSpec()).calibration_samples
        ),
        examples=inputs.examples,
        adapter_perplexity=tuned.metrics.get("Perplexity"),
        log=log,
    )
    for folder, prefix in exported.folders:
        files += _upload_folder(store, layout, folder, prefix)
    summary: dict[str, Any] = {
        "base": base.metrics,
        "tuned": tuned.metrics,
        "delta": _delta(base.metrics, tuned.metrics),
        "training": training_metrics,
        "stages": stage_records,
    }
    if exported.quantized:
        summary["quantized"] = exported.quantized
        summary["merged"] = exported.merged
    lineage = _lineage(spec, resolved, layout, data.report, steps, gate_passed)
    now = datetime.now(timezone.utc)
    _phase(gauges, "Publishing")
    files += publish_eval(
        store,
        layout,
        work_dir,
        EvalRecord(inputs, base, tuned, gate, judged, exported, lineage, evaluation),
        {
            "logs/train.jsonl": train_log,
            layout.DATA_TRAIN: train_path,
            layout.DATA_VAL: val_path,
            layout.DATA_REPORT: _local_copy(store, layout, layout.DATA_REPORT, work_dir / "run"),
        },
        uploaded=files,
        created_at=now,
        stages=stage_records,
    )
    if (work_dir / "tensorboard").is_dir():
        files += _upload_folder(store, layout, work_dir / "tensorboard", "tensorboard/")
    manifest = write_manifest(
        store,
        layout,
        files + store.list(layout.key("data/")) + store.list(layout.key(REWARD_MODEL_DIR)),
        lineage=lineage,
        metrics=summary,
        created_at=now,
    )
    log(f"Published {layout.run_uri}/manifest.json ({manifest.digest})")
    return TrainerResult(
        reason=Reason.EVALUATION_GATE_FAILED if gate_passed is False else Reason.SUCCEEDED,
        message="; ".join(o.describe() for o in gate if not o.passed)[:1024],
        run_uri=layout.run_uri,
        manifest_digest=manifest.digest,
        gate_passed=gate_passed,
        metrics=_headline(summary),
        step=steps,
        resumed_from_step=resumed_from,
    )


def _silent(_: str) -> None:
    pass


def _worker_result(topo: distributed.Topology, layout: RunLayout, steps: int) -> TrainerResult:
    """What a rank other than 0 reports: its share of the training is done."""
    return TrainerResult(
        reason=Reason.SUCCEEDED,
        message=f"{topo.describe()} finished training; rank 0 publishes the run",
        run_uri=layout.run_uri,
        step=steps,
    )


def _stage_data(
    spec: FineTuneJobSpec,
    layout: RunLayout,
    store: Store,
    tokenizer_dir: Path,
    main_report: dict[str, Any],
    work_dir: Path,
    log: Log,
) -> list[StageData]:
    """Each stage's data: its own dataset (prepared under data/<i>-<type>/) or spec.dataset;
    refused before training when its kind does not fit the stage."""
    out = []
    for index, stage in enumerate(spec.stages):
        train_key, val_key, report = layout.DATA_TRAIN, layout.DATA_VAL, main_report
        if stage.dataset is not None:
            name = stages.stage_name(index, stage)
            train_key, val_key, report = run_stage_data_stage(
                spec,
                index,
                name,
                layout,
                store,
                tokenizer_dir=tokenizer_dir,
                work_dir=work_dir,
                log=log,
            )
        family = str(report.get("family", ""))
        stages.check_family(index, stage, family, layout.uri_for(train_key))
        out.append(
            StageData(
                _local_copy(store, layout, train_key, work_dir / "run"),
                _local_copy(store, layout, val_key, work_dir / "run"),
                family,
            )
        )
    return out


def _continue_log(store: Store, layout: RunLayout, work_dir: Path) -> None:
    """A restarted run continues the training log its checkpoints carried."""
    key = layout.key(TRAIN_LOG)
    if store.exists(key):
        target = work_dir / TRAIN_LOG
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, target)


def _delta(base: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    return {k: tuned[k] - base[k] for k in tuned if k in base}


def _lineage(
    spec: FineTuneJobSpec,
    resolved: ResolvedModel,
    layout: RunLayout,
    data_report: dict[str, Any],
    steps: int,
    gate_passed: bool | None,
) -> dict[str, Any]:
    """Where the model came from: base model and revision, data digest, spec hash."""
    return {
        "model": {"uri": resolved.uri, "revision": resolved.revision},
        "runId": layout.run_id,
        "specHash": spec_hash(spec),
        "method": spec.method.value,
        "dataset": {"uri": spec.dataset.uri, "digest": data_report.get("digest")},
        "stages": [s.type.value for s in spec.stages],
        "steps": steps,
        "gatePassed": gate_passed,
        "kubetuneVersion": _version(),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubetune")
    except PackageNotFoundError:
        return "unknown"


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_export(spec: FineTuneJobSpec, resolved: ResolvedModel) -> None:
    """Refuse, before training, quantized variants this trainer or model cannot make."""
    exported = spec.export or ExportSpec()
    if exported.quantize:
        from kubetune.trainer.quantize import check_quantize_spec

        check_quantize_spec(exported, resolved.path)


def _data_tokens(
    spec: FineTuneJobSpec, stage_data: list[StageData], attention: str
) -> dict[int, int]:
    """For each DPO stage, the most tokens one of its micro-batches holds in the prepared
    data (the data stage counted every sequence); packed when DPO batches will be packed
    (`dpo.packed_batches`), else padded to the batch's longest sequence."""
    from kubetune.calc import preference_batch_tokens
    from kubetune.trainer.fastpath import ATTENTION_NAME

    packed = packing_enabled(spec) and attention in (ATTENTION_NAME, "sdpa")
    out = {}
    for index, (stage, data) in enumerate(zip(spec.stages, stage_data, strict=True)):
        if stage.type != StageType.DPO:
            continue
        training = stages.stage_training(spec, stage)
        pairs = dpo.pair_token_counts(data.train)
        if pairs is None:
            continue
        bound = preference_batch_tokens(
            pairs, training.batch_size, training.max_seq_length, packed=packed
        )
        if bound is not None:
            out[index] = bound
    return out


def _preflight(
    spec: FineTuneJobSpec,
    resolved: ResolvedModel,
    cuda: bool,
    fused_kernels: bool,
    data_tokens: dict[int, int],
    attention_name: str,
    log: Log,
) -> TrainingSetup | None:
    """Refuse a job whose estimate exceeds the GPU (or, on a CPU, the memory the process may
    still take) before any weights are loaded; returns the calculator's plan (gradient
    checkpointing for Auto), None without one. `data_tokens` (`_data_tokens`) sizes the DPO
    stages by their data."""
    import torch

    from kubetune.calc import ArchitectureError, load_architecture, preflight

    try:
        arch = load_architecture(str(resolved.path))
    except ArchitectureError as exc:
        log(f"Memory preflight skipped: {exc}")
        return None
    if not cuda:
        return _host_preflight(spec, arch, data_tokens, attention_name, log)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    verdict = preflight(
        spec,
        arch,
        memory_gib,
        torch.cuda.device_count(),
        fused_kernels=fused_kernels,
        data_tokens=data_tokens,
    )
    sized = verdict.setup.data_tokens
    by_data = (
        f" ({verdict.stage}: micro-batches of at most {sized:,} tokens in its data)"
        if sized is not None
        else ""
    )
    log(f"Memory estimate: {verdict.needed_gib:.1f} GiB per GPU of {memory_gib:.1f} GiB{by_data}")
    if verdict.fits is False:
        raise PipelineError(Reason.INSUFFICIENT_GPU_MEMORY, verdict.advice)
    if verdict.estimate.host_offload_gib:  # the plan offloads checkpointed layer inputs
        _check_offload_memory(verdict.estimate.host_offload_gib, log)
    return verdict.setup


def _host_share() -> tuple[float | None, str]:
    """This process's share of the host memory still available (None when it cannot be
    read), and what bounds it; the trainer processes on one machine share it equally."""
    from kubetune.calc import host

    try:
        memory = host.memory_budget()
    except ValueError as exc:
        raise PipelineError(Reason.INVALID_SPEC, str(exc)) from exc
    processes = distributed.topology().local_world_size
    share = memory.available_gib / processes if memory else None
    source = memory.source if memory else "this machine"
    if processes > 1:
        source += f", shared by {processes} processes"
    return share, source


def _check_offload_memory(needed_gib: float, log: Log) -> None:
    """Activation offload keeps the checkpointed layers' inputs in pinned host memory,
    which the container's memory limit counts: refuse the run before training when it
    cannot hold them."""
    share, source = _host_share()
    if share is None:
        log(f"Host memory for activation offload: ~{needed_gib:.1f} GiB; available unknown")
        return
    log(
        f"Host memory for activation offload: ~{needed_gib:.1f} GiB, of {share:.1f} GiB "
        f"available ({source})"
    )
    if needed_gib > share:
        raise PipelineError(
            Reason.INSUFFICIENT_MEMORY,
            f"activation offload needs ~{needed_gib:.1f} GiB of host memory, {share:.1f} GiB "
            f"available ({source}): raise resources.memory, or set "
            "training.activationOffload to Disabled with a smaller training.batchSize or "
            "training.maxSeqLength",
        )


def _host_preflight(
    spec: FineTuneJobSpec,
    arch: Architecture,
    data_tokens: dict[int, int],
    attention_name: str,
    log: Log,
) -> TrainingSetup | None:
    """The CPU run's check: what training adds to this process against what the machine
    (or the container's memory limit) has available, shared equally by the trainer
    processes on it; the OOM killer gives no message."""
    from kubetune.calc import host
    from kubetune.calc.preflight import host_preflight

    share, source = _host_share()
    verdict = host_preflight(
        spec,
        arch,
        share,
        # Eager attention keeps its score matrices; SDPA's CPU kernels do not (measured:
        # 1 x 2048 and 2 x 1024 tokens peak alike).
        dense_attention=attention_name == "eager",
        data_tokens=data_tokens,
        source=source,
    )
    held = host.resident_gib()
    holds = f" (this process holds {held:.1f} GiB)" if held is not None else ""
    if share is None:
        log(f"Memory estimate: {verdict.needed_gib:.1f} GiB more{holds}; available unknown")
        return None
    log(
        f"Memory estimate: {verdict.needed_gib:.1f} GiB more{holds}, of "
        f"{share:.1f} GiB available ({source})"
    )
    if verdict.fits is False:
        raise PipelineError(Reason.INSUFFICIENT_MEMORY, verdict.advice)
    return verdict.setup
