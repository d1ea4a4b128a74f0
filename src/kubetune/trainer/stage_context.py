"""What every training stage of the chain shares: the job, the run's store and layout, the
machine, and where to log. Built once by `stages.run_stages`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.storage import RunLayout, Store
from kubetune.trainer.models import Checkpointing, Precisions
from kubetune.trainer.progress import Metrics
from kubetune.trainer.resolve import ResolvedModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class StageContext:
    """The inputs a stage needs besides the model, its data and its hyperparameters."""

    spec: FineTuneJobSpec
    tokenizer: PreTrainedTokenizerBase
    resolved: ResolvedModel
    """The base model (the RewardModel stage merges the policy onto it)."""
    store: Store
    layout: RunLayout
    """The run's layout (stages derive their own with `layout.for_stage`)."""
    work_dir: Path
    precisions: Precisions
    cuda: bool
    checkpointing_on: Checkpointing
    metrics: Metrics | None
    max_validation: int
    log: Callable[[str], None]

    @property
    def log_path(self) -> Path:
        """The run's JSONL training log (all stages append to it)."""
        from kubetune.trainer.sft import TRAIN_LOG

        return self.work_dir / TRAIN_LOG

    @property
    def dtype_name(self) -> str:
        """The weights' dtype for merged folders ("bfloat16" or "float32")."""
        return "bfloat16" if self.precisions.bf16 else "float32"
