"""Checkpoints in the artifact store: upload and commit after each save, download the
latest complete one to resume.

A checkpoint is the Hugging Face Trainer's folder (weights or adapter, optimizer,
scheduler, RNG states, trainer state with the data position). It counts only once its
marker is committed (written last), and a resumed run verifies every file's sha256
against the marker before using it; a corrupted checkpoint is refused and the previous
complete one is used instead.
"""

from __future__ import annotations

import hashlib
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

logger = logging.getLogger("kubetune.trainer")


def upload_checkpoint(
    store: Store, layout: RunLayout, folder: Path, step: int, keep: int
) -> Checkpoint:
    """Upload a local checkpoint folder, commit it, prune old ones (layout: the stage's,
    see `RunLayout.for_stage`)."""
    base = layout.key(layout.checkpoint(step))
    infos = [
        store.put_file(path, base + path.relative_to(folder).as_posix())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    checkpoint = commit_checkpoint(store, layout, step, infos)
    pruned = prune_checkpoints(store, layout, keep)
    if pruned:
        logger.info("Pruned checkpoints at steps %s (keeping %d)", pruned, keep)
    return checkpoint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_latest(store: Store, layout: RunLayout, into: Path) -> tuple[int, Path] | None:
    """Download the newest complete, uncorrupted checkpoint; (step, folder) or None."""
    scoped = layout
    for step, sizes in sorted(checkpoint_steps(store, scoped).items(), reverse=True):
        checkpoint = load_checkpoint(store, scoped, step, sizes)
        if checkpoint is None:
            continue
        target = into / f"checkpoint-{step}"
        shutil.rmtree(target, ignore_errors=True)
        corrupted = None
        for entry in checkpoint.files:
            local = target / entry.path
            local.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(scoped.key(checkpoint.folder + entry.path), local)
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
