"""Deterministic synthetic Alpaca-style rows for the data-stage benchmark.

The rows look like instruction data as it arrives from the wild: varied lengths (a long
tail above `maxTokens`), texts that need normalizing (CRLF, trailing spaces, runs of blank
lines, decomposed Unicode), about 3 % exact duplicates of earlier rows, about 3 % near
duplicates (one or two words changed in a long answer), about 0.5 % invalid rows (missing
or empty columns) and a few garbage rows (control characters, spam). Every row has the
same JSON types so that `datasets.load_dataset("json")` can read the file too (no
malformed lines, no type changes within a column).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMON_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could people "
    "my than first water been call who oil its now find long down day did get come made may "
    "part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much "
    "before line right too mean old any same tell boy follow came want show also around form "
    "three small set put end does another well large must big even such because turn here why "
    "ask went men read need land different home us move try kind hand picture again change off "
    "play spell air away animal house point page letter mother answer found study still learn"
)
SYLLABLE_TEXT = (
    "ka ro mi ne su ta lo vi pe da ri co ma te lu ni sa po ge fa bo li de mu ra ve si no ta "
    "zu ke ol an er in or us el ar on it ex pro con tion ment ly ing ed al ic ous ive"
)
UNICODE_WORDS = tuple(
    unicodedata.normalize("NFD", w) for w in ("café", "naïve", "résumé", "Zürich", "façade")
)
"""Written in decomposed form (NFD) so that normalization has work to do."""


@dataclass(frozen=True)
class Mix:
    """Shares of the special kinds of rows (the rest are ordinary rows)."""

    exact_duplicates: float = 0.03
    near_duplicates: float = 0.03
    invalid: float = 0.005
    garbage: float = 0.002
    long: float = 0.01
    """Answers far above 1,024 tokens (dropped as too-long)."""


class RowGenerator:
    """Yields rows from one seeded random stream (same seed, same rows)."""

    def __init__(self, seed: int = 1234, mix: Mix | None = None, vocabulary: int = 6000) -> None:
        self.rng = random.Random(seed)
        self.mix = mix or Mix()
        syllables = SYLLABLE_TEXT.split()
        words = COMMON_TEXT.split()
        seen = set(words)
        while len(words) < vocabulary:
            word = "".join(self.rng.choices(syllables, k=self.rng.randint(1, 4)))
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = words
        # Zipf-like frequencies: a few words are very common, most are rare.
        self.cum_weights = list(
            itertools.accumulate(1.0 / (rank + 1) ** 1.05 for rank in range(len(words)))
        )
        self.recent: list[dict[str, Any]] = []
        self.long_recent: list[dict[str, Any]] = []

    def _words(self, n: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum_weights, k=n)

    def text(self, n: int, *, messy: bool = True) -> str:
        """n words as sentences, with the occasional paragraph break and formatting noise."""
        words = self._words(n)
        if messy and self.rng.random() < 0.05:
            words[self.rng.randrange(n)] = self.rng.choice(UNICODE_WORDS)
        out: list[str] = []
        i = 0
        while i < n:
            length = self.rng.randint(5, 18)
            sentence = words[i : i + length]
            sentence[0] = sentence[0].capitalize()
            out.append(" ".join(sentence) + self.rng.choice(".....?!:"))
            i += length
            if messy and i < n and self.rng.random() < 0.08:
                out.append(self.rng.choice(("\n\n", "  \n", "\r\n\r\n", "\n\n\n\n", "\n- ")))
        return " ".join(out).replace(" \n", "\n").replace("\n ", "\n")

    def _answer_words(self) -> int:
        if self.rng.random() < self.mix.long:
            return self.rng.randint(700, 1600)
        # Log-normal like Alpaca's answers: median about 35 words, mean about 50.
        return max(1, min(450, int(math.exp(self.rng.gauss(3.55, 0.85)))))

    def ordinary(self) -> dict[str, Any]:
        """An ordinary, valid row."""
        row: dict[str, Any] = {
            "instruction": self.text(self.rng.randint(4, 25), messy=False),
            "input": self.text(self.rng.randint(3, 40)) if self.rng.random() < 0.4 else "",
            "output": self.text(self._answer_words()),
        }
        if self.rng.random() < 0.05:
            row["system"] = "You are a careful assistant. " + self.text(8, messy=False)
        return row

    def near_duplicate(self, original: dict[str, Any]) -> dict[str, Any]:
        """The row with one or two words of its answer replaced."""
        words = original["output"].split(" ")
        for _ in range(self.rng.randint(1, 2)):
            words[self.rng.randrange(len(words))] = self._words(1)[0]
        return {**original, "output": " ".join(words)}

    def invalid(self) -> dict[str, Any]:
        """A row a trainer cannot use: a missing or empty column."""
        row = self.ordinary()
        kind = self.rng.randrange(5)
        if kind == 0:
            del row["output"]
        elif kind == 1:
            row["output"] = None
        elif kind == 2:
            row["output"] = ""
        elif kind == 3:
            row["output"] = "  \n\t \r\n "
        else:
            del row["instruction"]
        return row

    def garbage(self) -> dict[str, Any]:
        """Binary noise or spam (dropped by the non-printable or repetition filter)."""
        row = self.ordinary()
        if self.rng.random() < 0.5:
            noise = "".join(chr(self.rng.randint(1, 8)) for _ in range(self.rng.randint(40, 120)))
            row["output"] = self.text(10, messy=False) + " " + noise
        else:
            spam = " ".join(self._words(3))
            row["output"] = " ".join([spam] * self.rng.randint(10, 40))
        return row

    def row(self) -> dict[str, Any]:
        """The next row."""
        r = self.rng.random()
        mix = self.mix
        if r < mix.exact_duplicates and self.recent:
            return dict(self.rng.choice(self.recent))
        r -= mix.exact_duplicates
        if r < mix.near_duplicates and self.long_recent:
            return self.near_duplicate(self.rng.choice(self.long_recent))
        r -= mix.near_duplicates
        if r < mix.invalid:
            return self.invalid()
        r -= mix.invalid
        if r < mix.garbage:
            return self.garbage()
        row = self.ordinary()
        self._remember(self.recent, row)
        if len(row["output"].split()) >= 120 and len(row["output"].split()) < 350:
            self._remember(self.long_recent, row)
        return row

    def _remember(self, pool: list[dict[str, Any]], row: dict[str, Any], size: int = 20000) -> None:
        if len(pool) < size:
            pool.append(row)
        else:
            pool[self.rng.randrange(size)] = row

    def rows(self, n: int) -> Iterator[dict[str, Any]]:
        """n rows."""
        for _ in range(n):
            yield self.row()


def write_jsonl(path: Path, rows: int, seed: int = 1234) -> Path:
    """Write `rows` synthetic rows to `path` as JSON lines (UTF-8, no blank lines)."""
    generator = RowGenerator(seed)
    with path.open("w", encoding="utf-8") as handle:
        for row in generator.rows(rows):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
