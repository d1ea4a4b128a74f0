"""Dedup keys and the banded index agree with datasketch's MinHashLSH."""

from __future__ import annotations

import random

import pytest
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


def test_whitespace_that_only_str_split_knows_is_listed() -> None:
    # shingles() splits bytes when none of these occur; bytes.split() knows only ASCII ones.
    from kubetune.trainer.data.dedup import _SPACE_ONLY_STR_SPLITS_ON

    others = [chr(c) for c in range(0x110000) if chr(c).isspace() and chr(c) not in " \t\n\r\v\f"]
    assert all(_SPACE_ONLY_STR_SPLITS_ON.fullmatch(c) for c in others)
    assert not _SPACE_ONLY_STR_SPLITS_ON.search(" \t\n\r\v\f abc É ß İ 漢字")


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog",
        "one\ttwo\nthree\r\nfour  five\x0bsix\x0cseven",
        "Ünïcödé WÖRDS and İstanbul ẞtraße with 漢字 in the text",
        "non\xa0breaking\u2003spaces\u3000and\x1cseparators in between words",
        "  leading and trailing  ",
        "",
        "short",
    ],
    ids=["ascii", "ascii-whitespace", "non-ascii", "unicode-whitespace", "padded", "empty", "one"],
)
def test_shingles_equal_the_word_split(text: str) -> None:
    words = text.lower().split()
    expected = (
        [" ".join(words).encode()]
        if len(words) <= 5
        else [" ".join(words[i : i + 5]).encode() for i in range(len(words) - 4)]
    )
    assert shingles(text) == expected


def test_sorted_runs_give_the_same_decisions_as_datasketch() -> None:
    rng = random.Random(5)
    vocabulary = [f"w{i}" for i in range(200)]
    docs = []
    for _ in range(150):
        words = rng.choices(vocabulary, k=60)
        docs.append(" ".join(words))
        if rng.random() < 0.5:  # a near duplicate, a few rows later
            words[rng.randrange(len(words))] = "changed"
            docs.insert(len(docs) - rng.randrange(3), " ".join(words))
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    theirs = []
    for i, text in enumerate(docs):
        m = MinHash(num_perm=128)
        m.update_batch(shingles(text))
        found = lsh.query(m)
        theirs.append(sorted(found))
        if not found:
            lsh.insert(str(i), m)
    keys = [band_keys(t, 0.7) for t in docs]
    index = NearDuplicateIndex(len(bands_for(0.7)), flush_every=7)  # many runs and merges
    ours: list[str | None] = []
    for start in range(0, len(docs), 5):  # batches, as the data stage checks them
        batch = keys[start : start + 5]
        for offset, (row, hits) in enumerate(zip(batch, index.lookup_runs(batch), strict=True)):
            ours.append(index.check_and_add(row, str(start + offset), hits))
    assert [o is not None for o in ours] == [bool(t) for t in theirs]
    assert sum(o is not None for o in ours) >= 40
    for owner, found in zip(ours, theirs, strict=True):
        assert owner in (None, "", *found)  # the owner is one of datasketch's candidates
