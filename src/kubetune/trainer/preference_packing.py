"""Padding-free DPO batches: every chosen and rejected sequence of a batch in one packed row.

TRL's DPO collator pads the 2·B sequences of a batch (B chosen, then B rejected) to the
longest of them, and the model computes every padding position. Preference data is
lopsided (a short answer next to a long one), so much of each batch is padding. Here the
sequences sit end to end in one row whose `position_ids` restart at each sequence; the
attention keeps sequences apart (`kubetune_varlen` on GPUs, transformers' per-document
mask with SDPA elsewhere), so each token sees exactly what it saw in its padded row.

TRL's loss code is left as it is. It sums per-token log-probabilities over each row of
`completion_mask` and splits the rows into chosen and rejected halves. So the batch keeps
one `completion_mask` row per sequence (over the packed row's width), and hooks on the
model spread the packed row's per-token outputs back into those rows:

- a forward pre-hook takes the owner of each token (`OWNER_KEY`, which the model never
  sees), drops the all-ones attention mask, and folds TRL's per-sequence labels back into
  the packed row;
- a forward hook scatters the fused LM head's per-token outputs (log-probabilities,
  entropy, ...) into one row per sequence, zero elsewhere.

Sums over a row are then the sequence's sums, as in the padded batch, for the policy and
for the reference forward alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch

OWNER_KEY = "kubetune_sequence_owner"
"""Batch key: for each token of the packed row, the index of its sequence."""
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""TRL's fused LM head outputs, one value per scored position."""


def pack(batch: dict[str, Any]) -> dict[str, Any]:
    """The padded preference batch of TRL's collator (rows: B chosen, then B rejected;
    right padding) as one packed row; other keys (reference log-probabilities) pass
    through."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    sequences = lengths.numel()
    tokens = int(lengths.sum())
    owner = torch.repeat_interleave(torch.arange(sequences), lengths)
    starts = torch.cumsum(lengths, dim=0) - lengths
    positions = torch.arange(tokens) - torch.repeat_interleave(starts, lengths)
    completion = torch.zeros((sequences, tokens), dtype=batch["completion_mask"].dtype)
    completion[owner, torch.arange(tokens)] = batch["completion_mask"][mask]
    packed = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    packed.update(
        input_ids=batch["input_ids"][mask].unsqueeze(0),
        attention_mask=torch.ones((1, tokens), dtype=batch["attention_mask"].dtype),
        position_ids=positions.unsqueeze(0),
        completion_mask=completion,
        **{OWNER_KEY: owner},
    )
    return packed


def packed_collator(collator: Any) -> Any:
    """A collator like TRL's preference collator `collator` (same padding token, maximum
    length and truncation) whose batches are packed rows."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    @dataclass
    class PackedPreferenceCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            return pack(super().torch_call(examples))

    settings = {f.name: getattr(collator, f.name) for f in fields(collator)}
    return PackedPreferenceCollator(**settings)


class _Hooks:
    """The forward pre-hook and forward hook of one model; the owner of each token passes
    from the first to the second (the module's forward never sees it)."""

    def __init__(self) -> None:
        self.owner: torch.Tensor | None = None

    def before(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.owner = kwargs.pop(OWNER_KEY, None)
        if self.owner is None:
            return None
        kwargs.pop("attention_mask", None)  # all ones: a packed row has no padding
        labels = kwargs.get("labels")
        if labels is not None and labels.size(0) > 1:
            # TRL masks input_ids with each sequence's completion row; every position
            # belongs to one sequence, so the packed labels are the one row not -100 there.
            kwargs["labels"] = labels.max(dim=0, keepdim=True).values
        return args, kwargs

    def after(self, _module: Any, _args: tuple[Any, ...], output: Any) -> Any:
        owner, self.owner = self.owner, None
        return None if owner is None else spread(output, owner)


def spread(output: Any, owner: torch.Tensor) -> Any:
    """`output`'s per-token fields of the packed row ([1, T - 1]: position j scores token
    j + 1) as one row per sequence ([S, T - 1], zero where another sequence's tokens
    are)."""
    sequences = int(owner.max()) + 1
    width = owner.numel() - 1
    rows = owner[1:]  # the sequence of the token each position scores
    columns = torch.arange(width, device=owner.device)
    for name in PER_TOKEN_FIELDS:
        value = getattr(output, name, None)
        if value is None or value.shape != (1, width):
            continue
        grid = value.new_zeros((sequences, width))
        output[name] = grid.index_put((rows.to(value.device), columns.to(value.device)), value[0])
    return output


@contextmanager
def packed_forward(*models: Any) -> Iterator[None]:
    """While the block runs, `models` (the policy, the reference model when there is one)
    take packed preference batches: see the module docstring."""
    handles = []
    for model in models:
        if model is None:
            continue
        hooks = _Hooks()
        handles.append(model.register_forward_pre_hook(hooks.before, with_kwargs=True))
        handles.append(model.register_forward_hook(hooks.after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
