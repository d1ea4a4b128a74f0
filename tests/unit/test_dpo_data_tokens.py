"""The token counts the memory preflight reads from a prepared preference file."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.trainer.dpo import pair_token_counts


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_pair_gives_its_chosen_and_rejected_counts(tmp_path: Path) -> None:
    rows = [
        {"prompt": [], "chosen": [], "rejected": [], "chosenTokens": 12, "rejectedTokens": 30},
        {"prompt": [], "chosen": [], "rejected": [], "chosenTokens": 7, "rejectedTokens": 5},
    ]
    assert pair_token_counts(write(tmp_path / "t.jsonl", rows)) == [(12, 30), (7, 5)]


def test_a_row_without_counts_means_the_data_is_not_known(tmp_path: Path) -> None:
    rows = [
        {"chosenTokens": 12, "rejectedTokens": 30},
        {"chosenTokens": 12},
    ]
    assert pair_token_counts(write(tmp_path / "t.jsonl", rows)) is None
    assert pair_token_counts(write(tmp_path / "e.jsonl", [])) == []
