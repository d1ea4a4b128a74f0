"""The chain of training stages (`spec.stages`), each continuing from the previous one.

How a stage consumes the previous stage's output: the model is handed on as it is. With
LoRA or QLoRA the same adapter keeps training (SFT's adapter is where DPO starts, and DPO's
reference is a frozen copy of it); with Full fine-tuning the same weights do. Nothing is
merged between stages.

Each stage has its own data (`stages[].dataset`, published under `data/<i>-<type>/`, or
`spec.dataset`), its own hyperparameter overrides (`stages[].training`) and its own
checkpoints (`checkpoints/` for the first stage, `checkpoints/<i>-<type>/` for the others).
When a stage ends, `COMPLETE.json` is written into its checkpoint folder (after its final
checkpoint). A restarted job skips completed stages, loads the model state of the last one
from its final checkpoint, and resumes inside the stage where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import StageSpec, StageType
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import PROMPT_LEARNING_METHODS
from kubetune.api.v1alpha1.training import TrainingSpec
from kubetune.storage import RunLayout, Store
from kubetune.trainer import checkpointing
from kubetune.trainer.models import Precisions, TrainingSetupError
from kubetune.trainer.progress import Metrics
from kubetune.trainer.sft import StageResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Log = Callable[[str], None]
SUPPORTED = (StageType.SFT, StageType.DPO)
COMPLETE = "COMPLETE.json"
FAMILIES = {StageType.SFT: ("conversation", "text"), StageType.DPO: ("preference",)}
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
    unsupported = [s.type.value for s in spec.stages if s.type not in SUPPORTED]
    if unsupported:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            f"stage(s) {', '.join(unsupported)} are not available in this version of the "
            f"trainer (available: {', '.join(s.value for s in SUPPORTED)})",
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
            "format (e.g. format: Preference for DPO)",
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
    from safetensors.torch import load_file

    found = checkpointing.download_latest(store, layout, work_dir / f"restore-{name}")
    if found is None:
        raise TrainingSetupError(
            Reason.INTERNAL_ERROR,
            f"stage {name} is marked complete but has no committed checkpoint in "
            f"{layout.uri_for(layout.checkpoints_dir)}",
        )
    folder = found[1]
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(shard)))
    model.load_state_dict(state, strict=False)


def run_stages(
    spec: FineTuneJobSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: list[StageData],
    *,
    store: Store,
    layout: RunLayout,
    work_dir: Path,
    precisions: Precisions,
    cuda: bool,
    checkpointing_on: bool,
    metrics: Metrics | None,
    max_validation: int,
    log: Log,
) -> ChainResult:
    """Train every stage in order; returns the final model and per-stage records."""
    from kubetune.trainer.dpo import train_dpo
    from kubetune.trainer.sft import train_sft

    chain = ChainResult(model=model)
    for index, stage in enumerate(spec.stages):
        name = stage_name(index, stage)
        stage_layout = _stage_layout(layout, index, stage)
        done = _completed(store, stage_layout)
        if done is not None:
            log(f"Stage {name} already complete ({done['steps']} steps)")
            last_done = (
                index == len(spec.stages) - 1
                or _completed(store, _stage_layout(layout, index + 1, spec.stages[index + 1]))
                is None
            )
            if last_done:
                _restore(chain.model, store, stage_layout, work_dir, name)
            chain.stages.append(done)
            chain.steps = done["steps"]
            continue
        training = stage_training(spec, stage)
        log(f"Stage {name}: {stage.type.value}")
        common: dict[str, Any] = {
            "train_path": data[index].train,
            "validation_path": data[index].validation,
            "store": store,
            "layout": stage_layout,
            "work_dir": work_dir,
            "precisions": precisions,
            "cuda": cuda,
            "checkpointing_on": checkpointing_on,
            "metrics": metrics,
            "log": log,
            "training": training,
        }
        result: StageResult
        if stage.type == StageType.SFT:
            result = train_sft(spec, chain.model, tokenizer, **common)
        else:
            result = train_dpo(
                spec, chain.model, tokenizer, max_validation=max_validation, **common
            )
        record = {
            "name": name,
            "type": stage.type.value,
            "steps": result.steps,
            "metrics": result.metrics,
        }
        store.put_bytes(
            json.dumps(record).encode(), stage_layout.key(stage_layout.checkpoints_dir + COMPLETE)
        )
        chain.model = result.model
        chain.steps = result.steps
        chain.log = result.log
        if result.resumed_from_step is not None and chain.resumed_from_step is None:
            chain.resumed_from_step = result.resumed_from_step
        chain.stages.append(record)
    return chain
