"""Raw shapes → the data contract, and format detection with its reason."""

from __future__ import annotations

import pytest

from kubetune.api.v1alpha1.dataset import ColumnMapping, DataFormat
from kubetune.trainer.data.formats import Columns, convert, detect
from kubetune.trainer.data.rows import RawRow, RowError


def row(data: object) -> RawRow:
    return RawRow("data.jsonl", 7, data)


@pytest.mark.parametrize(
    ("data", "expected", "why"),
    [
        ({"instruction": "a", "input": "", "output": "b"}, DataFormat.ALPACA, "'instruction'"),
        (
            {"conversations": [{"from": "human", "value": "hi"}]},
            DataFormat.SHARE_GPT,
            "conversation",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, DataFormat.MESSAGES, "conversation"),
        ({"prompt": "p", "completion": "c"}, DataFormat.PROMPT_COMPLETION, "'prompt'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, DataFormat.PREFERENCE, "'chosen'"),
        ({"text": "hello"}, DataFormat.TEXT, "'text'"),
        ("a paragraph of text", DataFormat.TEXT, "plain text"),
    ],
    ids=["alpaca", "sharegpt", "messages", "prompt-completion", "preference", "text", "plain"],
)
def test_detect(data: object, expected: DataFormat, why: str) -> None:
    fmt, reason = detect([row(data)], Columns())
    assert fmt == expected
    assert why in reason


def test_detect_uses_the_column_mapping() -> None:
    columns = Columns.from_spec(ColumnMapping(prompt="question", completion="sql"))
    fmt, reason = detect([row({"question": "q", "sql": "select 1"})], columns)
    assert fmt == DataFormat.PROMPT_COMPLETION
    assert "'question'" in reason


def test_detect_failure_names_the_columns_and_the_fix() -> None:
    with pytest.raises(RowError, match=r"\(a, b\); set dataset.format"):
        detect([row({"a": 1, "b": 2})], Columns())


def test_alpaca_with_input_and_system_prompt() -> None:
    example = convert(
        row({"instruction": "Translate", "input": "chat", "output": "cat"}),
        DataFormat.ALPACA,
        Columns(),
        "Be brief.",
    )
    assert example == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Translate\n\nchat"},
            {"role": "assistant", "content": "cat"},
        ]
    }


def test_sharegpt_roles_are_mapped() -> None:
    example = convert(
        row({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
        DataFormat.SHARE_GPT,
        Columns(),
        None,
    )
    assert [m["role"] for m in example["messages"]] == ["user", "assistant"]


def test_row_system_column_wins_over_the_default_prompt() -> None:
    example = convert(
        row({"prompt": "p", "completion": "c", "system": "row system"}),
        DataFormat.PROMPT_COMPLETION,
        Columns(),
        "default",
    )
    assert example["messages"][0] == {"role": "system", "content": "row system"}


def test_preference_plain_and_as_messages() -> None:
    plain = convert(
        row({"prompt": "q", "chosen": "good", "rejected": "bad"}),
        DataFormat.PREFERENCE,
        Columns(),
        None,
    )
    assert plain == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    nested = convert(
        row(
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "g"}],
                "rejected": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "b"},
                ],
            }
        ),
        DataFormat.PREFERENCE,
        Columns(),
        None,
    )
    assert nested["prompt"] == []
    assert nested["chosen"][-1] == {"role": "assistant", "content": "g"}


def test_text_from_a_mapped_column() -> None:
    columns = Columns.from_spec(ColumnMapping(text="body"))
    assert convert(row({"body": "x"}), DataFormat.TEXT, columns, None) == {"text": "x"}


@pytest.mark.parametrize(
    ("fmt", "data", "reason"),
    [
        (DataFormat.ALPACA, {"instruction": "a"}, "missing-column"),
        (DataFormat.ALPACA, {"instruction": "a", "output": ["x"]}, "wrong-type"),
        (DataFormat.MESSAGES, {"messages": "hi"}, "wrong-type"),
        (DataFormat.MESSAGES, {"messages": [{"role": "robot", "content": "x"}]}, "unknown-role"),
        (DataFormat.MESSAGES, {"messages": [{"content": "x"}]}, "missing-role"),
        (DataFormat.ALPACA, ["not", "an", "object"], "not-an-object"),
    ],
    ids=[
        "missing-output",
        "output-not-text",
        "messages-not-list",
        "unknown-role",
        "no-role",
        "list",
    ],
)
def test_unusable_rows_say_why(fmt: DataFormat, data: object, reason: str) -> None:
    with pytest.raises(RowError) as info:
        convert(row(data), fmt, Columns(), None)
    assert info.value.reason == reason


def test_numbers_in_text_columns_are_accepted() -> None:
    example = convert(
        row({"prompt": "2+2", "completion": 4}), DataFormat.PROMPT_COMPLETION, Columns(), None
    )
    assert example["messages"][1]["content"] == "4"
