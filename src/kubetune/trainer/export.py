"""Saving what training produced: the adapter, and merged full weights (vLLM-loadable)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import ExportSpec
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import ADAPTER_METHODS, Method
from kubetune.trainer.resolve import ResolvedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


MAX_SHARD_SIZE = "4GB"
"""Largest safetensors shard of merged weights (vLLM and transformers read the index)."""


class ExportError(Exception):
    """An export that this version cannot produce; carries the contract reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def save_trained(
    spec: FineTuneJobSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> Path:
    """The adapter (PEFT methods) or the full weights (Full), with the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def merge_adapter(
    resolved: ResolvedModel,
    adapter_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    dtype_name: str,
    seed: int,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Base weights (reloaded unquantized, also after QLoRA; rebuilt from the seed for
    builtin://random) plus the adapter (LoRA or DoRA), merged: sharded safetensors with the
    config, generation config and tokenizer, loadable by vLLM and transformers as they are.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.resolve import build_random_model

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32)
    if resolved.random_weights:
        base = build_random_model(resolved.path, seed, dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(
            str(resolved.path), dtype=dtype, **resolved.from_pretrained_kwargs()
        )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(folder))
    return folder


def needs_merge(spec: FineTuneJobSpec) -> bool:
    """Whether export.merge asks for merged weights from an adapter method."""
    export = spec.export or ExportSpec()
    return export.merge and spec.method in ADAPTER_METHODS


def trained_folder_name(spec: FineTuneJobSpec) -> str:
    """Where the trained weights go in the run: merged/ for Full, adapter/ otherwise."""
    return "merged" if spec.method == Method.FULL else "adapter"
