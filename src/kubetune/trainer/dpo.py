"""Preference optimization through TRL: DPO (DPOTrainer) and KTO (KTOTrainer); the only
module that builds TRL configs for them.

KTO learns from desirable and undesirable answers rather than pairs: TRL splits each
preference pair into its chosen answer (desirable) and its rejected one (undesirable).

The reference model is never a second copy of the weights. With LoRA or QLoRA the policy
is a PEFT model: TRL adds a frozen copy of the adapter as the reference ("ref"), so after
an SFT stage the reference is the SFT policy, and as a first stage (a fresh adapter, B = 0)
it is the base model. The reference adapter is removed when the stage ends. Checkpoints,
resume, progress and SIGTERM work as for SFT (`sft.run_trainer`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import DPOLossType, DPOSpec, KTOSpec, StageType
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.training import CheckpointSpec, TrainingSpec
from kubetune.storage import RunLayout, Store
from kubetune.trainer.models import Checkpointing, Precisions, TrainingSetupError
from kubetune.trainer.progress import Metrics
from kubetune.trainer.sft import StageResult, run_trainer, trainer_arguments

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOSS_TYPES = {
    DPOLossType.SIGMOID: "sigmoid",
    DPOLossType.IPO: "ipo",
    DPOLossType.HINGE: "hinge",
    DPOLossType.ROBUST: "robust",
    DPOLossType.EXO_PAIR: "exo_pair",
    DPOLossType.NCA_PAIR: "nca_pair",
    DPOLossType.BCO_PAIR: "bco_pair",
    DPOLossType.SPPO_HARD: "sppo_hard",
    # TRL 1.x: "aot" is the paired variant, "aot_unpaired" the unpaired one.
    DPOLossType.AOT: "aot_unpaired",
    DPOLossType.AOT_PAIR: "aot",
    DPOLossType.APO_ZERO: "apo_zero",
    DPOLossType.APO_DOWN: "apo_down",
    DPOLossType.DISCOPOP: "discopop",
}
"""alignment.dpo.lossType → TRL's loss_type."""

REFERENCE_ADAPTER = "ref"


def preference_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Preference examples of a prepared file, in TRL's conversational form."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            row = json.loads(line)
            if "chosen" not in row:
                raise TrainingSetupError(
                    Reason.DATASET_INVALID,
                    f"{path}:{number}: preference stages need preference pairs (prompt, chosen, "
                    "rejected); set the stage's dataset (stages[].dataset) to preference data "
                    "with format Preference",
                )
            yield {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def pair_token_counts(path: Path) -> list[tuple[int, int]] | None:
    """(chosen, rejected) token counts of every pair of a prepared preference file, as the
    data stage counted them (prompt included); None when a row lacks them."""
    counts = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            chosen, rejected = row.get("chosenTokens"), row.get("rejectedTokens")
            if not isinstance(chosen, int) or not isinstance(rejected, int):
                return None
            counts.append((chosen, rejected))
    return counts


def dpo_config(
    spec: FineTuneJobSpec,
    training: TrainingSpec,
    output_dir: Path,
    precisions: Precisions,
    *,
    cuda: bool,
    checkpointing: Checkpointing,
    has_validation: bool,
) -> Any:
    """TRL's DPOConfig: the shared Trainer arguments plus alignment.dpo."""
    from trl import DPOConfig  # type: ignore[attr-defined]

    settings = (spec.alignment.dpo if spec.alignment else None) or DPOSpec()
    common = trainer_arguments(
        spec,
        training,
        output_dir,
        precisions,
        cuda=cuda,
        checkpointing=checkpointing,
        has_validation=has_validation,
    )
    return DPOConfig(
        **common,
        beta=parse_decimal(settings.beta),
        loss_type=[LOSS_TYPES[settings.loss_type]],
        label_smoothing=parse_decimal(settings.label_smoothing),
        precompute_ref_log_probs=settings.precompute_reference_log_probs,
        max_length=training.max_seq_length,
    )


def kto_config(
    spec: FineTuneJobSpec,
    training: TrainingSpec,
    output_dir: Path,
    precisions: Precisions,
    *,
    cuda: bool,
    checkpointing: Checkpointing,
    has_validation: bool,
) -> Any:
    """TRL's KTOConfig: the shared Trainer arguments plus alignment.kto."""
    from trl import KTOConfig  # type: ignore[attr-defined]

    settings = (spec.alignment.kto if spec.alignment else None) or KTOSpec()
    if training.batch_size < 2:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            "the KTO stage estimates its KL term from other examples of the same batch: set "
            "training.batchSize (or the stage's training.batchSize) to 2 or more",
        )
    common = trainer_arguments(
        spec,
        training,
        output_dir,
        precisions,
        cuda=cuda,
        checkpointing=checkpointing,
        has_validation=has_validation,
    )
    return KTOConfig(
        **common,
        beta=parse_decimal(settings.beta),
        desirable_weight=parse_decimal(settings.desirable_weight),
        undesirable_weight=parse_decimal(settings.undesirable_weight),
        max_length=training.max_seq_length,
    )


def packed_batches(
    spec: FineTuneJobSpec, kind: StageType, model: Any, collator: Any
) -> tuple[bool, str]:
    """Whether the stage trains on packed preference batches, and why (see
    preference_packing): DPO with `training.packing: Packed` (the default), on attention
    that keeps the sequences of a packed row apart."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from kubetune.trainer.fastpath import ATTENTION_NAME
    from kubetune.trainer.sft import packing_enabled

    if kind != StageType.DPO:
        return False, "padded (KTO scores each answer in its own row)"
    if not packing_enabled(spec):
        return False, "padded (training.packing is None, or the method prepends virtual tokens)"
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention not in (ATTENTION_NAME, "sdpa"):
        return False, f"padded ({attention} attention does not keep packed sequences apart)"
    if type(collator) is not DataCollatorForPreference:
        return False, "padded (not a text preference collator)"
    return True, (
        "packed (each batch's chosen and rejected sequences end to end in one row, "
        f"{attention} attention per sequence, no padding)"
    )


def train_dpo(
    spec: FineTuneJobSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    training: TrainingSpec,
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
    max_validation: int,
    kind: StageType = StageType.DPO,
) -> StageResult:
    """Run (or resume) a DPO or KTO stage (`kind`) on the policy `model` (the previous
    stage's output)."""
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer  # type: ignore[attr-defined]

    from kubetune.trainer.preference_packing import packed_collator, packed_forward

    train = Dataset.from_list(list(preference_rows(train_path)))
    pairs = list(preference_rows(validation_path))[:max_validation]
    validation = Dataset.from_list(pairs) if pairs else None
    build, trainer_type = (
        (kto_config, KTOTrainer)
        if kind == StageType.KTO
        else (
            dpo_config,
            DPOTrainer,
        )
    )
    args = build(
        spec,
        training,
        work_dir / kind.value.lower(),
        precisions,
        cuda=cuda,
        checkpointing=checkpointing_on,
        has_validation=validation is not None,
    )
    trainer = trainer_type(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    packed, why = packed_batches(spec, kind, model, trainer.data_collator)
    log(f"{kind.value} batches: {why}")
    hooks: Any = contextlib.nullcontext()
    if packed:
        trainer.data_collator = packed_collator(trainer.data_collator)
        hooks = packed_forward(trainer.model, getattr(trainer, "ref_model", None))
    with hooks:
        result = run_trainer(
            trainer,
            kind.value,
            store=store,
            layout=layout,
            keep=(training.checkpoint or CheckpointSpec()).keep,
            work_dir=work_dir,
            cuda=cuda,
            metrics=metrics,
            log=log,
        )
    policy = result.model
    if REFERENCE_ADAPTER in getattr(policy, "peft_config", {}):
        policy.delete_adapter(REFERENCE_ADAPTER)
    return result
