"""Rows as they come from a source, and the problems a row can have.

Every row keeps its origin (file and line, or row number for CSV / Parquet / JSON arrays)
so that any problem can be reported as `file:line: reason`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class RawRow(NamedTuple):
    """One raw record and where it came from (a named tuple: rows are made and pickled to
    worker processes by the million)."""

    source: str
    """Display name of the file (URI or path), used in problem reports."""

    line: int
    """1-based line (JSONL, text) or record number (CSV rows count the header as line 1)."""

    data: Any
    """The parsed record: a dict for structured formats, a str for plain text."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class BadRow(NamedTuple):
    """A record that could not even be parsed (e.g. a malformed JSONL line)."""

    source: str
    line: int
    reason: str
    detail: str

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class RowError(Exception):
    """A row that cannot be used. `reason` is a short stable key used for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Problem:
    """A reported problem: where, the counting key, and the human-readable message."""

    where: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"
