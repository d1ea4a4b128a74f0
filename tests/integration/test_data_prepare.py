"""The data stage end to end on crafted files, with the built-in model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.dataset import DatasetSpec
from kubetune.trainer.data.prepare import DataStageError, PreparedData, prepare_dataset


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca(i: int, output: str | None = None) -> dict[str, str]:
    return {
        "instruction": f"Question number {i}: what is {i} plus {i}?",
        "input": "",
        "output": output or f"The answer is {2 * i}.",
    }


def run(tmp_path: Path, model: Path, workers: int = 1, **spec: Any) -> PreparedData:
    return prepare_dataset(
        DatasetSpec.model_validate(spec),
        tokenizer_dir=model,
        max_seq_length=256,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        workers=workers,
        log=lambda _: None,
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_alpaca_end_to_end(tmp_path: Path, builtin_model_dir: Path) -> None:
    source = write_jsonl(tmp_path / "train.jsonl", [alpaca(i) for i in range(40)])
    result = run(tmp_path, builtin_model_dir, uri=str(source), validation={"count": 4})
    train, val = lines(result.train), lines(result.validation)
    assert (len(train), len(val)) == (36, 4)
    first = train[0] if train[0]["source"].endswith(":1") else val[0]
    assert first["messages"][-1] == {"role": "assistant", "content": "The answer is 0."}
    assert 15 < first["tokens"] < 60
    report = json.loads(result.report.read_text())
    assert report["sources"][0]["format"] == "Alpaca"
    assert "'instruction'" in report["sources"][0]["formatReason"]
    assert report["counts"] == {
        "rows": 40,
        "invalid": 0,
        "filtered": 0,
        "duplicates": 0,
        "train": 36,
        "validation": 4,
    }
    assert report["tokens"]["train"]["count"] == 36
    assert report["digest"].startswith("sha256:")
    assert result.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_filter_counts_exactly(tmp_path: Path, builtin_model_dir: Path) -> None:
    rows: list[Any] = [alpaca(i) for i in range(20)]
    rows += [alpaca(0), alpaca(1)]  # 2 exact duplicates
    rows += [{"instruction": "x", "output": "y " * 400}]  # too long (> 256 tokens)
    rows += [
        {"instruction": "hi", "output": "ok"}
    ]  # too short with minTokens 40 (34 tokens with the default system prompt)
    noise = "".join(chr(c) for c in range(1, 9)) * 3
    rows += [{"instruction": "garbage", "output": f"Some words to pass the length filter {noise}"}]
    rows += [{"instruction": "spam", "output": " ".join(["buy cheap pills"] * 20)}]  # repetitive
    rows += [{"instruction": "no output"}]  # invalid: missing column
    rows += [{"instruction": "empty", "output": "   "}]  # invalid: empty after normalize
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    result = run(
        tmp_path,
        builtin_model_dir,
        uri=str(source),
        filters={"minTokens": 40},
        maxInvalidFraction="0.5",
    )
    report = result.summary
    assert report["invalidByReason"] == {"empty-message": 1, "missing-column": 1}
    assert report["filteredByReason"] == {
        "non-printable": 1,
        "repetitive": 1,
        "too-long": 1,
        "too-short": 1,
    }
    assert report["duplicatesByKind"] == {"exact": 2}
    assert report["counts"]["train"] + report["counts"]["validation"] == 20
    assert any(p.startswith(f"{source}:27: missing column 'output'") for p in report["problems"])


def test_malformed_json_line_is_reported_with_its_line(
    tmp_path: Path, builtin_model_dir: Path
) -> None:
    text = "".join(json.dumps(alpaca(i)) + "\n" for i in range(16))
    text += '{"instruction": "broken", "output": \n'  # line 17
    text += "".join(json.dumps(alpaca(i)) + "\n" for i in range(16, 30))
    source = tmp_path / "bad.jsonl"
    source.write_text(text)
    with pytest.raises(DataStageError) as info:
        run(tmp_path, builtin_model_dir, uri=str(source), onInvalid="Fail")
    assert info.value.reason == Reason.DATASET_INVALID
    assert f"{source}:17: invalid JSON" in str(info.value)
    # Skip within the budget: counted, reported, the rest kept.
    result = run(tmp_path, builtin_model_dir, uri=str(source), maxInvalidFraction="0.05")
    assert result.summary["invalidByReason"] == {"invalid-json": 1}
    assert result.summary["problems"][0].startswith(f"{source}:17: invalid JSON")
    # Skip over the budget: the stage fails and says why.
    with pytest.raises(
        DataStageError, match=r"1 of 31 rows are invalid .* maxInvalidFraction 0\.01"
    ):
        run(tmp_path, builtin_model_dir, uri=str(source))


def test_lone_surrogate_is_an_invalid_row_not_a_crash(
    tmp_path: Path, builtin_model_dir: Path
) -> None:
    text = "".join(json.dumps(alpaca(i)) + "\n" for i in range(30))
    text += '{"instruction": "broken \\ud800 text", "output": "x"}\n'  # line 31
    source = tmp_path / "surrogate.jsonl"
    source.write_text(text)
    result = run(tmp_path, builtin_model_dir, uri=str(source), maxInvalidFraction="0.05")
    assert result.summary["invalidByReason"] == {"invalid-unicode": 1}
    assert result.summary["problems"][0].startswith(f"{source}:31: lone UTF-16 surrogate")
    counts = result.summary["counts"]
    assert (counts["rows"], counts["invalid"]) == (31, 1)
    assert counts["train"] + counts["validation"] == 30


def test_split_is_deterministic_and_disjoint(tmp_path: Path, builtin_model_dir: Path) -> None:
    source = write_jsonl(tmp_path / "s.jsonl", [alpaca(i) for i in range(60)])
    a = run(
        tmp_path / "a",
        builtin_model_dir,
        uri=str(source),
        validation={"fraction": "0.2", "seed": 7},
    )
    b = run(
        tmp_path / "b",
        builtin_model_dir,
        workers=2,
        uri=str(source),
        validation={"fraction": "0.2", "seed": 7},
    )
    c = run(
        tmp_path / "c",
        builtin_model_dir,
        uri=str(source),
        validation={"fraction": "0.2", "seed": 8},
    )
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.validation.read_bytes() == b.validation.read_bytes()
    assert a.validation.read_bytes() != c.validation.read_bytes()
    train_ids = {r["id"] for r in lines(a.train)}
    val_ids = {r["id"] for r in lines(a.validation)}
    assert len(val_ids) == 12
    assert not train_ids & val_ids


def test_near_duplicates_never_straddle_the_split(tmp_path: Path, builtin_model_dir: Path) -> None:
    base = "Kubernetes schedules pods onto nodes according to resource requests and affinity rules"
    rows = [
        {"prompt": f"Explain scheduling, take {i}", "completion": f"{base}, version {i}."}
        for i in range(30)
    ]
    rows += [
        {"prompt": f"Topic {i}", "completion": f"Unrelated answer about item {i} " * 2}
        for i in range(30)
    ]
    source = write_jsonl(tmp_path / "n.jsonl", rows)
    result = run(
        tmp_path,
        builtin_model_dir,
        uri=str(source),
        filters={"dedup": "Near", "nearDedupThreshold": "0.5"},
        validation={"fraction": "0.3"},
    )
    kept = lines(result.train) + lines(result.validation)
    scheduling = [r for r in kept if "scheduling" in r["messages"][0]["content"]]
    assert len(scheduling) < 10
    assert result.summary["duplicatesByKind"]["near"] >= 20
    assert result.summary["dedup"]["clusters"]


def test_explicit_validation_source_removes_leaks(tmp_path: Path, builtin_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [alpaca(i) for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [alpaca(3), alpaca(100)])
    result = run(tmp_path, builtin_model_dir, uri=str(train), validation={"uri": str(val)})
    assert len(lines(result.validation)) == 2
    assert len(lines(result.train)) == 9
    assert result.summary["split"]["method"] == "uri"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "sharegpt", "preference", "text"])
def test_other_formats(tmp_path: Path, builtin_model_dir: Path, fmt: str) -> None:
    if fmt == "csv":
        source = tmp_path / "d.csv"
        source.write_text(
            "question,answer\n" + "".join(f"q{i} is?,a{i} is it\n" for i in range(10))
        )
        result = run(
            tmp_path,
            builtin_model_dir,
            uri=str(source),
            format="PromptCompletion",
            columns={"prompt": "question", "completion": "answer"},
        )
        assert lines(result.train)[0]["messages"][0]["content"].startswith("q")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist([alpaca(i) for i in range(10)]), source)
        result = run(tmp_path, builtin_model_dir, uri=str(source))
        assert result.summary["sources"][0]["format"] == "Alpaca"
    elif fmt == "sharegpt":
        rows = [
            {
                "conversations": [
                    {"from": "human", "value": f"hi {i}"},
                    {"from": "gpt", "value": f"hello {i}"},
                ]
            }
            for i in range(10)
        ]
        result = run(tmp_path, builtin_model_dir, uri=str(write_jsonl(tmp_path / "s.jsonl", rows)))
        assert result.summary["sources"][0]["format"] == "ShareGPT"
    elif fmt == "preference":
        rows = [
            {"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"}
            for i in range(10)
        ]
        result = run(tmp_path, builtin_model_dir, uri=str(write_jsonl(tmp_path / "p.jsonl", rows)))
        record = lines(result.train)[0]
        assert result.family == "preference"
        assert record["tokens"] == max(record["chosenTokens"], record["rejectedTokens"])
    else:
        source = tmp_path / "t.txt"
        source.write_text(
            "\n\n".join(f"Paragraph {i} about things.\nSecond line." for i in range(10))
        )
        result = run(tmp_path, builtin_model_dir, uri=str(source))
        assert lines(result.train)[0]["text"].startswith("Paragraph")
    assert result.summary["counts"]["train"] + result.summary["counts"]["validation"] == 10


def test_builtin_quickstart_and_pii(tmp_path: Path, builtin_model_dir: Path) -> None:
    result = run(tmp_path, builtin_model_dir, uri="builtin://quickstart", maxExamples=100)
    assert result.summary["counts"]["train"] + result.summary["counts"]["validation"] == 100
    rows = [
        {"prompt": f"Contact {i}?", "completion": f"Write to user{i}@example.com"} for i in range(5)
    ]
    result = run(
        tmp_path / "pii",
        builtin_model_dir,
        uri=str(write_jsonl(tmp_path / "pii.jsonl", rows)),
        filters={"piiRedaction": "Redact"},
    )
    assert result.summary["piiRedacted"]["emails"] == 5
    assert "example.com" not in result.train.read_text() + result.validation.read_text()


def test_nothing_left_is_dataset_empty(tmp_path: Path, builtin_model_dir: Path) -> None:
    source = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "output": "y " * 400}])
    with pytest.raises(DataStageError) as info:
        run(tmp_path, builtin_model_dir, uri=str(source))
    assert info.value.reason == Reason.DATASET_EMPTY
    assert "too-long" in str(info.value)


def test_missing_source_is_source_not_found(tmp_path: Path, builtin_model_dir: Path) -> None:
    with pytest.raises(DataStageError) as info:
        run(tmp_path, builtin_model_dir, uri=str(tmp_path / "nope-*.jsonl"))
    assert info.value.reason == Reason.SOURCE_NOT_FOUND


@pytest.mark.parametrize(
    ("chat_template", "expected"),
    [
        (None, "Model"),
        ({"preset": "ChatML"}, "ChatML"),
        ({"preset": "Alpaca"}, "Alpaca"),
        ({"jinja": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"}, "Jinja"),
    ],
    ids=["model", "chatml", "alpaca", "jinja"],
)
def test_chat_template_choice_changes_token_counts(
    tmp_path: Path, builtin_model_dir: Path, chat_template: dict[str, str] | None, expected: str
) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [alpaca(i) for i in range(10)])
    extra = {"chatTemplate": chat_template} if chat_template else {}
    result = run(tmp_path, builtin_model_dir, uri=str(source), **extra)
    assert result.summary["chatTemplate"] == expected
    tokens = result.summary["tokens"]["train"]["max"]
    # SmolLM2's own template adds a default system prompt; the bare Jinja one adds nothing.
    bounds = {"Model": (45, 70), "ChatML": (20, 40), "Alpaca": (20, 40), "Jinja": (10, 30)}
    low, high = bounds[expected]
    assert low <= tokens <= high


def test_max_turns_counts(tmp_path: Path, builtin_model_dir: Path) -> None:
    def conversation(turns: int) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "user" if t % 2 == 0 else "assistant", "content": f"turn {t}"}
                for t in range(turns)
            ]
        }

    rows = [conversation(2)] * 1 + [conversation(4), conversation(6), conversation(8)]
    source = write_jsonl(tmp_path / "m.jsonl", rows)
    result = run(tmp_path, builtin_model_dir, uri=str(source), filters={"maxTurns": 4})
    assert result.summary["filteredByReason"] == {"too-many-turns": 2}
