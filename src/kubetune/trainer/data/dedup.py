"""Exact and near-duplicate detection.

Exact: sha256 of the normalized content. Near: MinHash over word 5-gram shingles (the
datasketch implementation, so results equal `datasketch.MinHashLSH`), indexed by a compact
banded hash: per band one 64-bit digest in a set, instead of datasketch's in-memory
tables of keys. Signatures are computed in worker processes; the index lives in the main
process and is queried in input order, so the first occurrence is always the one kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

NUM_PERM = 128
SHINGLE_WORDS = 5


def exact_key(text: str) -> bytes:
    """16-byte digest of a normalized text."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def shingles(text: str, size: int = SHINGLE_WORDS) -> list[bytes]:
    """Lower-cased word n-grams; a short text is one shingle."""
    words = text.lower().split()
    if len(words) <= size:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)]


@cache
def bands_for(threshold: float, num_perm: int = NUM_PERM) -> tuple[tuple[int, int], ...]:
    """The (start, end) ranges of the LSH bands datasketch uses for this threshold."""
    from datasketch import MinHashLSH

    return tuple(MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges)


@cache
def _prototype(num_perm: int) -> Any:
    """A default MinHash (seed 1): its permutations and scheme, generated once per process
    (datasketch regenerates them for every new MinHash)."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm)


def band_keys(text: str, threshold: float, num_perm: int = NUM_PERM) -> tuple[int, ...]:
    """One 64-bit key per LSH band of the text's MinHash signature."""
    from datasketch import MinHash

    prototype = _prototype(num_perm)
    minhash = MinHash(
        num_perm=num_perm, permutations=prototype.permutations, scheme=prototype.scheme
    )
    minhash.update_batch(shingles(text))
    values = minhash.hashvalues
    return tuple(
        int.from_bytes(hashlib.blake2b(values[start:end].tobytes(), digest_size=8).digest(), "big")
        for start, end in bands_for(threshold, num_perm)
    )


@dataclass
class NearDuplicateIndex:
    """Banded LSH index: an example is a near duplicate when any band collides."""

    num_bands: int
    tables: list[set[int]] = field(default_factory=list)
    owners: dict[int, str] = field(default_factory=dict)
    """Which example first filled a key of band 0 (for the report's clusters)."""

    def __post_init__(self) -> None:
        self.tables = [set() for _ in range(self.num_bands)]

    def check_and_add(self, keys: tuple[int, ...], example_id: str) -> str | None:
        """The id of an earlier near duplicate ("" when only another band knows it), or
        None after indexing this example."""
        for band, key in enumerate(keys):
            if key in self.tables[band]:
                return self.owners.get(key, "") if band == 0 else ""
        for band, key in enumerate(keys):
            self.tables[band].add(key)
        self.owners[keys[0]] = example_id
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
