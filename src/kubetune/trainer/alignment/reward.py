"""The RewardModel stage: a scalar reward head trained on preference pairs with TRL's
RewardTrainer (the only module that builds TRL configs for it).

The model is the previous stage's causal LM loaded as a sequence-classification model with
one output (a new `score` head on the last token's hidden state). Training minimizes the
pairwise loss −log σ(r(prompt + chosen) − r(prompt + rejected)), plus
`centerRewardsCoefficient` · mean(r²) when set, which keeps rewards near zero. A share of
the pairs (`evalFraction`, chosen by a seeded hash of each row's id, so the same rows are
held out on every run and every restart) measures pairwise accuracy — the fraction of pairs
whose chosen answer gets the higher reward — before and after training.

Pairs are tokenized once, before training, with `reward_scoring.encode` — the function
`RewardScorer` uses for the RLHF stage's (prompt, completion) pairs — so the reward seen in
RLHF is the reward that was trained. The saved folder is a plain
`AutoModelForSequenceClassification` (LoRA merged), safetensors only, with its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import RewardModelSpec
from kubetune.api.v1alpha1.methods import LoRASpec, Method
from kubetune.api.v1alpha1.training import CheckpointSpec, Optimizer, Toggle, TrainingSpec
from kubetune.trainer.alignment.reward_scoring import (
    PairMetrics,
    RewardScorer,
    encode,
    pair_metrics,
    score_ids,
)
from kubetune.trainer.checkpointing import finish_trainer
from kubetune.trainer.models import Precisions, TrainingSetupError, choose_precision
from kubetune.trainer.progress import Metrics, StageProgress
from kubetune.trainer.sft import _OPTIMIZERS, _SCHEDULES, Preempted

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PairMetrics",
    "RewardResult",
    "RewardScorer",
    "held_out_count",
    "pair_metrics",
    "split_pairs",
    "train_reward_model",
]

STAGE = "RewardModel"


@dataclass(frozen=True)
class RewardResult:
    """What the RewardModel stage produced."""

    folder: Path
    """The saved reward model (sequence classification, one label) with its tokenizer."""

    before: PairMetrics | None
    """Held-out metrics of the untrained head (None when evalFraction holds out nothing)."""

    after: PairMetrics | None
    """Held-out metrics of the saved model."""

    steps: int
    train_pairs: int
    dropped_too_long: int
    """Pairs left out because chosen or rejected exceeds training.maxSeqLength."""

    resumed_from_step: int | None = None
    log_records: list[dict[str, Any]] = field(default_factory=list)
    """The per-step records also written to the JSONL log."""

    def metrics(self) -> dict[str, float]:
        """Flat metrics for the stage status and the run manifest."""
        values: dict[str, float] = {"train_pairs": self.train_pairs, "steps": self.steps}
        for prefix, result in (("before", self.before), ("after", self.after)):
            if result is not None:
                values[f"eval_accuracy_{prefix}"] = result.accuracy
                values[f"eval_margin_{prefix}"] = result.mean_margin
        return values


def held_out_count(total: int, eval_fraction: float) -> int:
    """How many of `total` pairs are held out: the fraction rounded half up, at least one
    when the fraction is positive, and always leaving one pair to train on."""
    if eval_fraction <= 0 or total < 2:
        return 0
    return min(total - 1, max(1, math.floor(total * eval_fraction + 0.5)))


def _split_key(row: dict[str, Any], seed: int) -> tuple[str, str]:
    content = json.dumps([row.get("prompt"), row.get("chosen"), row.get("rejected")])
    identity = str(row["id"]) if row.get("id") is not None else content
    return hashlib.sha256(f"{seed}\0{identity}".encode()).hexdigest(), content


def split_pairs(
    rows: Sequence[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held out): the held-out rows are those whose seeded hash of the row id ranks
    lowest, so the split depends on the ids and the seed, not on the order of the rows.
    Both parts keep the input order."""
    count = held_out_count(len(rows), eval_fraction)
    ranked = sorted(range(len(rows)), key=lambda i: _split_key(rows[i], seed))
    held = set(ranked[:count])
    train = [row for i, row in enumerate(rows) if i not in held]
    return train, [row for i, row in enumerate(rows) if i in held]


def _evaluate(
    model: PreTrainedModel, pairs: list[dict[str, list[int]]], pad_token_id: int, batch_size: int
) -> PairMetrics | None:
    if not pairs:
        return None
    chosen = score_ids(model, [p["chosen_ids"] for p in pairs], pad_token_id, batch_size)
    rejected = score_ids(model, [p["rejected_ids"] for p in pairs], pad_token_id, batch_size)
    return pair_metrics(chosen, rejected)


def _describe(metrics: PairMetrics | None) -> str:
    if metrics is None:
        return "no held-out pairs (evalFraction 0)"
    return (
        f"held-out accuracy {metrics.accuracy:.3f}, mean margin {metrics.mean_margin:+.3f} "
        f"({metrics.pairs} pairs)"
    )


def _check_row(row: dict[str, Any]) -> None:
    if not all(isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")):
        keys = ", ".join(sorted(row)) or "none"
        raise TrainingSetupError(
            Reason.DATASET_INVALID,
            f"the {STAGE} stage needs preference pairs (prompt, chosen and rejected as lists "
            f"of messages); row {row.get('id', '?')} has keys {keys}. Give the stage a "
            "preference dataset (stages[].dataset with format Preference)",
        )


def _tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """chosen_ids / rejected_ids of each pair (TRL's pre-tokenized form) and how many pairs
    were left out for exceeding max_length."""
    pairs, dropped = [], 0
    for row in rows:
        _check_row(row)
        chosen = encode(tokenizer, [*row["prompt"], *row["chosen"]])
        rejected = encode(tokenizer, [*row["prompt"], *row["rejected"]])
        if max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        pairs.append({"chosen_ids": chosen, "rejected_ids": rejected})
    return pairs, dropped


def lora_config(lora: LoRASpec) -> Any:
    """PEFT LoRA for a sequence-classification model: the adapters on the chosen layers and
    the new `score` head trained in full (it starts random)."""
    from peft import LoraConfig, TaskType

    targets = lora.target_modules
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=parse_decimal(lora.dropout),
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=["score", *[m for m in lora.modules_to_save or [] if m != "score"]],
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type=TaskType.SEQ_CLS,
    )


def load_reward_model(
    model_dir: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, seed: int
) -> PreTrainedModel:
    """A causal LM folder as a one-output sequence-classification model (the score head is
    new and seeded); its pad token is the tokenizer's, so the last real token is found."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    set_seed(seed)
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=1, dtype=dtype
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def planned_steps(pairs: int, training: TrainingSpec) -> int:
    """Optimizer steps the stage will take on one process."""
    if training.max_steps:
        return training.max_steps
    batches = math.ceil(pairs / training.batch_size)
    per_epoch = max(1, math.ceil(batches / training.gradient_accumulation_steps))
    return per_epoch * (training.epochs or 1)


def reward_config(
    training: TrainingSpec,
    spec: RewardModelSpec,
    checkpoint_dir: Path,
    precisions: Precisions,
    *,
    seed: int,
    cuda: bool,
    has_eval: bool,
    report_to: Sequence[str] = (),
) -> Any:
    """TRL's RewardConfig for these settings."""
    from trl import RewardConfig  # type: ignore[attr-defined]

    checkpoint = training.checkpoint or CheckpointSpec()
    warmup: float | int = 0.03
    if training.warmup_steps is not None:
        warmup = training.warmup_steps
    elif training.warmup_ratio is not None:
        warmup = parse_decimal(training.warmup_ratio)
    gradient_checkpointing = (
        cuda
        if training.gradient_checkpointing == Toggle.AUTO
        else training.gradient_checkpointing == Toggle.ENABLED
    )
    optimizer = training.optimizer
    center = spec.center_rewards_coefficient
    return RewardConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=training.epochs or 1,
        max_steps=training.max_steps or -1,
        learning_rate=parse_decimal(training.learning_rate),
        lr_scheduler_type=_SCHEDULES[training.schedule],
        warmup_steps=warmup,
        weight_decay=parse_decimal(training.weight_decay),
        max_grad_norm=parse_decimal(training.max_grad_norm),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_length=training.max_seq_length,
        center_rewards_coefficient=parse_decimal(center) if center is not None else None,
        bf16=precisions.bf16,
        fp16=precisions.fp16,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        optim="adamw_torch" if optimizer == Optimizer.AUTO else _OPTIMIZERS[optimizer],
        seed=seed,
        data_seed=seed,
        logging_steps=training.log_every_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=checkpoint.every_steps,
        save_total_limit=1,
        eval_strategy="steps" if has_eval and training.eval_every_steps else "no",
        eval_steps=training.eval_every_steps,
        report_to=list(report_to),
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not cuda,
    )


def _progress_callbacks(
    progress: StageProgress,
    records: list[dict[str, Any]],
    stop: dict[str, bool],
    log: Callable[[str], None],
) -> list[Any]:
    from transformers import TrainerCallback

    from kubetune.trainer.progressbar import RichProgressBar

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            values = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            values["epoch"] = state.epoch or 0
            record = progress.record(state.global_step, values, state.num_input_tokens_seen)
            records.append(record)
            extra = [
                f"{label} {record[key]:{fmt}}"
                for key, label, fmt in (
                    ("accuracy", "acc", ".3f"),
                    ("margin", "margin", "+.3f"),
                    ("eval_accuracy", "eval_acc", ".3f"),
                )
                if key in record
            ]
            log(" | ".join([progress.line(record), *extra]))

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if stop["requested"]:
                control.should_save = True
                control.should_training_stop = True

    return [Report(), RichProgressBar(progress.stage)]


def train_reward_model(
    model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict[str, Any]],
    *,
    spec: RewardModelSpec,
    training: TrainingSpec,
    lora: LoRASpec | None,
    output_dir: Path,
    seed: int,
    log: Callable[[str], None],
    callbacks: list[Any] | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    log_path: Path | None = None,
    metrics: Metrics | None = None,
    report_to: Sequence[str] = (),
) -> RewardResult:
    """Train (or resume) a reward model on preference rows and save it to output_dir.

    Args:
        model_dir: a causal LM folder (the SFT stage's merged output or the base model).
        tokenizer: its tokenizer, with the chat template the data stage used.
        train_rows: preference rows `{"id", "prompt", "chosen", "rejected"}` (messages).
        spec: `spec.alignment.rewardModel` (defaults when absent).
        training: the stage's effective hyperparameters (spec.training with overrides).
        lora: LoRA settings to train adapters plus the score head; None trains in full.
        output_dir: where the merged reward model and tokenizer are saved.
        seed: seeds the score head, the held-out split, shuffling and dropout.
        log: receives concise progress lines.
        callbacks: extra Trainer callbacks (e.g. uploading each checkpoint).
        checkpoint_dir: the Trainer's checkpoints (default: output_dir + "-checkpoints").
        resume_from: a checkpoint folder to resume from.
        log_path: the JSONL log of per-step records (default: in checkpoint_dir).
        metrics: Prometheus gauges to update.
        report_to: Trainer integrations (tensorboard, mlflow) as `tracking_integrations` gives.

    Raises:
        TrainingSetupError: DatasetInvalid for rows that are not preference pairs,
            DatasetEmpty when no pair is left to train on.
        Preempted: SIGTERM arrived; a checkpoint was saved (best effort).
    """
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RewardTrainer  # type: ignore[attr-defined]

    checkpoint_dir = checkpoint_dir or output_dir.with_name(output_dir.name + "-checkpoints")
    train_part, held_part = split_pairs(train_rows, parse_decimal(spec.eval_fraction), seed)
    train_pairs, dropped = _tokenize_pairs(tokenizer, train_part, training.max_seq_length)
    eval_pairs, dropped_eval = _tokenize_pairs(tokenizer, held_part, training.max_seq_length)
    dropped += dropped_eval
    log(
        f"{STAGE}: {len(train_pairs)} training pairs, {len(eval_pairs)} held out "
        f"(evalFraction {spec.eval_fraction}); {dropped} left out for exceeding "
        f"training.maxSeqLength ({training.max_seq_length} tokens)"
    )
    if not train_pairs:
        raise TrainingSetupError(
            Reason.DATASET_EMPTY,
            f"the {STAGE} stage has no preference pair to train on ({len(train_rows)} rows, "
            f"{dropped} longer than training.maxSeqLength); provide more pairs, raise "
            "training.maxSeqLength or lower alignment.rewardModel.evalFraction",
        )

    cuda = torch.cuda.is_available()
    method = Method.LORA if lora is not None else Method.FULL
    precisions = choose_precision(training, method, cuda, cuda and torch.cuda.is_bf16_supported())
    model = load_reward_model(model_dir, tokenizer, precisions.load, seed)
    model.to("cuda" if cuda else "cpu")  # type: ignore[arg-type]
    before = _evaluate(model, eval_pairs, tokenizer.pad_token_id, training.batch_size)
    log(f"{STAGE} before training: {_describe(before)}")
    if lora is not None:
        model = get_peft_model(model, lora_config(lora))
        for parameter in model.parameters():
            if parameter.requires_grad:  # trained weights in fp32, also with a half base
                parameter.data = parameter.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"{STAGE}: training {trainable:,} of {total:,} parameters")

    args = reward_config(
        training,
        spec,
        checkpoint_dir,
        precisions,
        seed=seed,
        cuda=cuda,
        has_eval=bool(eval_pairs),
        report_to=report_to,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress = StageProgress(
        STAGE,
        planned_steps(len(train_pairs), training),
        log_path or checkpoint_dir / "train.jsonl",
        metrics,
    )
    records: list[dict[str, Any]] = []
    stop = {"requested": False}
    for callback in [*_progress_callbacks(progress, records, stop, log), *(callbacks or [])]:
        trainer.add_callback(callback)
    if resume_from is not None:
        log(f"Resuming {STAGE} from {resume_from}")
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    try:
        resumed_at = _checkpoint_step(resume_from)
        if (
            resume_from is not None
            and resumed_at is not None
            and resumed_at >= progress.total_steps
        ):
            # The final checkpoint is committed: train() would take one step more.
            finish_trainer(trainer, resume_from)
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stop["requested"]:
        raise Preempted(
            f"{STAGE} stopped by SIGTERM at step {trainer.state.global_step} (checkpoint saved)"
        )

    # Without the mixed-precision wrapper, so the reported accuracy is the saved model's.
    trained: Any = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if lora is not None:
        trained = trained.merge_and_unload().to(precisions.load)
    after = _evaluate(trained, eval_pairs, tokenizer.pad_token_id, training.batch_size)
    steps = trainer.state.global_step
    log(f"{STAGE} after {steps} steps: {_describe(after)} (before: {_describe(before)})")
    save_reward_model(trained, tokenizer, output_dir)
    log(f"Saved the reward model to {output_dir}")
    return RewardResult(
        folder=output_dir,
        before=before,
        after=after,
        steps=steps,
        train_pairs=len(train_pairs),
        dropped_too_long=dropped,
        resumed_from_step=_checkpoint_step(resume_from),
        log_records=records,
    )


def _checkpoint_step(folder: Path | None) -> int | None:
    if folder is None:
        return None
    suffix = folder.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else None


def save_reward_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> Path:
    """The model (no adapter) and tokenizer as safetensors, config and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder
