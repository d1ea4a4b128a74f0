"""The data report (`data/report.json`, schema in docs/data.md) and its histogram."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_SCHEMA_VERSION = 1
MAX_PROBLEMS = 100


@dataclass
class SourceStats:
    """Counts for one source file."""

    uri: str
    format: str
    format_reason: str
    rows: int = 0
    invalid: int = 0
    filtered: int = 0
    duplicates: int = 0
    kept: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "format": self.format,
            "formatReason": self.format_reason,
            "rows": self.rows,
            "invalid": self.invalid,
            "filtered": self.filtered,
            "duplicates": self.duplicates,
            "kept": self.kept,
        }


@dataclass
class Tally:
    """Running counts of the data stage."""

    sources: list[SourceStats] = field(default_factory=list)
    invalid: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)


def percentiles(values: list[int]) -> dict[str, float | int]:
    """count, min, p50, p90, p99, max, mean and total of token counts."""
    if not values:
        return {"count": 0, "total": 0}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 2),
        "total": sum(ordered),
    }


def write_histogram(train: list[int], validation: list[int], path: Path) -> Path:
    """A PNG histogram of token lengths (train and validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    top = max([*train, *validation, 1])
    bins = min(60, max(10, top // 8))
    if train:
        axes.hist(train, bins=bins, range=(0, top), alpha=0.75, label=f"train ({len(train)})")
    if validation:
        axes.hist(
            validation,
            bins=bins,
            range=(0, top),
            alpha=0.75,
            label=f"validation ({len(validation)})",
        )
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    axes.set_title("Token lengths")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
