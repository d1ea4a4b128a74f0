"""The chain of training stages (`spec.stages`), each continuing from the previous one.

How a stage consumes the previous stage's output: the policy is handed on as it is. With
LoRA or QLoRA the same adapter keeps training (SFT's adapter is where DPO, KTO or RLHF
starts, and their reference is a frozen copy of it); with Full fine-tuning the same weights
do. The policy is never merged between stages. The RewardModel stage is the exception that
does not change the policy: it trains a separate reward model, starting from the policy
merged into full weights, publishes it as `reward-model/` and hands the policy on unchanged
to the RLHF stage, which trains it against that reward model.

Each stage has its own data (`stages[].dataset`, published under `data/<i>-<type>/`, or
`spec.dataset`), its own hyperparameter overrides (`stages[].training`) and its own
checkpoints (`checkpoints/` for the first stage, `checkpoints/<i>-<type>/` for the others).
When a stage ends, `COMPLETE.json` is written into its checkpoint folder (after its final
checkpoint). A restarted job skips completed stages, loads the model state of the last one
from its final checkpoint, and resumes inside the stage where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import StageSpec, StageType
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import PROMPT_LEARNING_METHODS
from kubetune.api.v1alpha1.training import TrainingSpec
from kubetune.storage import RunLayout, Store
from kubetune.trainer import checkpointing, distributed
from kubetune.trainer.models import Checkpointing, Precisions, TrainingSetupError
from kubetune.trainer.progress import Metrics
from kubetune.trainer.resolve import ResolvedModel
from kubetune.trainer.sft import TRAIN_LOG, StageResult, packing_enabled
from kubetune.trainer.stage_context import StageContext

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Log = Callable[[str], None]
SUPPORTED = (
    StageType.SFT,
    StageType.DPO,
    StageType.KTO,
    StageType.REWARD_MODEL,
    StageType.RLHF,
)
UNSUPPORTED = {
    StageType.ORPO: "TRL 1.16 offers ORPO only as an experimental API; use DPO or KTO",
    StageType.SIMPO: "TRL 1.16 offers SimPO only as an experimental API (CPO); use DPO "
    "(e.g. alignment.dpo.lossType IPO) or KTO",
}
"""Stage types the API names but this trainer refuses, and what to use instead."""
COMPLETE = "COMPLETE.json"
FAMILIES = {
    StageType.SFT: ("conversation", "text"),
    StageType.DPO: ("preference",),
    StageType.KTO: ("preference",),
    StageType.REWARD_MODEL: ("preference",),
    StageType.RLHF: ("preference", "conversation"),
}
"""Which data families (data/report.json `family`) each stage trains on."""


@dataclass(frozen=True)
class StageData:
    """A stage's prepared training and validation files (local copies)."""

    train: Path
    validation: Path
    family: str


@dataclass
class ChainResult:
    """What the chain produced: the final model and a record per stage."""

    model: PreTrainedModel
    steps: int = 0
    resumed_from_step: int | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    log: Path | None = None


def stage_name(index: int, stage: StageSpec) -> str:
    """`<index>-<type>` (lower case), e.g. `1-dpo`: the stage's folder names."""
    return f"{index}-{stage.type.value.lower()}"


def stage_training(spec: FineTuneJobSpec, stage: StageSpec) -> TrainingSpec:
    """spec.training with the stage's overrides (epochs and maxSteps replace each other)."""
    training = spec.training or TrainingSpec()
    overrides = stage.training
    if overrides is None:
        return training
    update = overrides.model_dump(exclude_none=True)
    if "epochs" in update:
        update["max_steps"] = None
    if "max_steps" in update:
        update["epochs"] = None
    return training.model_copy(update=update)


def check_stages(spec: FineTuneJobSpec) -> None:
    """Refuse, before any work, stages this trainer cannot run with this method."""
    unsupported = [s.type for s in spec.stages if s.type not in SUPPORTED]
    if unsupported:
        why = "; ".join(f"{t.value}: {UNSUPPORTED[t]}" for t in unsupported if t in UNSUPPORTED)
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            f"stage(s) {', '.join(t.value for t in unsupported)} are not available in this "
            f"version of the trainer (available: {', '.join(s.value for s in SUPPORTED)})"
            + (f". {why}" if why else ""),
        )
    if spec.method in PROMPT_LEARNING_METHODS and any(s.type != StageType.SFT for s in spec.stages):
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            f"spec.stages: preference stages need method LoRA, QLoRA or Full, not "
            f"{spec.method.value}",
        )


def check_family(index: int, stage: StageSpec, family: str, where: str) -> None:
    """Refuse data of the wrong kind for a stage (e.g. conversations for DPO)."""
    wanted = FAMILIES[stage.type]
    if family not in wanted:
        source = f"spec.stages[{index}].dataset" if stage.dataset else "spec.dataset"
        raise TrainingSetupError(
            Reason.DATASET_INVALID,
            f"{source} ({where}) holds {family} examples, but stage {stage.type.value} trains "
            f"on {' or '.join(wanted)} data; give the stage its own dataset with a matching "
            "format (e.g. format: Preference for DPO, KTO and RewardModel)",
        )


def _stage_layout(layout: RunLayout, index: int, stage: StageSpec) -> RunLayout:
    return layout.for_stage(index, stage.type.value)


def _completed(store: Store, layout: RunLayout) -> dict[str, Any] | None:
    key = layout.key(layout.checkpoints_dir + COMPLETE)
    return json.loads(store.get_bytes(key)) if store.exists(key) else None


def _restore(
    model: PreTrainedModel, store: Store, layout: RunLayout, work_dir: Path, name: str
) -> None:
    """Load a completed stage's final weights (adapter or full) into `model`."""
    found = checkpointing.download_latest(store, layout, work_dir / f"restore-{name}")
    if found is None:
        raise TrainingSetupError(
            Reason.INTERNAL_ERROR,
            f"stage {name} is marked complete but has no committed checkpoint in "
            f"{layout.uri_for(layout.checkpoints_dir)}",
        )
    checkpointing.load_policy_weights(model, found[1])


def run_stages(
    spec: FineTuneJobSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: list[StageData],
    *,
    resolved: ResolvedModel,
    store: Store,
    layout: RunLayout,
    work_dir: Path,
    precisions: Precisions,
    cuda: bool,
    checkpointing_on: Checkpointing,
    metrics: Metrics | None,
    max_validation: int,
    log: Log,
) -> ChainResult:
    """Train every stage in order; returns the final policy and per-stage records."""
    ctx = StageContext(
        spec=spec,
        tokenizer=tokenizer,
        resolved=resolved,
        store=store,
        layout=layout,
        work_dir=work_dir,
        precisions=precisions,
        cuda=cuda,
        checkpointing_on=checkpointing_on,
        metrics=metrics,
        max_validation=max_validation,
        log=log,
    )
    chain = ChainResult(model=model)
    restore: tuple[RunLayout, str] | None = None  # the last completed stage that trained
    reward_dir: Path | None = None
    for index, stage in enumerate(spec.stages):
        name = stage_name(index, stage)
        stage_layout = _stage_layout(layout, index, stage)
        done = _completed(store, stage_layout)
        if done is not None:
            log(f"Stage {name} already complete ({done['steps']} steps)")
            if stage.type == StageType.REWARD_MODEL:
                from kubetune.trainer.reward_stage import download_reward_model

                reward_dir = download_reward_model(ctx)
            else:
                restore = (stage_layout, name)
            chain.stages.append(done)
            chain.steps = done["steps"]
            continue
        if restore is not None:
            _restore(chain.model, store, restore[0], work_dir, restore[1])
            restore = None
        log(f"Stage {name}: {stage.type.value}")
        with _stage_attention(chain.model, stage, packing_enabled(ctx.spec)):
            result, reward_dir = _run_stage(
                ctx, index, stage, chain.model, data[index], stage_layout, reward_dir
            )
        record = {
            "name": name,
            "type": stage.type.value,
            "steps": result.steps,
            "metrics": result.metrics,
        }
        if distributed.topology().main:  # only rank 0 publishes
            if result.log.is_file():  # with what the stage logged after its last checkpoint
                store.put_file(result.log, layout.key(TRAIN_LOG))
            store.put_bytes(
                json.dumps(record).encode(),
                stage_layout.key(stage_layout.checkpoints_dir + COMPLETE),
            )
        chain.model = result.model
        chain.steps = result.steps
        chain.log = result.log
        if result.resumed_from_step is not None and chain.resumed_from_step is None:
            chain.resumed_from_step = result.resumed_from_step
        chain.stages.append(record)
    if restore is not None:
        _restore(chain.model, store, restore[0], work_dir, restore[1])
    return chain


@contextmanager
def _stage_attention(model: Any, stage: StageSpec, packed: bool) -> Iterator[None]:
    """Packed-batch attention (`kubetune_varlen`) for the stages that train on packed rows:
    SFT, and DPO when `packed` (training.packing). The other stages train on padded
    batches, which it would hand to SDPA anyway, so they run on SDPA directly; the
    implementation is restored afterwards."""
    from kubetune.trainer.fastpath import ATTENTION_NAME

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    keeps = stage.type == StageType.SFT or (stage.type == StageType.DPO and packed)
    if keeps or current != ATTENTION_NAME:
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(ATTENTION_NAME)


def _run_stage(
    ctx: StageContext,
    index: int,
    stage: StageSpec,
    model: PreTrainedModel,
    data: StageData,
    layout: RunLayout,
    reward_dir: Path | None,
) -> tuple[StageResult, Path | None]:
    """One stage; returns its result and the reward model folder (new or handed on)."""
    from kubetune.trainer.dpo import train_dpo
    from kubetune.trainer.reward_stage import run_reward_stage
    from kubetune.trainer.rlhf_stage import run_rlhf_stage
    from kubetune.trainer.sft import train_sft

    training = stage_training(ctx.spec, stage)
    if stage.type == StageType.REWARD_MODEL:
        return run_reward_stage(ctx, layout, stage, model, data.train, data.validation, training)
    if stage.type == StageType.RLHF:
        if reward_dir is None:  # the API guarantees a RewardModel stage right before
            raise TrainingSetupError(
                Reason.INVALID_SPEC, "the RLHF stage needs a RewardModel stage before it"
            )
        result = run_rlhf_stage(ctx, layout, model, data.train, training, reward_dir)
        return result, reward_dir
    common: dict[str, Any] = {
        "train_path": data.train,
        "validation_path": data.validation,
        "store": ctx.store,
        "layout": layout,
        "work_dir": ctx.work_dir,
        "precisions": ctx.precisions,
        "cuda": ctx.cuda,
        "checkpointing_on": ctx.checkpointing_on,
        "metrics": ctx.metrics,
        "log": ctx.log,
        "training": training,
    }
    if stage.type == StageType.SFT:
        return train_sft(ctx.spec, model, ctx.tokenizer, **common), reward_dir
    result = train_dpo(
        ctx.spec,
        model,
        ctx.tokenizer,
        max_validation=ctx.max_validation,
        kind=stage.type,
        **common,
    )
    return result, reward_dir
