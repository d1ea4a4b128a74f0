"""Dedup keys and the banded index agree with datasketch's MinHashLSH."""

from __future__ import annotations

import random

from datasketch import MinHash, MinHashLSH

from kubetune.trainer.data.dedup import (
    NearDuplicateIndex,
    band_keys,
    bands_for,
    exact_key,
    shingles,
)


def test_shingles_are_word_five_grams() -> None:
    assert shingles("A b c d e f") == [b"a b c d e", b"b c d e f"]
    assert shingles("short one") == [b"short one"]


def test_exact_key_is_stable() -> None:
    assert exact_key("hello") == exact_key("hello")
    assert exact_key("hello") != exact_key("hello!")


def test_same_decisions_as_datasketch() -> None:
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(300)]
    base = [" ".join(rng.choices(vocabulary, k=40)) for _ in range(60)]
    docs = []
    for text in base:
        docs.append(text)
        words = text.split()
        words[rng.randrange(len(words))] = "changed"  # one word off: a near duplicate
        docs.append(" ".join(words))
    threshold = 0.7
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    theirs = []
    for i, text in enumerate(docs):
        m = MinHash(num_perm=128)
        m.update_batch(shingles(text))
        if lsh.query(m):
            theirs.append(True)
        else:
            lsh.insert(str(i), m)
            theirs.append(False)
    index = NearDuplicateIndex(len(bands_for(threshold)))
    ours = [
        index.check_and_add(band_keys(t, threshold), str(i)) is not None for i, t in enumerate(docs)
    ]
    assert ours == theirs
    assert sum(ours) >= 40  # most one-word edits are caught


def test_owner_is_the_first_occurrence() -> None:
    index = NearDuplicateIndex(len(bands_for(0.85)))
    keys = band_keys("the quick brown fox jumps over the lazy dog again", 0.85)
    assert index.check_and_add(keys, "first") is None
    assert index.check_and_add(keys, "second") == "first"
