"""The RLHF stage of the chain: the policy learns from the reward model the RewardModel
stage just trained (`reward-model/` in the run).

Prompts come from the stage's training data: the `prompt` of preference rows, or a
conversation up to (not including) its last assistant turn. Each step samples completions
with `alignment.rlhf.generation`, scores them with the reward model (`RewardScorer`, the
same encoding the reward model was trained with) and updates the policy with a KL penalty
(`klCoefficient`) towards the reference: the policy as it entered the stage (with LoRA or
QLoRA the frozen adapter, no second copy of the base; with Full a frozen copy).

- PPO: the project's implementation (`alignment/ppo.py`): value head, GAE, clipped policy
  and value losses, fixed or adaptive KL control. `training.batchSize` prompts per step,
  `training.maxSteps` steps (or one pass over the prompts per epoch).
- RLOO and GRPO: TRL's trainers. `training.batchSize` prompts per step, each with
  `numGenerations` completions (at least 2: both compare completions of one prompt).

Checkpoints go to `checkpoints/<i>-rlhf/` (PPO's hold the policy weights, the value head,
the optimizer and the KL coefficient); a restarted stage resumes from the latest one.
"""

from __future__ import annotations

import copy
import json
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import RLHFAlgorithm, RLHFSpec, RolloutSpec
from kubetune.api.v1alpha1.training import CheckpointSpec, TrainingSpec
from kubetune.storage import RunLayout
from kubetune.trainer import checkpointing, faults
from kubetune.trainer.dpo import REFERENCE_ADAPTER
from kubetune.trainer.models import TrainingSetupError
from kubetune.trainer.progress import StageProgress
from kubetune.trainer.sft import (
    Preempted,
    StageResult,
    commit_checkpoint,
    run_trainer,
    trainer_arguments,
)
from kubetune.trainer.stage_context import StageContext

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STAGE = "RLHF"
PPO_STATE = "ppo_state.pt"
Messages = list[dict[str, Any]]


def rlhf_prompts(path: Path) -> list[Messages]:
    """The prompts of a prepared file: preference rows' `prompt`, or conversations cut
    before their last assistant turn."""
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            row = json.loads(line)
            if "prompt" in row:
                prompts.append(row["prompt"])
                continue
            messages = row.get("messages") or []
            last = max(
                (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1
            )
            if last < 1:
                raise TrainingSetupError(
                    Reason.DATASET_INVALID,
                    f"{path}:{number}: the RLHF stage needs prompts: preference rows or "
                    "conversations with a user turn before an assistant turn",
                )
            prompts.append(messages[:last])
    return prompts


def planned_steps(prompts: int, training: TrainingSpec) -> int:
    """PPO steps: training.maxSteps, else one pass over the prompts per epoch."""
    if training.max_steps:
        return training.max_steps
    return max(1, math.ceil(prompts / training.batch_size)) * (training.epochs or 1)


def add_reference_adapter(model: Any) -> str:
    """A frozen copy of the policy's adapter, as TRL makes for RLOO and GRPO: the reference
    is the policy as the stage starts (after SFT, the SFT policy), without a second copy of
    the base weights."""
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    for name, parameter in model.named_parameters():
        if ".default." in name:
            copy_of = model.get_parameter(name.replace(".default.", f".{REFERENCE_ADAPTER}."))
            copy_of.data.copy_(parameter.data)
            copy_of.requires_grad_(False)
    return REFERENCE_ADAPTER


def check_rlhf(settings: RLHFSpec) -> None:
    """Refuse settings RLOO and GRPO cannot run with."""
    if settings.algorithm != RLHFAlgorithm.PPO and settings.num_generations < 2:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            f"alignment.rlhf.numGenerations is {settings.num_generations}, but "
            f"{settings.algorithm.value} compares completions of the same prompt: set it to "
            "2 or more (e.g. 4)",
        )


def run_rlhf_stage(
    ctx: StageContext,
    layout: RunLayout,
    model: PreTrainedModel,
    train_path: Path,
    training: TrainingSpec,
    reward_dir: Path,
) -> StageResult:
    """Train (or resume) the policy against the reward model in `reward_dir`."""
    from kubetune.trainer.alignment.reward_scoring import RewardScorer

    settings = (ctx.spec.alignment.rlhf if ctx.spec.alignment else None) or RLHFSpec()
    check_rlhf(settings)
    prompts = rlhf_prompts(train_path)
    scorer = RewardScorer(reward_dir, "cuda" if ctx.cuda else "cpu", batch_size=training.batch_size)
    ctx.log(
        f"{STAGE} ({settings.algorithm.value}): {len(prompts)} prompts, reward model "
        f"{ctx.layout.uri_for('reward-model/')}"
    )
    run = _run_ppo if settings.algorithm == RLHFAlgorithm.PPO else _run_trl
    result = run(ctx, layout, model, prompts, scorer, settings, training)
    result.metrics["algorithm"] = settings.algorithm.value
    return result


def _run_trl(
    ctx: StageContext,
    layout: RunLayout,
    model: PreTrainedModel,
    prompts: list[Messages],
    scorer: Any,
    settings: RLHFSpec,
    training: TrainingSpec,
) -> StageResult:
    """RLOO or GRPO through TRL, with the shared checkpoints, progress and resume."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # type: ignore[attr-defined]

    config_type: Any
    trainer_type: Any
    config_type, trainer_type = (
        (GRPOConfig, GRPOTrainer)
        if settings.algorithm == RLHFAlgorithm.GRPO
        else (RLOOConfig, RLOOTrainer)
    )
    common = trainer_arguments(
        ctx.spec,
        training,
        ctx.work_dir / "rlhf",
        ctx.precisions,
        cuda=ctx.cuda,
        checkpointing=ctx.checkpointing_on,
        has_validation=False,
    )
    # batchSize counts prompts; TRL's batch counts completions.
    completions = training.batch_size * settings.num_generations
    common["per_device_train_batch_size"] = completions
    common["per_device_eval_batch_size"] = completions
    rollout = settings.generation or RolloutSpec()
    args = config_type(
        **common,
        num_generations=settings.num_generations,
        max_completion_length=rollout.max_new_tokens,
        temperature=parse_decimal(rollout.temperature),
        top_p=parse_decimal(rollout.top_p),
        beta=parse_decimal(settings.kl_coefficient),
        log_completions=False,
    )
    trainer = trainer_type(
        model=model,
        reward_funcs=[scorer],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=ctx.tokenizer,
    )
    result = run_trainer(
        trainer,
        STAGE,
        store=ctx.store,
        layout=layout,
        keep=(training.checkpoint or CheckpointSpec()).keep,
        work_dir=ctx.work_dir,
        cuda=ctx.cuda,
        metrics=ctx.metrics,
        log=ctx.log,
    )
    if REFERENCE_ADAPTER in getattr(result.model, "peft_config", {}):
        result.model.delete_adapter(REFERENCE_ADAPTER)
    return result


def _run_ppo(
    ctx: StageContext,
    layout: RunLayout,
    model: PreTrainedModel,
    prompts: list[Messages],
    scorer: Any,
    settings: RLHFSpec,
    training: TrainingSpec,
) -> StageResult:
    """The project's PPO, with checkpoints in the store, resume, progress and SIGTERM."""
    import torch

    from kubetune.trainer.alignment.ppo import train_ppo

    steps = planned_steps(len(prompts), training)
    keep = (training.checkpoint or CheckpointSpec()).keep
    # The reference is the policy as it entered the stage, taken before a resumed
    # checkpoint's weights are loaded.
    reference, reference_adapter = None, None
    if hasattr(model, "peft_config"):
        reference_adapter = add_reference_adapter(model)
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    start, state = 0, None
    resume = checkpointing.download_latest(
        ctx.store, layout, ctx.work_dir / "resume-rlhf", STAGE, log_path=ctx.log_path
    )
    if resume is not None:
        start, folder = resume
        checkpointing.load_policy_weights(model, folder)
        state = torch.load(folder / PPO_STATE, weights_only=True)
        ctx.log(f"Resuming {STAGE} from the checkpoint at step {start}")
    progress = StageProgress(STAGE, steps, ctx.log_path, ctx.metrics)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    last: dict[str, float] = dict(state.get("last", {})) if state else {}

    def on_step(record: dict[str, float]) -> None:
        step = int(record["step"])
        progress.record(step, {k: v for k, v in record.items() if k != "step"})
        last.clear()
        last.update(record)
        faults.reach("step-end", step, STAGE)

    def save(step: int, learner_state: dict[str, Any]) -> None:
        folder = ctx.work_dir / "rlhf" / f"checkpoint-{step}"
        model.save_pretrained(str(folder), safe_serialization=True)
        torch.save({**learner_state, "last": dict(last)}, folder / PPO_STATE)
        commit_checkpoint(ctx.store, layout, folder, step, keep, ctx.log_path, STAGE, ctx.log)

    if start >= steps:
        ctx.log(f"{STAGE} already reached step {steps}")
        metrics = {k: v for k, v in last.items() if k != "step"}
    else:
        stop = {"requested": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
        try:
            result = train_ppo(
                model,
                ctx.tokenizer,
                prompts,
                scorer.score,
                spec=settings,
                steps=steps,
                batch_size=training.batch_size,
                learning_rate=parse_decimal(training.learning_rate),
                seed=training.seed,
                log=ctx.log,
                on_step=on_step,
                reference=reference,
                max_grad_norm=parse_decimal(training.max_grad_norm),
                start_step=start,
                state=state,
                checkpoint=save,
                checkpoint_every=(training.checkpoint or CheckpointSpec()).every_steps,
                stop=lambda: stop["requested"],
                reference_adapter=reference_adapter,
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
            if reference_adapter is not None:
                model.delete_adapter(reference_adapter)
        if result.stopped_at is not None:
            raise Preempted(
                f"stopped by SIGTERM in {STAGE} at step {result.stopped_at} (checkpoint saved)"
            )
        metrics = dict(result.metrics)
    if ctx.cuda:
        metrics["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return StageResult(
        model=model,
        steps=steps,
        resumed_from_step=start or None,
        metrics=metrics,
        log=ctx.log_path,
    )
