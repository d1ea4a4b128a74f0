"""Evaluation measurements on hand-checked examples, and the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.v1alpha1.evaluation import GateRule, Metric
from kubetune.trainer.evaluate import check_gate, eval_loss, normalize_answer, text_metrics


def test_exact_match_normalizes_case_spaces_and_final_period() -> None:
    assert normalize_answer("  Canberra. ") == normalize_answer("canberra")
    assert normalize_answer("2021-03-05") != normalize_answer("2021-03-06")
    values = text_metrics(
        [Metric.EXACT_MATCH], ["2021-03-05", "The date is 2021-03-05."], ["2021-03-05"] * 2
    )
    assert values == {"ExactMatch": 0.5}


def test_rouge_by_hand() -> None:
    # prediction: 3 tokens, all in the 6-token reference.
    # ROUGE1: P 3/3, R 3/6 -> F1 2/3; ROUGE2: 2 of 2 predicted bigrams among the 5
    # reference bigrams -> P 1, R 2/5 -> F1 4/7; ROUGEL: LCS 3 -> F1 2/3.
    values = text_metrics([Metric.ROUGE], ["the cat sat"], ["the cat sat on the mat"])
    assert values["ROUGE1"] == pytest.approx(2 / 3)
    assert values["ROUGE2"] == pytest.approx(4 / 7)
    assert values["ROUGEL"] == pytest.approx(2 / 3)


def test_bleu_is_on_a_zero_to_one_scale() -> None:
    same = "the quick brown fox jumps over the lazy dog"
    assert text_metrics([Metric.BLEU], [same], [same])["BLEU"] == pytest.approx(1.0)
    assert text_metrics([Metric.BLEU], ["alpha beta gamma delta"], [same])["BLEU"] == 0.0


def test_no_predictions_no_metrics() -> None:
    assert text_metrics([Metric.EXACT_MATCH, Metric.ROUGE], [], []) == {}


def test_eval_loss_is_the_mean_cross_entropy_of_the_answer_tokens(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.tokenize import IGNORE_INDEX, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [
        {
            "messages": [
                {"role": "user", "content": f"Rewrite 5 March 20{i}0 as an ISO date."},
                {"role": "assistant", "content": f"20{i}0-03-05"},
            ]
        }
        for i in range(3)
    ]
    # By hand: one example at a time, no padding, sum of -log p over answer tokens.
    total, count = 0.0, 0
    for example in examples:
        encoded = tokenize_example(tokenizer, example)
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        for position, label in enumerate(encoded["labels"][1:], start=1):
            if label != IGNORE_INDEX:
                total -= float(logprobs[position - 1, label])
                count += 1
    assert count > 0
    # Batched with padding (batch size 2 pads the shorter rows) gives the same number.
    assert eval_loss(model, tokenizer, examples, batch_size=2) == pytest.approx(
        total / count, rel=1e-5
    )


def rule(metric: str, op: str, value: str, relative: str = "Absolute") -> GateRule:
    return GateRule.model_validate(
        {"metric": metric, "operator": op, "value": value, "relativeTo": relative}
    )


def test_gate_rules_absolute_and_relative_to_base() -> None:
    tuned = {"ROUGEL": 0.62, "Perplexity": 1.05}
    base = {"ROUGEL": 0.31, "Perplexity": 1.97}
    outcomes = check_gate(
        [
            rule("ROUGEL", ">=", "0.3", "Base"),  # 0.31 >= 0.3
            rule("Perplexity", "<", "-0.9", "Base"),  # -0.92 < -0.9
            rule("Perplexity", "<=", "1.0"),  # 1.05 <= 1.0 fails
            rule("ROUGEL", ">", "0.62"),  # strict: fails at equality
        ],
        tuned,
        base,
    )
    assert [o.passed for o in outcomes] == [True, True, False, False]
    assert outcomes[0].value == pytest.approx(0.31)
    assert outcomes[1].value == pytest.approx(-0.92)
    assert outcomes[2].describe() == "Perplexity = 1.0500 <= 1.0: FAILED"
    assert outcomes[0].describe() == "ROUGEL - base = 0.3100 >= 0.3: passed"


def test_a_metric_that_was_not_computed_fails_its_rule() -> None:
    outcomes = check_gate(
        [rule("JudgeScore", ">=", "5"), rule("JudgeScore", ">=", "0", "Base")],
        {"JudgeScore": 7.0},
        {},  # the base model's answers could not be judged
    )
    assert [o.passed for o in outcomes] == [True, False]
    assert outcomes[1].value is None
    assert "not computed" in outcomes[1].describe()
    missing = check_gate([rule("BERTScoreF1", ">=", "0")], {}, {})
    assert not missing[0].passed
