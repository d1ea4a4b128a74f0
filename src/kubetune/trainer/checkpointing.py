"""Checkpoints in the artifact store: upload and commit after each save, download the
latest complete one to resume.

A checkpoint is the Hugging Face Trainer's folder (weights or adapter, optimizer,
scheduler, RNG states, trainer state with the data position) plus, when the caller passes
it, the training log as of that step (`CHECKPOINT_LOG`): a resumed stage continues that
log, so a process killed between a commit and the run's log upload loses no records and
duplicates none. A checkpoint counts only once its marker is committed (written last), and
a resumed run verifies every file's sha256 against the marker before using it; a corrupted
checkpoint is refused and the previous complete one is used instead.

A Trainer resumed from its final checkpoint would train one step too many (transformers
checks the step count only after a step): `finish_trainer` ends such a stage instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from kubetune.storage import RunLayout, Store
from kubetune.storage.checkpoints import (
    Checkpoint,
    checkpoint_steps,
    commit_checkpoint,
    load_checkpoint,
    prune_checkpoints,
)
from kubetune.storage.errors import ObjectCorrupt
from kubetune.trainer import faults

logger = logging.getLogger("kubetune.trainer")

CHECKPOINT_LOG = "kubetune-train.jsonl"
"""The run's training log as of the checkpoint, inside the checkpoint folder."""


def upload_checkpoint(
    store: Store,
    layout: RunLayout,
    folder: Path,
    step: int,
    keep: int,
    stage: str | None = None,
    log_path: Path | None = None,
) -> Checkpoint:
    """Upload a local checkpoint folder, commit it, prune old ones (layout: the stage's,
    see `RunLayout.for_stage`; `stage` names it for the fault points). `log_path`: the
    training log, committed with the checkpoint as `CHECKPOINT_LOG`."""
    base = layout.key(layout.checkpoint(step))
    if log_path is not None and log_path.is_file():
        shutil.copyfile(log_path, folder / CHECKPOINT_LOG)
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    infos = []
    for index, path in enumerate(paths):
        if index == len(paths) // 2:
            faults.reach("checkpoint-upload", step, stage)
        infos.append(store.put_file(path, base + path.relative_to(folder).as_posix()))
    faults.reach("checkpoint-marker", step, stage)
    checkpoint = commit_checkpoint(store, layout, step, infos)
    pruned = prune_checkpoints(
        store,
        layout,
        keep,
        marker_deleted=lambda old: faults.reach("checkpoint-prune", old, stage),
    )
    if pruned:
        logger.info("Pruned checkpoints at steps %s (keeping %d)", pruned, keep)
    return checkpoint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_latest(
    store: Store,
    layout: RunLayout,
    into: Path,
    stage: str | None = None,
    log_path: Path | None = None,
) -> tuple[int, Path] | None:
    """Download the newest complete, uncorrupted checkpoint; (step, folder) or None
    (`stage` names the stage for the fault points). With `log_path`, the training log the
    checkpoint carries replaces that file: the stage continues the log as of its step."""
    scoped = layout
    for step, sizes in sorted(checkpoint_steps(store, scoped).items(), reverse=True):
        checkpoint = load_checkpoint(store, scoped, step, sizes)
        if checkpoint is None:
            continue
        target = into / f"checkpoint-{step}"
        shutil.rmtree(target, ignore_errors=True)
        corrupted = None
        for index, entry in enumerate(checkpoint.files):
            faults.reach("checkpoint-download", index, stage)
            local = target / entry.path
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.get_file(scoped.key(checkpoint.folder + entry.path), local)
            except ObjectCorrupt:  # the store's own checksum refused it on every attempt
                corrupted = entry.path
                break
            if _sha256(local) != entry.sha256.removeprefix("sha256:"):
                corrupted = entry.path
                break
        if corrupted is not None:
            logger.warning(
                "Refusing checkpoint %s: %s does not match its recorded sha256; trying an "
                "older one",
                scoped.uri_for(checkpoint.folder),
                corrupted,
            )
            shutil.rmtree(target, ignore_errors=True)
            continue
        if log_path is not None and (target / CHECKPOINT_LOG).is_file():
            log_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target / CHECKPOINT_LOG, log_path)
        return step, target
    return None


def load_policy_weights(model: Any, folder: Path) -> None:
    """Load a checkpoint's policy weights into `model`: the adapter of a PEFT model
    (`adapter_model.safetensors`), or the full weights (`model*.safetensors`)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(shard)))
    model.load_state_dict(state, strict=False)


def logged_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean training loss over the logged steps: each logged `loss` (its logging
    window's mean) weighted by the window's steps; None when no loss was logged.

    The Trainer's own `train_loss` divides the losses summed by the current process by
    every step of the stage, so it is wrong after a resume; this one is the same with or
    without restarts (the history comes back with the checkpoint), and equal to the
    Trainer's in an uninterrupted run whose last step is logged.
    """
    total, steps, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            window = int(entry["step"]) - last
            total += float(entry["loss"]) * window
            steps += window
            last = int(entry["step"])
    return total / steps if steps else None


def restore_token_count(trainer: Any, folder: Path) -> None:
    """Give TRL's token counter (`num_tokens` in its logs, not saved in checkpoints) its
    value as of the checkpoint in `folder`: the last one logged there, else 0."""
    if not hasattr(trainer, "_total_train_tokens"):
        return
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    logged = [entry["num_tokens"] for entry in history if "num_tokens" in entry]
    trainer._total_train_tokens = logged[-1] if logged else 0


def finish_trainer(trainer: Any, folder: Path) -> dict[str, float]:
    """End a Trainer stage whose final checkpoint (in `folder`) is committed, without
    training: load its weights and state, run the end-of-training evaluation and log the
    summary as `train()` would; returns `train()`'s metrics (without its timings)."""
    from transformers.trainer_callback import TrainerState

    load_policy_weights(trainer.model, folder)
    trainer.state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
    restore_token_count(trainer, folder)
    metrics: dict[str, float] = {}
    if trainer.eval_dataset is not None and trainer.args.eval_strategy != "no":
        metrics.update(trainer.evaluate())
    summary = {"total_flos": float(trainer.state.total_flos)}
    loss = logged_train_loss(trainer.state.log_history)
    if loss is not None:
        summary["train_loss"] = loss
    trainer.log(dict(summary))
    return {**summary, "epoch": float(trainer.state.epoch or 0), **metrics}
