"""Where the documents of a packed (padding-free) batch start and end.

A padding-free batch flattens several documents into one row; their boundaries come
either from TRL's collator (`cu_seq_lens_q` and `max_length_q`, computed on the CPU) or from
`position_ids` that restart at each document. A new document starts at every row start and
wherever a position is not the previous one plus one: the rule transformers uses to detect
packed rows, so both attention paths agree on what a document is.

Every layer of one forward pass (and its recomputation under gradient checkpointing)
receives the same boundary tensor, so the boundaries are derived once per step and reused:
at most one device-to-host copy per step, never one per layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class Documents:
    """The documents of a flattened batch of `total` tokens."""

    def __init__(
        self, cu_seqlens: torch.Tensor, max_len: int, offsets: tuple[int, ...] | None = None
    ) -> None:
        self.cu_seqlens = cu_seqlens
        """Cumulative offsets, int32, shape (documents + 1,), on the attention's device."""
        self.max_len = max_len
        """Length of the longest document."""
        self._offsets = offsets

    @property
    def offsets(self) -> tuple[int, ...]:
        """The offsets on the host (the per-document loop slices with them); copied from
        the device on first use."""
        if self._offsets is None:
            self._offsets = tuple(int(x) for x in self.cu_seqlens.tolist())
        return self._offsets

    @property
    def count(self) -> int:
        """How many documents."""
        return int(self.cu_seqlens.numel()) - 1


def offsets_from_position_ids(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Cumulative document offsets (int64, on the CPU) over `batch` flattened rows.

    A document starts at each row start and wherever a position does not follow the previous
    one: positions [[0, 1, 2, 0, 1]] give offsets [0, 3, 5].
    """
    positions = position_ids.detach().to("cpu", torch.int64)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.shape[0] != batch:
        positions = positions.expand(batch, -1)
    starts = torch.ones(positions.shape, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    total = positions.numel()
    return torch.cat([starts.reshape(-1).nonzero().flatten(), torch.tensor([total])])


def documents_from_position_ids(
    position_ids: torch.Tensor, batch: int, device: torch.device
) -> Documents:
    """The documents of `batch` rows whose positions restart at each document."""
    offsets = offsets_from_position_ids(position_ids, batch)
    max_len = int(offsets.diff().max()) if offsets.numel() > 1 else 0
    host = tuple(int(x) for x in offsets.tolist())
    return Documents(offsets.to(device=device, dtype=torch.int32), max_len, host)


def documents_from_cu_seqlens(
    cu_seqlens: torch.Tensor, max_len: int | torch.Tensor | None, device: torch.device
) -> Documents:
    """The documents given by cumulative offsets (TRL's `cu_seq_lens_q`, `max_length_q`)."""
    offsets = cu_seqlens.to(device=device, dtype=torch.int32)
    if max_len is None:
        longest = int(offsets.diff().max()) if offsets.numel() > 1 else 0
    else:
        longest = int(max_len)
    return Documents(offsets, longest)


def rows_as_documents(batch: int, length: int, device: torch.device) -> Documents:
    """Each of `batch` rows of `length` tokens is one document (no host copy needed)."""
    offsets = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return Documents(offsets, length)


class LastDocuments:
    """A one-entry cache: the documents derived from the last boundary tensor seen.

    The key is the tensor object itself (held weakly) with its version counter and the batch
    size, so a tensor changed in place or a new batch is never served stale boundaries.
    """

    def __init__(self) -> None:
        self._ref: weakref.ReferenceType[torch.Tensor] | None = None
        self._version = -1
        self._extra: tuple[object, ...] = ()
        self._documents: Documents | None = None

    def get(
        self, key: torch.Tensor, extra: tuple[object, ...], build: Callable[[], Documents]
    ) -> Documents:
        """The cached documents for `key`, or `build()`'s (then cached)."""
        # Inference tensors (made under torch.inference_mode) keep no version counter.
        version = -1 if key.is_inference() else key._version
        if (
            self._documents is not None
            and self._ref is not None
            and self._ref() is key
            and self._version == version
            and self._extra == extra
        ):
            return self._documents
        documents = build()
        self._ref = weakref.ref(key)
        self._version = version
        self._extra = extra
        self._documents = documents
        return documents

    def clear(self) -> None:
        """Forget the cached entry."""
        self._ref = None
        self._documents = None
