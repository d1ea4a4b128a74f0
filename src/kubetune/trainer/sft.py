"""Supervised fine-tuning through TRL's SFTTrainer (the only module that builds TRL
configs for SFT).

Examples arrive tokenized with assistant-only labels (`tokenize.py`), so TRL leaves the
labels as they are. Checkpoints go to the artifact store after every save (committed,
pruned); a restarted stage resumes from the latest complete one with its optimizer,
scheduler, RNG and data position. SIGTERM triggers a best-effort checkpoint.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import EvaluationSpec
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import PROMPT_LEARNING_METHODS, Method
from kubetune.api.v1alpha1.training import (
    CheckpointSpec,
    Optimizer,
    Packing,
    Schedule,
    TrainingSpec,
)
from kubetune.calc import host
from kubetune.storage import RunLayout, Store
from kubetune.trainer import checkpointing, distributed, faults
from kubetune.trainer.models import Checkpointing, Precisions, TrainingSetupError
from kubetune.trainer.progress import Metrics, StageProgress
from kubetune.trainer.tokenize import tokenize_all

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_OPTIMIZERS = {
    Optimizer.ADAMW: "adamw_torch",
    Optimizer.ADAMW_8BIT: "adamw_bnb_8bit",
    Optimizer.PAGED_ADAMW_8BIT: "paged_adamw_8bit",
    Optimizer.PAGED_ADAMW_32BIT: "paged_adamw_32bit",
    Optimizer.ADAFACTOR: "adafactor",
    Optimizer.SGD: "sgd",
}
TRAIN_LOG = "logs/train.jsonl"
"""The run's training log (JSONL), uploaded with every checkpoint and at the end."""
_SCHEDULES = {Schedule.COSINE: "cosine", Schedule.LINEAR: "linear", Schedule.CONSTANT: "constant"}


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved (best effort)."""

    reason = Reason.PREEMPTED


@dataclass(frozen=True)
class StageResult:
    """What a training stage produced."""

    model: PreTrainedModel
    steps: int
    resumed_from_step: int | None
    metrics: dict[str, Any]
    """Final numbers of the stage (and, for RLHF, its `algorithm`)."""
    log: Path


def optimizer_name(spec: FineTuneJobSpec, cuda: bool) -> str:
    """The Trainer's optim name: Auto is paged 8-bit AdamW for QLoRA on a GPU, else AdamW.
    AdamW on a GPU is torch's fused implementation (one kernel for all parameters: the same
    update as the multi-tensor one, a fraction of the launches)."""
    choice = (spec.training or TrainingSpec()).optimizer
    if choice == Optimizer.AUTO:
        if spec.method == Method.QLORA and cuda:
            return "paged_adamw_8bit"
        choice = Optimizer.ADAMW
    if choice == Optimizer.ADAMW and cuda:
        return "adamw_torch_fused"
    return _OPTIMIZERS[choice]


def packing_enabled(spec: FineTuneJobSpec) -> bool:
    """Packed rows for LoRA, QLoRA and Full; prefix and prompt tuning prepend virtual tokens
    to every sequence, so their rows are never packed."""
    training = spec.training or TrainingSpec()
    return training.packing == Packing.PACKED and spec.method not in PROMPT_LEARNING_METHODS


def _dataset(tokenizer: PreTrainedTokenizerBase, path: Path, cache: Path) -> Any:
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()

    def rows() -> Any:
        with path.open(encoding="utf-8") as handle:
            yield from tokenize_all(tokenizer, (json.loads(line) for line in handle))

    return Dataset.from_generator(rows, cache_dir=str(cache), keep_in_memory=False)


def tracking_integrations(spec: FineTuneJobSpec, tensorboard_dir: Path) -> list[str]:
    """The Trainer integrations `spec.tracking` asks for; event files go to tensorboard_dir
    (published as RUN_URI/tensorboard/). A missing package is refused, not ignored."""
    import importlib.util
    import os

    tracking = spec.tracking
    wanted = []
    if tracking and tracking.tensorboard and tracking.tensorboard.enabled:
        wanted.append(("tensorboard", "tensorboard", "tracking.tensorBoard"))
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir)
    if tracking and tracking.mlflow:
        wanted.append(("mlflow", "mlflow", "tracking.mlflow"))
        os.environ["MLFLOW_TRACKING_URI"] = tracking.mlflow.tracking_uri
        if tracking.mlflow.experiment_name:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = tracking.mlflow.experiment_name
    for _, module, field in wanted:
        if importlib.util.find_spec(module) is None:
            raise TrainingSetupError(
                Reason.INVALID_SPEC,
                f"{field} needs the {module} package in the trainer image; install it or "
                f"remove {field}",
            )
    return [name for name, _, _ in wanted]


def trainer_arguments(
    spec: FineTuneJobSpec,
    training: TrainingSpec,
    output_dir: Path,
    precisions: Precisions,
    *,
    cuda: bool,
    checkpointing: Checkpointing,
    has_validation: bool,
) -> dict[str, Any]:
    """The Trainer arguments every stage shares (schedule, batch, precision, checkpoints,
    logging, tracking), from `training` (spec.training with the stage's overrides)."""
    checkpoint = training.checkpoint or CheckpointSpec()
    warmup: float | int = 0.03
    if training.warmup_steps is not None:
        warmup = training.warmup_steps
    elif training.warmup_ratio is not None:
        warmup = parse_decimal(training.warmup_ratio)
    eval_strategy = "no"
    if has_validation:
        eval_strategy = "steps" if training.eval_every_steps else "epoch"
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": training.epochs or 1,
        "max_steps": training.max_steps or -1,
        "learning_rate": parse_decimal(training.learning_rate),
        "lr_scheduler_type": _SCHEDULES[training.schedule],
        "warmup_steps": warmup,
        "weight_decay": parse_decimal(training.weight_decay),
        "max_grad_norm": parse_decimal(training.max_grad_norm),
        "per_device_train_batch_size": training.batch_size,
        "per_device_eval_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "bf16": precisions.bf16,
        "fp16": precisions.fp16,
        "gradient_checkpointing": checkpointing.enabled,
        "gradient_checkpointing_kwargs": checkpointing.trainer_kwargs(),
        "optim": optimizer_name(spec, cuda),
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_steps": training.log_every_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": checkpoint.every_steps,
        "save_total_limit": 1,
        "eval_strategy": eval_strategy,
        "eval_steps": training.eval_every_steps,
        "report_to": tracking_integrations(spec, output_dir.parent / "tensorboard"),
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "use_cpu": not cuda,
        **distributed.trainer_arguments(
            spec, distributed.topology(), cuda=cuda, bf16=precisions.bf16
        ),
    }


def sft_config(
    spec: FineTuneJobSpec,
    output_dir: Path,
    precisions: Precisions,
    *,
    cuda: bool,
    checkpointing: Checkpointing,
    has_validation: bool,
    training: TrainingSpec | None = None,
) -> Any:
    """TRL's SFTConfig for this spec (`training`: the stage's effective settings)."""
    from trl import SFTConfig  # type: ignore[attr-defined]

    training = training or spec.training or TrainingSpec()
    packed = packing_enabled(spec)
    common = trainer_arguments(
        spec,
        training,
        output_dir,
        precisions,
        cuda=cuda,
        checkpointing=checkpointing,
        has_validation=has_validation,
    )
    return SFTConfig(
        **common,
        max_length=training.max_seq_length,
        packing=packed,
        padding_free=packed,
    )


def commit_checkpoint(
    store: Store,
    layout: RunLayout,
    folder: Path,
    step: int,
    keep: int,
    log_path: Path,
    stage: str,
    log: Callable[[str], None],
) -> None:
    """Upload and commit a checkpoint folder with the training log so far (a restarted pod
    continues the log); every stage checkpoints through here."""
    checkpointing.upload_checkpoint(store, layout, folder, step, keep, stage, log_path=log_path)
    if log_path.is_file():
        store.put_file(log_path, layout.key(TRAIN_LOG))
    faults.reach("checkpoint-committed", step, stage)
    log(f"Checkpoint at step {step}: {layout.uri_for(layout.checkpoint(step))}")


def checkpoint_callback(
    store: Store,
    layout: RunLayout,
    keep: int,
    log_path: Path,
    stage: str,
    log: Callable[[str], None],
) -> Any:
    """A Trainer callback that commits every checkpoint the Trainer saves."""
    from transformers import TrainerCallback

    class CommitCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if not state.is_world_process_zero:  # rank 0 holds the gathered checkpoint
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            commit_checkpoint(store, layout, folder, state.global_step, keep, log_path, stage, log)

    return CommitCheckpoints()


def _callbacks(
    store: Store,
    layout: RunLayout,
    keep: int,
    progress: StageProgress,
    stop: dict[str, bool],
    log: Callable[[str], None],
) -> list[Any]:
    from transformers import TrainerCallback

    from kubetune.trainer.progressbar import RichProgressBar

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            values = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            values["epoch"] = state.epoch or 0
            if "train_loss" in values:  # the Trainer's own counts this process's steps only
                logged = checkpointing.logged_train_loss(state.log_history)
                values["train_loss"] = values["train_loss"] if logged is None else logged
            record = progress.record(state.global_step, values, state.num_input_tokens_seen)
            log(progress.line(record))

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            faults.reach("mid-step", state.global_step + 1, progress.stage)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            faults.reach("step-end", state.global_step, progress.stage)
            if stop["requested"]:
                control.should_save = True
                control.should_training_stop = True

    return [
        checkpoint_callback(store, layout, keep, progress.log_path, progress.stage, log),
        Report(),
        RichProgressBar(progress.stage),
    ]


def train_sft(
    spec: FineTuneJobSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_path: Path,
    validation_path: Path,
    store: Store,
    layout: RunLayout,
    work_dir: Path,
    precisions: Precisions,
    cuda: bool,
    checkpointing_on: Checkpointing,
    metrics: Metrics | None,
    log: Callable[[str], None],
    training: TrainingSpec | None = None,
) -> StageResult:
    """Run (or resume) the SFT stage (`training`: spec.training with the stage's
    overrides)."""
    from trl import SFTTrainer  # type: ignore[attr-defined]

    training = training or spec.training or TrainingSpec()
    keep = (training.checkpoint or CheckpointSpec()).keep
    output_dir = work_dir / "sft"
    train = _dataset(tokenizer, train_path, work_dir / "hf-datasets")
    has_validation = validation_path.stat().st_size > 0
    validation = (
        _dataset(tokenizer, validation_path, work_dir / "hf-datasets") if has_validation else None
    )
    limit = (spec.evaluation or EvaluationSpec()).max_samples
    if validation is not None and len(validation) > limit:
        # The validation loss during training uses the same examples as the evaluation.
        validation = validation.select(range(limit))
    args = sft_config(
        spec,
        output_dir,
        precisions,
        cuda=cuda,
        checkpointing=checkpointing_on,
        has_validation=has_validation,
        training=training,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=None,
    )
    return run_trainer(
        trainer,
        "SFT",
        store=store,
        layout=layout,
        keep=keep,
        work_dir=work_dir,
        cuda=cuda,
        metrics=metrics,
        log=log,
    )


def run_trainer(
    trainer: Any,
    stage: str,
    *,
    store: Store,
    layout: RunLayout,
    keep: int,
    work_dir: Path,
    cuda: bool,
    metrics: Metrics | None,
    log: Callable[[str], None],
) -> StageResult:
    """Train a stage with a TRL/transformers Trainer: our progress display and log lines,
    checkpoints committed to the store (under `layout.checkpoints_dir`), resume from the
    latest complete one, and a best-effort checkpoint on SIGTERM."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    progress = StageProgress(stage, 0, work_dir / "logs" / "train.jsonl", metrics)
    stop = {"requested": False}
    distributed.evaluate_under_autocast(trainer)
    # Replace the default progress display (a tqdm bar, or raw log dicts on stdout when
    # tqdm is disabled) by ours: the rich bar on a terminal and the log lines.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    for callback in _callbacks(store, layout, keep, progress, stop, log):
        trainer.add_callback(callback)
    progress.total_steps = trainer.state.max_steps or _planned_steps(trainer)
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()  # each stage reports its own peak
    else:
        host.reset_peak_resident()
    resume = checkpointing.download_latest(
        store,
        layout,
        work_dir / f"resume-{layout.checkpoints_dir.strip('/').replace('/', '-')}",
        stage,
        log_path=progress.log_path,
    )
    if resume is not None:
        log(f"Resuming {stage} from the checkpoint at step {resume[0]}")
        checkpointing.restore_token_count(trainer, resume[1])
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    try:
        if resume is not None and resume[0] >= progress.total_steps:
            finished = checkpointing.finish_trainer(trainer, resume[1])
        else:
            output = trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
            finished = output.metrics
    finally:
        signal.signal(signal.SIGTERM, previous)
    training_peak = _peak_allocated_gib(cuda)
    topo = distributed.topology()
    if topo.distributed:
        # Gather the sharded weights into rank 0's folder (a collective: every rank calls it);
        # the pipeline reads them back there. The pickled TrainingArguments are not an
        # artifact.
        trainer.save_model(str(work_dir / "trained"))
        if topo.main:
            trainer.processing_class.save_pretrained(str(work_dir / "trained"))
            (work_dir / "trained" / "training_args.bin").unlink(missing_ok=True)
        distributed.forget_deepspeed()
    if stop["requested"]:
        raise Preempted(
            f"stopped by SIGTERM in {stage} at step {trainer.state.global_step} (checkpoint saved)"
        )
    result_metrics = {k: float(v) for k, v in finished.items() if isinstance(v, int | float)}
    train_loss = checkpointing.logged_train_loss(trainer.state.log_history)
    if train_loss is not None:
        result_metrics["train_loss"] = train_loss
    if cuda:
        import torch

        result_metrics["peak_memory_allocated_gib"] = _peak_allocated_gib(cuda)
        result_metrics["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        # The training steps alone, without the final gather of sharded weights into rank 0.
        result_metrics["peak_memory_training_allocated_gib"] = training_peak
        log(
            f"Peak GPU memory: {result_metrics['peak_memory_allocated_gib']:.2f} GiB allocated, "
            f"{result_metrics['peak_memory_reserved_gib']:.2f} GiB reserved"
        )
    elif (resident := host.peak_resident_gib()) is not None:
        # The whole process: the model, the data and the training step.
        result_metrics["peak_memory_resident_gib"] = resident
        log(f"Peak memory: {resident:.2f} GiB resident")
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluations:
        result_metrics.update(
            {k: float(v) for k, v in evaluations[-1].items() if k.startswith("eval_")}
        )
    return StageResult(
        model=trainer.model,
        steps=trainer.state.global_step,
        resumed_from_step=resume[0] if resume else None,
        metrics=result_metrics,
        log=progress.log_path,
    )


def _planned_steps(trainer: Any) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(1, batches // args.gradient_accumulation_steps)
    return int(per_epoch * args.num_train_epochs)


def _peak_allocated_gib(cuda: bool) -> float:
    """The CUDA allocator's peak since the stage began (0 without a GPU)."""
    if not cuda:
        return 0.0
    import torch

    return torch.cuda.max_memory_allocated() / 2**30
