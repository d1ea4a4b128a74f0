"""Benchmark suites: row checks, log-likelihood and exact-match scoring, the built-in suite."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import GenerationSpec, SuiteSpec, SuiteType
from kubetune.trainer.data.builtin import quickstart_rows
from kubetune.trainer.evaluate import EvaluationError, generate
from kubetune.trainer.scoring import choice_likelihood, suites
from kubetune.trainer.scoring.builtin_suites import (
    QUICKSTART_SUITE_ITEMS,
    quickstart_suite_rows,
)
from kubetune.trainer.scoring.choice_likelihood import choice_logprobs
from kubetune.trainer.scoring.suite_rows import ChoiceItem, load_suite
from kubetune.trainer.scoring.suites import (
    SuiteResult,
    check_suite_names,
    fetch_suite,
    run_suite,
    suite_metrics,
)

MC = SuiteType.MULTIPLE_CHOICE
GEN = SuiteType.GENERATION

MC_ROWS: list[dict[str, Any]] = [
    {"id": "q1", "question": "What is 2 + 2?", "choices": ["4", "5", "22"], "answer": 0},
    {
        "id": "q2",
        "messages": [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "Capital of Italy?"},
        ],
        "choices": ["Rome", "Milan", "Rome, of course, the eternal city", "Naples"],
        "answer": 0,
    },
    {
        "question": "Rewrite 5 March 1921 as YYYY-MM-DD.",
        "choices": ["1921-03-05", "1921-05-03"],
        "answer": 1,
    },
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.resolve import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(tiny_model_dir)


# --- Row format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "suite_type", "expected"),
    [
        pytest.param([1, 2], MC, "a row must be a JSON object", id="not-an-object"),
        pytest.param(
            {"choices": ["a", "b"], "answer": 0}, MC, 'exactly one of "question"', id="no-prompt"
        ),
        pytest.param(
            {"question": "q", "messages": [], "choices": ["a", "b"], "answer": 0},
            MC,
            'exactly one of "question"',
            id="both-prompts",
        ),
        pytest.param(
            {"question": " ", "choices": ["a", "b"], "answer": 0},
            MC,
            '"question" must be non-empty text',
            id="blank-question",
        ),
        pytest.param(
            {"messages": [{"role": "robot", "content": "x"}], "choices": ["a", "b"], "answer": 0},
            MC,
            "turn 1 needs a role",
            id="bad-role",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ],
                "choices": ["a", "b"],
                "answer": 0,
            },
            MC,
            "must end with a user turn",
            id="ends-with-assistant",
        ),
        pytest.param(
            {"question": "q", "answer": 0}, MC, '"choices" must be a list', id="no-choices"
        ),
        pytest.param(
            {"question": "q", "choices": ["a"], "answer": 0}, MC, "at least two", id="one-choice"
        ),
        pytest.param(
            {"question": "q", "choices": ["a", ""], "answer": 0},
            MC,
            "choice 1 must be non-empty text",
            id="empty-choice",
        ),
        pytest.param(
            {"question": "q", "choices": ["a", "a"], "answer": 0},
            MC,
            "same text twice",
            id="duplicate-choice",
        ),
        pytest.param(
            {"question": "q", "choices": ["a", "b"]},
            MC,
            '"answer" must be the 0-based index',
            id="no-answer",
        ),
        pytest.param(
            {"question": "q", "choices": ["a", "b"], "answer": "a"}, MC, "got 'a'", id="answer-text"
        ),
        pytest.param(
            {"question": "q", "choices": ["a", "b"], "answer": True},
            MC,
            "got True",
            id="answer-bool",
        ),
        pytest.param(
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            MC,
            '"answer" 2 is not an index of the 2 choices',
            id="answer-out-of-range",
        ),
        pytest.param(
            {"id": 1.5, "question": "q", "choices": ["a", "b"], "answer": 0},
            MC,
            '"id" must be text or an integer',
            id="bad-id",
        ),
        pytest.param(
            {"question": "q"}, GEN, '"answer" must be the expected text', id="generation-no-answer"
        ),
        pytest.param(
            {"question": "q", "answer": 3},
            GEN,
            '"answer" must be the expected text',
            id="generation-answer-number",
        ),
        pytest.param(
            {"question": "q", "answer": ["ok", ""]},
            GEN,
            '"answer" item 1 must be non-empty',
            id="generation-empty-alternative",
        ),
        pytest.param(
            {"question": "q", "choices": ["a", "b"], "answer": "a"},
            GEN,
            '"choices" belongs to MultipleChoice',
            id="generation-with-choices",
        ),
    ],
)
def test_invalid_rows_are_reported_with_file_and_line(
    tmp_path: Path, row: Any, suite_type: SuiteType, expected: str
) -> None:
    good = {"question": "ok?", "choices": ["a", "b"], "answer": 0}
    if suite_type == GEN:
        good = {"question": "ok?", "answer": "yes"}
    path = write_jsonl(tmp_path / "suite.jsonl", [good, row])
    with pytest.raises(EvaluationError) as err:
        load_suite(path, suite_type, name="mine")
    assert err.value.reason == Reason.DATASET_INVALID
    assert f"{path}:2: " in str(err.value)
    assert expected in str(err.value)
    assert "suite 'mine'" in str(err.value)
    assert f"{path}:1:" not in str(err.value)


def test_every_bad_row_is_listed_and_none_is_skipped(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "suite.jsonl",
        [
            MC_ROWS[0],
            "{not json",
            "",
            {"id": "q1", "question": "again", "choices": ["a", "b"], "answer": 1},
            {"question": "q", "choices": ["a", "b"], "answer": 5},
        ],
    )
    with pytest.raises(EvaluationError) as err:
        load_suite(path, MC)
    message = str(err.value)
    assert "3 invalid row(s)" in message
    assert f"{path}:2: invalid JSON" in message
    assert f'{path}:4: "id" q1 is already used on line 1' in message
    assert f"{path}:5: " in message
    assert f"{path}:3" not in message  # a blank line is not a row


def test_valid_rows_and_default_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "suite.jsonl", [*MC_ROWS[:2], "", MC_ROWS[2]])
    items = load_suite(path, MC)
    assert [i.id for i in items] == ["q1", "q2", "4"]
    first = items[0]
    assert isinstance(first, ChoiceItem)
    assert first.messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert (first.choices, first.answer, first.where) == (("4", "5", "22"), 0, f"{path}:1")
    generation = load_suite(
        write_jsonl(tmp_path / "gen.jsonl", [{"question": "q", "answer": ["a", "A."]}]), GEN
    )
    assert generation[0].answers == ("a", "A.")  # type: ignore[union-attr]


def test_an_empty_suite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(EvaluationError) as err:
        load_suite(path, MC)
    assert err.value.reason == Reason.DATASET_EMPTY


# --- Multiple choice: log-likelihood ----------------------------------------------------


def brute_force_logprob(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], choice: str
) -> float:
    """One unpadded sequence at a time: prompt tokens, then the answer and its end marker."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": choice}], tokenize=False
    ).rstrip("\n")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(full_ids[len(prompt_ids) :]) == choice + "<|im_end|>"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].float()
    logprobs = logits.log_softmax(dim=-1)
    return sum(float(logprobs[t - 1, full_ids[t]]) for t in range(len(prompt_ids), len(full_ids)))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_choice_logprobs_match_an_unbatched_computation(
    tmp_path: Path, tiny: tuple[Any, Any], batch_size: int
) -> None:
    model, tokenizer = tiny
    items = load_suite(write_jsonl(tmp_path / "s.jsonl", MC_ROWS), MC)
    choice_items = [i for i in items if isinstance(i, ChoiceItem)]
    got = choice_logprobs(model, tokenizer, choice_items, batch_size)
    for item, scores in zip(choice_items, got, strict=True):
        expected = [brute_force_logprob(model, tokenizer, item.messages, c) for c in item.choices]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_whole_sequence_scoring_matches_too(
    tmp_path: Path, tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    items = [
        i
        for i in load_suite(write_jsonl(tmp_path / "s.jsonl", MC_ROWS), MC)
        if isinstance(i, ChoiceItem)
    ]
    shared = choice_logprobs(model, tokenizer, items, 4)
    monkeypatch.setattr(choice_likelihood, "is_prompt_learning", lambda _: True)
    whole = choice_logprobs(model, tokenizer, items, 4)
    for a, b in zip(shared, whole, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize(
    ("sequences", "expected"),
    [
        pytest.param([([1, 2, 3, 9], 3), ([1, 2, 3, 8, 9], 3)], 3, id="whole-prompt"),
        pytest.param([([1, 2, 3, 9], 3), ([1, 2, 4, 9], 3)], 2, id="boundary-token-differs"),
        pytest.param([([5, 2, 9], 2), ([6, 2, 9], 2)], 0, id="nothing-shared"),
    ],
)
def test_shared_prompt_length(sequences: list[Any], expected: int) -> None:
    assert choice_likelihood._shared_length(sequences) == expected


@pytest.mark.parametrize(
    ("sizes", "batch_size", "expected"),
    [
        pytest.param([4, 4, 4], 8, [[0, 1], [2]], id="two-per-batch"),
        pytest.param([4, 4, 4], 3, [[0], [1], [2]], id="an-item-larger-than-a-batch"),
        pytest.param([2, 5, 1], 6, [[0], [1, 2]], id="uneven"),
    ],
)
def test_items_are_grouped_by_choices_per_batch(
    sizes: list[int], batch_size: int, expected: list[list[int]]
) -> None:
    order = list(range(len(sizes)))
    assert choice_likelihood._groups(order, sizes, batch_size) == expected


def test_a_lora_model_is_scored_like_its_merged_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.resolve import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    items = [
        i
        for i in load_suite(write_jsonl(tmp_path / "s.jsonl", MC_ROWS), MC)
        if isinstance(i, ChoiceItem)
    ]
    scored = choice_logprobs(model, tokenizer, items, 16)
    merged = model.merge_and_unload().eval()
    for item, sums in zip(items, scored, strict=True):
        expected = [brute_force_logprob(merged, tokenizer, item.messages, c) for c in item.choices]
        assert sums == pytest.approx(expected, abs=1e-4)


def test_prompt_tuning_scores_the_real_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.resolve import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    items = [
        i
        for i in load_suite(write_jsonl(tmp_path / "s.jsonl", MC_ROWS), MC)
        if isinstance(i, ChoiceItem)
    ]
    one_by_one = choice_logprobs(model, tokenizer, items, 1)
    batched = choice_logprobs(model, tokenizer, items, 5)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    with model.disable_adapter():
        plain = choice_logprobs(model, tokenizer, items, 5)
    assert plain != batched  # the virtual tokens are in the context


def test_run_suite_picks_the_most_likely_choice(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    path = write_jsonl(tmp_path / "s.jsonl", MC_ROWS)
    spec = SuiteSpec(name="tiny", uri=str(path))
    lines: list[str] = []
    result = run_suite(
        model,
        tokenizer,
        spec,
        path,
        batch_size=4,
        max_samples=100,
        generation=None,
        log=lines.append,
    )
    items = [i for i in load_suite(path, MC) if isinstance(i, ChoiceItem)]
    hits, hits_norm = [], []
    for item, record in zip(items, result.predictions, strict=True):
        sums = [brute_force_logprob(model, tokenizer, item.messages, c) for c in item.choices]
        per_byte = [s / len(c.encode()) for s, c in zip(sums, item.choices, strict=True)]
        assert record["prediction"] == max(range(len(sums)), key=sums.__getitem__)
        assert record["predictionNorm"] == max(range(len(sums)), key=per_byte.__getitem__)
        hits.append(record["prediction"] == item.answer)
        hits_norm.append(record["predictionNorm"] == item.answer)
    assert result.accuracy == pytest.approx(sum(hits) / 3)
    assert result.accuracy_norm == pytest.approx(sum(hits_norm) / 3)
    assert (result.n, result.total) == (3, 3)
    assert lines == [
        f"Suite tiny: accuracy {result.accuracy:.4f}, accuracy_norm "
        f"{result.accuracy_norm:.4f} (3 of 3)"
    ]
    cut = run_suite(
        model, tokenizer, spec, path, batch_size=4, max_samples=2, generation=None, log=lines.append
    )
    assert (cut.n, cut.total, [p["id"] for p in cut.predictions]) == (2, 3, ["q1", "q2"])


# --- Generation: exact match ------------------------------------------------------------


def test_generation_answers_are_the_models_greedy_answers(
    tmp_path: Path, tiny: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny
    rows = [{"question": q, "answer": "placeholder"} for q in ("Say hello.", "2 + 2?", "Hue?")]
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    spec = GenerationSpec(max_new_tokens=4)
    result = run_suite(
        model,
        tokenizer,
        SuiteSpec(name="gen", uri=str(path), type=GEN),
        path,
        batch_size=2,
        max_samples=10,
        generation=spec,
        log=print,
    )
    conversations = [
        {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": "?"},
            ]
        }
        for r in rows
    ]
    expected = generate(model, tokenizer, conversations, spec, 1)
    assert [p["prediction"] for p in result.predictions] == expected
    assert result.accuracy == 0.0


def test_generation_is_scored_by_normalized_exact_match(
    tmp_path: Path, tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    prompts: list[Any] = []

    def answer(_model: Any, _tok: Any, examples: list[Any], *_: Any) -> list[str]:
        prompts.extend(e["messages"][:-1] for e in examples)
        return ["Hello.", "4", "Blue sky at noon"]

    monkeypatch.setattr(suites, "generate", answer)
    path = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"id": "case-and-period", "question": "Say hello.", "answer": "  HELLO "},
            {"id": "alternatives", "question": "2 + 2?", "answer": ["four", "4."]},
            {
                "id": "wrong",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hue?"},
                ],
                "answer": "blue",
            },
        ],
    )
    result = run_suite(
        model,
        tokenizer,
        SuiteSpec(name="gen", uri=str(path), type=GEN),
        path,
        batch_size=2,
        max_samples=10,
        generation=None,
        log=print,
    )
    assert [p["correct"] for p in result.predictions] == [True, True, False]
    assert prompts[2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hue?"},
    ]
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.accuracy_norm is None
    assert result.metrics() == {"Suite/gen": pytest.approx(2 / 3)}


# --- Metrics ----------------------------------------------------------------------------


def test_suite_accuracy_is_the_mean_over_suites() -> None:
    results = [
        SuiteResult("big", MC, accuracy=0.5, n=1000, total=1000, accuracy_norm=0.75),
        SuiteResult("small", GEN, accuracy=1.0, n=2, total=2),
    ]
    assert suite_metrics(results) == {
        "SuiteAccuracy": 0.75,
        "Suite/big": 0.5,
        "Suite/big/AccuracyNorm": 0.75,
        "Suite/small": 1.0,
    }
    assert suite_metrics([]) == {}


def test_suite_names_must_differ(tmp_path: Path) -> None:
    check_suite_names([SuiteSpec(name="a", uri="x.jsonl"), SuiteSpec(name="b", uri="x.jsonl")])
    with pytest.raises(EvaluationError, match="'a' is used twice"):
        check_suite_names([SuiteSpec(name="a", uri="x.jsonl"), SuiteSpec(name="a", uri="y")])


# --- Fetching ---------------------------------------------------------------------------


def test_fetch_a_local_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", MC_ROWS)
    assert fetch_suite(SuiteSpec(name="s", uri=str(path)), tmp_path / "work") == path
    assert fetch_suite(SuiteSpec(name="s", uri=f"file://{path}"), tmp_path / "work") == path


@pytest.mark.parametrize(
    ("make", "reason", "expected"),
    [
        pytest.param(
            lambda d: str(d / "missing.jsonl"),
            Reason.SOURCE_NOT_FOUND,
            "no file found",
            id="missing",
        ),
        pytest.param(
            lambda d: (
                write_jsonl(d / "a.jsonl", MC_ROWS),
                write_jsonl(d / "b.jsonl", MC_ROWS),
                str(d),
            )[-1],
            Reason.INVALID_SPEC,
            "matches 2 files",
            id="folder-of-two",
        ),
        pytest.param(
            lambda d: (d / "s.csv").write_text("question\nq\n") and str(d / "s.csv"),
            Reason.DATASET_INVALID,
            "must be a JSONL file",
            id="csv",
        ),
        pytest.param(
            lambda d: "builtin://nope",
            Reason.SOURCE_NOT_FOUND,
            "builtin://quickstart-suite",
            id="unknown-builtin",
        ),
        pytest.param(
            lambda d: "hf://someone/benchmark",
            Reason.SOURCE_NOT_FOUND,
            "HF_HUB_OFFLINE=1",
            id="hf-offline",
        ),
    ],
)
def test_fetch_refusals_name_the_field(
    tmp_path: Path, make: Any, reason: Reason, expected: str
) -> None:
    uri = make(tmp_path)
    with pytest.raises(EvaluationError) as err:
        fetch_suite(SuiteSpec(name="mine", uri=uri), tmp_path / "work")
    assert err.value.reason == reason
    assert expected in str(err.value)
    assert "evaluation.suites[" in str(err.value)


def test_suite_names_do_not_leave_the_work_folder(tmp_path: Path) -> None:
    spec = SuiteSpec(name="../../escape", uri="builtin://quickstart-suite")
    path = fetch_suite(spec, tmp_path / "work")
    assert path.parent == tmp_path / "work"


def test_a_builtin_suite_must_be_scored_its_way(tmp_path: Path) -> None:
    spec = SuiteSpec(name="q", uri="builtin://quickstart-suite", type=GEN)
    with pytest.raises(EvaluationError, match="type: MultipleChoice"):
        fetch_suite(spec, tmp_path)


# --- The built-in quickstart suite ------------------------------------------------------


def test_quickstart_suite_is_deterministic_and_valid(tmp_path: Path) -> None:
    spec = SuiteSpec(name="quickstart", uri="builtin://quickstart-suite")
    path = fetch_suite(spec, tmp_path / "a")
    assert path.is_relative_to(tmp_path / "a")
    assert path.read_bytes() == fetch_suite(spec, tmp_path / "b").read_bytes()
    items = load_suite(path, MC)
    assert len(items) == QUICKSTART_SUITE_ITEMS
    positions = [0, 0, 0, 0]
    for item in items:
        assert isinstance(item, ChoiceItem)
        assert len(set(item.choices)) == 4
        correct = item.choices[item.answer]
        date = dt.date.fromisoformat(correct)
        year, month, day = correct.split("-")
        wrong = sorted(c for c in item.choices if c != correct)
        iso_shaped = [c for c in wrong if re.fullmatch(r"\d{4}-\d{2}-\d{2}", c)]
        assert f"{year}-{day}-{month}" in iso_shaped  # day and month swapped
        assert any(c.endswith(f"-{month}-{day}") and c[:4] != year for c in iso_shaped)
        assert len(iso_shaped) == 2  # the third mistake is a non-ISO format
        positions[item.answer] += 1
        instruction, _, spelled = item.messages[0]["content"].partition("\n\n")
        assert "YYYY-MM-DD" in instruction
        assert str(date.year) in spelled
    assert positions == [10, 10, 10, 10]


def test_quickstart_suite_dates_are_not_in_the_training_data() -> None:
    trained = {row["output"] for row in quickstart_rows()}
    trained_inputs = {row["input"] for row in quickstart_rows()}
    rows = list(quickstart_suite_rows())
    asked = {row["choices"][row["answer"]] for row in rows}
    assert len(asked) == len(rows)
    assert not asked & trained
    assert not {r["question"].partition("\n\n")[2] for r in rows} & trained_inputs
    assert max(dt.date.fromisoformat(d) for d in asked) < min(
        dt.date.fromisoformat(d) for d in trained
    )


@pytest.fixture
def one_torch_thread() -> Any:
    """The CI machine's two cores are shared: two intra-op threads competing with another
    process make this model run about ten times slower than one thread."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_quickstart_suite_on_the_builtin_model(tmp_path: Path, builtin_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.resolve import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()
    tokenizer = load_tokenizer(builtin_model_dir)
    spec = SuiteSpec(name="quickstart", uri="builtin://quickstart-suite")
    path = fetch_suite(spec, tmp_path)
    start = time.perf_counter()
    result = run_suite(
        model, tokenizer, spec, path, batch_size=8, max_samples=200, generation=None, log=print
    )
    print(
        f"SmolLM2-135M-Instruct on builtin://quickstart-suite: accuracy {result.accuracy:.3f}, "
        f"accuracy_norm {result.accuracy_norm:.3f}, {time.perf_counter() - start:.1f} s"
    )
    assert result.n == QUICKSTART_SUITE_ITEMS
    assert 0.25 < result.accuracy <= 1.0  # better than chance; the exact value is the base's
    metrics = suite_metrics([result])
    assert metrics["SuiteAccuracy"] == metrics["Suite/quickstart"] == result.accuracy
