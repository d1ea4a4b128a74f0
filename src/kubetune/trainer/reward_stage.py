"""The RewardModel stage of the chain: trains a reward model on the stage's preference
pairs and publishes it as `reward-model/` in the run; the policy passes through unchanged.

The reward model starts from the policy as it is at this point of the chain (after SFT,
the SFT model): an adapter policy is merged onto the base (reloaded unquantized, also after
QLoRA), a fully trained one is saved as it is. With LoRA or QLoRA the reward model trains a
LoRA adapter plus its score head (`spec.lora`), then merges it; with Full it trains in full.
Its pairs are the stage's train and validation files together, of which
`alignment.rewardModel.evalFraction` is held out to measure pairwise accuracy before and
after training. Checkpoints go to `checkpoints/<i>-rewardmodel/`; a restarted stage resumes
from the latest one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.v1alpha1.alignment import RewardModelSpec, StageSpec
from kubetune.api.v1alpha1.methods import ADAPTER_METHODS, LoRASpec
from kubetune.api.v1alpha1.training import CheckpointSpec, TrainingSpec
from kubetune.storage import RunLayout
from kubetune.trainer import checkpointing, export
from kubetune.trainer.sft import StageResult, checkpoint_callback, tracking_integrations
from kubetune.trainer.stage_context import StageContext

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REWARD_MODEL_DIR = "reward-model/"
"""Where the trained reward model is published in the run."""
STAGE = "RewardModel"


def read_rows(*paths: Path) -> list[dict[str, Any]]:
    """The JSON rows of prepared data files, in order."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def policy_folder(ctx: StageContext, model: PreTrainedModel, folder: Path) -> Path:
    """The policy as a plain causal-LM folder: an adapter merged onto the base, or the
    fully trained weights, with the tokenizer."""
    if hasattr(model, "peft_config"):
        adapter = folder.with_name(folder.name + "-adapter")
        model.save_pretrained(str(adapter), safe_serialization=True)
        seed = (ctx.spec.training or TrainingSpec()).seed
        return export.merge_adapter(
            ctx.resolved, adapter, ctx.tokenizer, folder, ctx.dtype_name, seed
        )
    return export.save_trained(ctx.spec, model, ctx.tokenizer, folder)


def reward_lora(ctx: StageContext) -> LoRASpec | None:
    """LoRA settings of the reward model: the job's, for adapter methods; None (full)."""
    if ctx.spec.method not in ADAPTER_METHODS:
        return None
    return ctx.spec.lora or LoRASpec()


def download_reward_model(ctx: StageContext) -> Path:
    """A completed RewardModel stage's published model, copied locally."""
    folder = ctx.work_dir / "reward-model"
    prefix = ctx.layout.key(REWARD_MODEL_DIR)
    for info in ctx.store.list(prefix):
        ctx.store.get_file(info.key, folder / info.key.removeprefix(prefix))
    return folder


def run_reward_stage(
    ctx: StageContext,
    layout: RunLayout,
    stage: StageSpec,
    model: PreTrainedModel,
    train_path: Path,
    validation_path: Path,
    training: TrainingSpec,
) -> tuple[StageResult, Path]:
    """Train (or resume) the reward model; returns the stage result (the policy unchanged)
    and the local folder of the published reward model."""
    del stage  # the settings live in spec.alignment.rewardModel
    spec = (ctx.spec.alignment.reward_model if ctx.spec.alignment else None) or RewardModelSpec()
    ctx.log(f"{STAGE}: starting from the policy as it is after the previous stages")
    start = policy_folder(ctx, model, ctx.work_dir / "reward-start")
    keep = (training.checkpoint or CheckpointSpec()).keep
    resume = checkpointing.download_latest(
        ctx.store, layout, ctx.work_dir / "resume-reward", STAGE, log_path=ctx.log_path
    )
    if ctx.cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = _train(ctx, layout, start, train_path, validation_path, training, spec, keep, resume)
    metrics = result.metrics()
    if ctx.cuda:
        metrics["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    files = [
        ctx.store.put_file(path, ctx.layout.key(REWARD_MODEL_DIR + path.name))
        for path in sorted(result.folder.iterdir())
        if path.is_file()
    ]
    ctx.log(
        f"Published the reward model ({len(files)} files): {ctx.layout.uri_for(REWARD_MODEL_DIR)}"
    )
    stage_result = StageResult(
        model=model,
        steps=result.steps,
        resumed_from_step=result.resumed_from_step,
        metrics=metrics,
        log=ctx.log_path,
    )
    return stage_result, result.folder


def _train(
    ctx: StageContext,
    layout: RunLayout,
    start: Path,
    train_path: Path,
    validation_path: Path,
    training: TrainingSpec,
    spec: RewardModelSpec,
    keep: int,
    resume: tuple[int, Path] | None,
) -> Any:
    """`train_reward_model` with the run's checkpoints, log, metrics and tracking."""
    from kubetune.trainer.alignment.reward import train_reward_model

    return train_reward_model(
        start,
        ctx.tokenizer,
        read_rows(train_path, validation_path),
        spec=spec,
        training=training,
        lora=reward_lora(ctx),
        output_dir=ctx.work_dir / "reward-model-trained",
        seed=training.seed,
        log=ctx.log,
        callbacks=[checkpoint_callback(ctx.store, layout, keep, ctx.log_path, STAGE, ctx.log)],
        checkpoint_dir=ctx.work_dir / "reward-checkpoints",
        resume_from=resume[1] if resume else None,
        log_path=ctx.log_path,
        metrics=ctx.metrics,
        report_to=tracking_integrations(ctx.spec, ctx.work_dir / "tensorboard"),
    )
