"""Exact and near-duplicate detection.

Exact: sha256 of the normalized content. Near: MinHash over word 5-gram shingles (the
datasketch implementation, so results equal `datasketch.MinHashLSH`), indexed by a compact
banded hash: per band one 64-bit digest, instead of datasketch's in-memory tables of keys.
Signatures are computed in worker processes; the index lives in the main process and is
queried in input order, so the first occurrence is always the one kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

NUM_PERM = 128
SHINGLE_WORDS = 5

_SPACE_ONLY_STR_SPLITS_ON = re.compile(
    "[\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
"""Whitespace that `str.split()` splits on and `bytes.split()` does not (tests check it)."""


def exact_key(text: str) -> bytes:
    """16-byte digest of a normalized text."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def shingles(text: str, size: int = SHINGLE_WORDS) -> list[bytes]:
    """Lower-cased word n-grams (UTF-8); a short text is one shingle."""
    lowered = text.lower()
    if _SPACE_ONLY_STR_SPLITS_ON.search(lowered) is None:
        # Same words as str.split() then, split and joined as bytes: no encode per shingle.
        words = lowered.encode("utf-8").split()
        if len(words) <= size:
            return [b" ".join(words)]
        return list(map(b" ".join, zip(*(words[i:] for i in range(size)), strict=False)))
    text_words = lowered.split()
    if len(text_words) <= size:
        return [" ".join(text_words).encode("utf-8")]
    return [
        " ".join(text_words[i : i + size]).encode("utf-8")
        for i in range(len(text_words) - size + 1)
    ]


@cache
def bands_for(threshold: float, num_perm: int = NUM_PERM) -> tuple[tuple[int, int], ...]:
    """The (start, end) ranges of the LSH bands datasketch uses for this threshold."""
    from datasketch import MinHashLSH

    return tuple(MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges)


@cache
def _minhash(num_perm: int) -> tuple[Any, Any]:
    """A default MinHash (seed 1) and its empty signature, made once per process and
    reused: datasketch regenerates the permutations for every new MinHash."""
    from datasketch import MinHash

    minhash = MinHash(num_perm=num_perm)
    return minhash, minhash.hashvalues.copy()


def band_keys(text: str, threshold: float, num_perm: int = NUM_PERM) -> tuple[int, ...]:
    """One 64-bit key per LSH band of the text's MinHash signature."""
    minhash, empty = _minhash(num_perm)
    minhash.hashvalues = empty.copy()
    minhash.update_batch(shingles(text))
    values = minhash.hashvalues
    return tuple(
        int.from_bytes(hashlib.blake2b(values[start:end].tobytes(), digest_size=8).digest(), "big")
        for start, end in bands_for(threshold, num_perm)
    )


NOT_LOOKED_UP = None
"""`check_and_add(..., in_runs=NOT_LOOKED_UP)`: search the sorted runs for each key."""

RunHits = dict[int, int]
"""For one row: band → owner index of the keys `lookup_runs` found (empty: none found)."""


class _Band:
    """The keys of one band: sorted uint64 runs (8 bytes a key) plus the recent keys, which
    `flush` merges into the runs. The first band also maps each key to its owner's index
    (the report names the example a near duplicate repeats); the others only hold keys."""

    def __init__(self, with_owners: bool) -> None:
        self.with_owners = with_owners
        self.recent: dict[int, int] = {}
        self.runs: list[tuple[np.ndarray, np.ndarray | None]] = []

    def search(self, keys: np.ndarray) -> np.ndarray:
        """Owner index (0 in a band without owners) of each key found in the runs, -1 for
        the others (the recent keys are not searched)."""
        owners = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_owners in self.runs:
            at = np.searchsorted(run_keys, keys).clip(max=len(run_keys) - 1)
            found = run_keys[at] == keys
            owners[found] = run_owners[at[found]] if run_owners is not None else 0
        return owners

    def flush(self) -> None:
        """Move the recent keys into a sorted run; merge runs so that there are at most
        log2(total / flushed) of them (each key is copied O(log n) times overall)."""
        if not self.recent:
            return
        keys = np.fromiter(self.recent.keys(), dtype=np.uint64, count=len(self.recent))
        owners = (
            np.fromiter(self.recent.values(), dtype=np.int64, count=len(self.recent))
            if self.with_owners
            else None
        )
        self.recent = {}
        self.runs.append(self._sorted(keys, owners))
        while len(self.runs) >= 2 and len(self.runs[-2][0]) <= len(self.runs[-1][0]):
            (k1, o1), (k2, o2) = self.runs.pop(), self.runs.pop()
            merged = None if o1 is None or o2 is None else np.concatenate((o2, o1))
            self.runs.append(self._sorted(np.concatenate((k2, k1)), merged))

    @staticmethod
    def _sorted(
        keys: np.ndarray, owners: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        # Stable sort: on two concatenated sorted runs numpy's timsort is a linear merge.
        if owners is None:
            return np.sort(keys, kind="stable"), None
        order = np.argsort(keys, kind="stable")
        return keys[order], owners[order]


@dataclass
class NearDuplicateIndex:
    """Banded LSH index: an example is a near duplicate when any band collides.

    Sized for millions of examples: each band's keys live in sorted numpy runs plus a
    dict of recent keys (about 8 bytes a key instead of a Python int in a set). Call
    `lookup_runs` for a batch of rows before checking them one by one, so that the runs
    are searched once per batch (vectorized) and `check_and_add` only touches dicts.
    """

    num_bands: int
    flush_every: int = 1 << 16
    """Rows added between two merges of the recent keys into the sorted runs."""

    owners: list[str] = field(default_factory=list)
    """Who first filled each key (for the report's clusters), by owner index."""

    def __post_init__(self) -> None:
        self._bands = [_Band(with_owners=b == 0) for b in range(self.num_bands)]
        self._added_since_flush = 0

    def lookup_runs(self, rows: Sequence[tuple[int, ...] | None]) -> list[RunHits | None]:
        """Search the sorted runs for the band keys of a batch of rows (None entries are
        skipped) and give each row's hits, to pass to `check_and_add`. Merges the recent
        keys into the runs first when due; the answers hold until the next call."""
        if self._added_since_flush >= self.flush_every:
            for band in self._bands:
                band.flush()
            self._added_since_flush = 0
        hits: list[RunHits | None] = [None if keys is None else {} for keys in rows]
        present = [i for i, keys in enumerate(rows) if keys is not None]
        if not present or not self._bands[0].runs:
            return hits
        matrix = np.array([rows[i] for i in present], dtype=np.uint64)
        for b, band in enumerate(self._bands):
            owners = band.search(matrix[:, b])
            for j in np.flatnonzero(owners >= 0).tolist():
                hit = hits[present[j]]
                assert hit is not None
                hit[b] = int(owners[j])
        return hits

    def check_and_add(
        self, keys: tuple[int, ...], example_id: str, in_runs: RunHits | None = NOT_LOOKED_UP
    ) -> str | None:
        """The id of an earlier near duplicate ("" when only another band than the first
        knows it), or None after indexing this example. `in_runs` is what `lookup_runs`
        found for these keys (searched here when not given)."""
        if in_runs is NOT_LOOKED_UP:
            in_runs = self.lookup_runs([keys])[0]
            assert in_runs is not None
        first = self._bands[0].recent.get(keys[0], in_runs.get(0))
        if first is not None:
            return self.owners[first]
        if in_runs or any(
            key in band.recent for band, key in zip(self._bands[1:], keys[1:], strict=True)
        ):
            return ""
        owner = len(self.owners)
        self.owners.append(example_id)
        for band, key in zip(self._bands, keys, strict=True):
            band.recent[key] = owner
        self._added_since_flush += 1
        return None


@dataclass
class DedupStats:
    """What dedup removed, for the report."""

    exact: int = 0
    near: int = 0
    clusters: dict[str, list[str]] = field(default_factory=dict)

    def record(self, kept_id: str, removed_id: str, max_clusters: int = 50) -> None:
        if kept_id in self.clusters or len(self.clusters) < max_clusters:
            self.clusters.setdefault(kept_id, []).append(removed_id)
