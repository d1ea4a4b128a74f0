"""The measurements evaluation is made of, and the gate.

Perplexity / EvalLoss (assistant tokens only, like training); greedy (or sampled)
generation; ExactMatch, ROUGE (rouge-score: ROUGE1/2/L F1) and BLEU (sacrebleu) of the
answers; the gate rules. `eval_stage` puts them together (with BERTScore, suites and the
judge from `scoring/`) for the base model before training and the tuned model after.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import (
    GateMetric,
    GateOperator,
    GateRule,
    GenerationSpec,
    Metric,
    RelativeTo,
)
from kubetune.trainer.tokenize import IGNORE_INDEX, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOWER_IS_BETTER = {GateMetric.PERPLEXITY.value, GateMetric.EVAL_LOSS.value}


class EvaluationError(Exception):
    """Evaluation cannot run as specified; carries the contract reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_examples(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first `limit` examples of a prepared file, as conversations or text; a
    preference pair counts as its prompt followed by the chosen answer."""
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            example = json.loads(line)
            if "chosen" in example:
                messages = example["prompt"] + example["chosen"]
                example = {"id": example.get("id"), "messages": messages}
            if "messages" in example or "text" in example:
                examples.append(example)
            if len(examples) >= limit:
                break
    return examples


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def eval_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    batch_size: int,
) -> float:
    """Mean loss per trained token (assistant answers, or all tokens of raw text)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    encoded = [tokenize_example(tokenizer, e) for e in examples]
    for batch in _batches(encoded, batch_size):
        width = max(len(e["input_ids"]) for e in batch)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor(
            [e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in batch]
        )
        mask = torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch]
        )
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # Prompt tuning prepends virtual tokens to the sequence: score the real ones only.
        logits = logits[:, logits.shape[1] - width :]
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(losses)
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    generation: GenerationSpec,
    batch_size: int,
) -> list[str]:
    """Greedy (or sampled) answers to each conversation's last user turn."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    prompts = [
        str(
            tokenizer.apply_chat_template(
                e["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
        )
        for e in examples
    ]
    temperature = parse_decimal(generation.temperature)
    prompt_learning = is_prompt_learning(model)
    if prompt_learning:
        # PEFT ignores position ids for prompt learning, so left-padded batches would get
        # shifted positions: generate one prompt at a time (no padding, positions exact).
        batch_size = 1
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in _batches(prompts, batch_size):
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.no_grad(), warnings.catch_warnings():
                if prompt_learning:
                    warnings.filterwarnings("ignore", message="Position ids are not supported")
                output = model.generate(  # type: ignore[operator]
                    **inputs,
                    max_new_tokens=generation.max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=parse_decimal(generation.top_p) if temperature > 0 else None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def is_prompt_learning(model: Any) -> bool:
    """Whether a PEFT model prepends virtual tokens (prompt or prefix tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def normalize_answer(text: str) -> str:
    """What ExactMatch compares: lower case, single spaces, no surrounding spaces or dots."""
    return " ".join(text.lower().split()).strip(" .")


def text_metrics(
    metrics: Sequence[Metric], predictions: list[str], references: list[str]
) -> dict[str, float]:
    """ExactMatch, ROUGE1/2/L (F1) and BLEU (0-1) of predictions against references."""
    out: dict[str, float] = {}
    if not predictions:
        return out
    if Metric.EXACT_MATCH in metrics:
        same = sum(
            normalize_answer(p) == normalize_answer(r)
            for p, r in zip(predictions, references, strict=True)
        )
        out[GateMetric.EXACT_MATCH.value] = same / len(predictions)
    if Metric.ROUGE in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
        for key, name in (("rouge1", "ROUGE1"), ("rouge2", "ROUGE2"), ("rougeL", "ROUGEL")):
            out[name] = sum(s[key].fmeasure for s in scores) / len(scores)
    if Metric.BLEU in metrics:
        import sacrebleu

        out[GateMetric.BLEU.value] = sacrebleu.corpus_bleu(predictions, [references]).score / 100
    return out


def _passes(value: float, operator: GateOperator, threshold: float) -> bool:
    return {
        GateOperator.GE: value >= threshold,
        GateOperator.LE: value <= threshold,
        GateOperator.GT: value > threshold,
        GateOperator.LT: value < threshold,
    }[operator]


@dataclass(frozen=True)
class GateOutcome:
    """One gate rule, what was compared, and whether it passed. `value` is None when the
    metric could not be computed (e.g. every judge answer unparseable): the rule fails."""

    rule: GateRule
    value: float | None
    passed: bool

    def describe(self) -> str:
        subject = self.rule.metric.value
        if self.rule.relative_to == RelativeTo.BASE:
            subject += " - base"
        verdict = "passed" if self.passed else "FAILED"
        shown = "not computed" if self.value is None else f"{self.value:.4f}"
        return f"{subject} = {shown} {self.rule.operator.value} {self.rule.value}: {verdict}"


def check_gate(
    rules: list[GateRule], tuned: dict[str, float], base: dict[str, float]
) -> list[GateOutcome]:
    """Evaluate the gate rules (relativeTo Base compares tuned minus base). A rule whose
    metric is missing on either side fails: a gate never passes on what was not measured."""
    outcomes = []
    for rule in rules:
        key = rule.metric.value
        value: float | None = tuned.get(key)
        if rule.relative_to == RelativeTo.BASE:
            value = None if value is None or key not in base else value - base[key]
        passed = value is not None and _passes(value, rule.operator, parse_decimal(rule.value))
        outcomes.append(GateOutcome(rule, value, passed))
    return outcomes
