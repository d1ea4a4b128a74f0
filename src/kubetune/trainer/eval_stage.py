"""The evaluation stage: what is measured on the base model before training and on the
tuned model after, the judge, and the files under RUN_URI/eval/.

Per model: Perplexity / EvalLoss, the generation metrics (ExactMatch, ROUGE, BLEU,
BERTScore) on one set of answers, and the benchmark suites. Then, with both models' answers
in hand, the LLM judge (rubric scores for each, pairwise win rate of tuned over base).
lm-evaluation-harness tasks run when that package and its data are available; otherwise
they are reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.v1alpha1.evaluation import (
    EvaluationSpec,
    GateMetric,
    GenerationSpec,
    Metric,
    SuiteSpec,
)
from kubetune.storage import RunLayout, Store
from kubetune.trainer import evaluate, faults
from kubetune.trainer.scoring import suites as suite_scoring

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kubetune.trainer.scoring.judge import JudgeResult

Log = Callable[[str], None]
GENERATIVE = (Metric.EXACT_MATCH, Metric.ROUGE, Metric.BLEU, Metric.BERT_SCORE, Metric.JUDGE)
BASE_SCORES = "eval/base.json"


@dataclass(frozen=True)
class EvalInputs:
    """What both models are measured on."""

    examples: list[dict[str, Any]]
    source: str
    suites: list[tuple[SuiteSpec, Path]] = field(default_factory=list)

    @property
    def conversations(self) -> list[dict[str, Any]]:
        return [e for e in self.examples if "messages" in e]


@dataclass
class ModelScores:
    """Metrics of one model, its answers, and its suite results."""

    metrics: dict[str, float] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "answers": self.answers, "suites": self.suites}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelScores:
        return cls(data["metrics"], data["answers"], data.get("suites", {}))


def prepare_inputs(
    evaluation: EvaluationSpec,
    validation: Path,
    eval_set: Path | None,
    work_dir: Path,
    log: Log,
) -> EvalInputs:
    """The examples (evalDataset when given, else the validation split, capped at
    maxSamples) and the fetched suite files; a bad suite or BERTScore model fails here,
    before training."""
    path, source = (eval_set, "evalDataset") if eval_set else (validation, "validation")
    examples = evaluate.load_examples(path, evaluation.max_samples)
    log(f"Evaluating on {len(examples)} examples of the {source} set")
    if Metric.BERT_SCORE in evaluation.metrics:
        from kubetune.trainer.scoring.bertscore import resolve_embedding_model

        resolve_embedding_model(evaluation.bert_score)  # a bad modelUri fails here
    suites: list[tuple[SuiteSpec, Path]] = []
    if Metric.SUITE in evaluation.metrics:
        suite_scoring.check_suite_names(evaluation.suites)
        for suite in evaluation.suites:
            local = suite_scoring.fetch_suite(suite, work_dir / "suites")
            suite_scoring.load_suite(local, suite.type, name=suite.name)  # validate every row
            suites.append((suite, local))
    return EvalInputs(examples, source, suites)


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: EvalInputs,
    evaluation: EvaluationSpec,
    batch_size: int,
    log: Log,
) -> ModelScores:
    """Every per-model metric of one model (the judge comes later, with both models)."""
    import math

    scores = ModelScores()
    metrics = evaluation.metrics
    if Metric.PERPLEXITY in metrics:
        loss = evaluate.eval_loss(model, tokenizer, inputs.examples, batch_size)
        scores.metrics[GateMetric.EVAL_LOSS.value] = loss
        scores.metrics[GateMetric.PERPLEXITY.value] = math.exp(min(loss, 50.0))
    conversations = inputs.conversations
    if any(m in metrics for m in GENERATIVE) and conversations:
        generation = evaluation.generation or GenerationSpec()
        scores.answers = evaluate.generate(model, tokenizer, conversations, generation, batch_size)
        references = [e["messages"][-1]["content"] for e in conversations]
        scores.metrics.update(evaluate.text_metrics(metrics, scores.answers, references))
        if Metric.BERT_SCORE in metrics:
            from kubetune.trainer.scoring.bertscore import bert_score

            scores.metrics.update(
                bert_score(scores.answers, references, evaluation.bert_score, log=log)
            )
    if inputs.suites:
        scores.metrics.update(
            _suites(model, tokenizer, inputs, evaluation, batch_size, scores, log)
        )
    shown = {k: v for k, v in scores.metrics.items() if "/" not in k}
    log("  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
    return scores


def _suites(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: EvalInputs,
    evaluation: EvaluationSpec,
    batch_size: int,
    scores: ModelScores,
    log: Log,
) -> dict[str, float]:
    """SuiteAccuracy (the mean over suites) and Suite/<name> per suite."""
    results = []
    for suite, path in inputs.suites:
        result = suite_scoring.run_suite(
            model,
            tokenizer,
            suite,
            path,
            batch_size=batch_size,
            max_samples=evaluation.max_samples,
            generation=evaluation.generation or GenerationSpec(),
            log=log,
        )
        results.append(result)
        scores.suites[suite.name] = _suite_json(result)
    return suite_scoring.suite_metrics(results)


def _suite_json(result: suite_scoring.SuiteResult) -> dict[str, Any]:
    return {
        "type": result.type.value,
        "accuracy": result.accuracy,
        "accuracyNorm": result.accuracy_norm,
        "n": result.n,
        "total": result.total,
        "predictions": result.predictions,
    }


def base_scores(
    store: Store,
    layout: RunLayout,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: EvalInputs,
    evaluation: EvaluationSpec,
    batch_size: int,
    log: Log,
) -> ModelScores:
    """The base model's scores, measured once per run (kept in eval/base.json, so a
    restarted pod does not measure it again)."""
    key = layout.key(BASE_SCORES)
    if store.exists(key):
        return ModelScores.from_json(json.loads(store.get_bytes(key)))
    if not evaluation.compare_base:
        return ModelScores()
    log("Evaluating the base model")
    scores = score_model(model, tokenizer, inputs, evaluation, batch_size, log)
    faults.reach("eval", 0)
    store.put_bytes(json.dumps(scores.to_json()).encode(), key)
    return scores


def run_judge(
    evaluation: EvaluationSpec,
    inputs: EvalInputs,
    base: ModelScores,
    tuned: ModelScores,
    log: Log,
) -> JudgeResult | None:
    """The LLM judge over both models' answers; its metrics are added to base and tuned.
    The base model against itself wins half of the time: its JudgeWinRate is 0.5."""
    faults.reach("eval", 1)
    if Metric.JUDGE not in evaluation.metrics or evaluation.judge is None:
        return None
    from kubetune.trainer.scoring.judge import conversation_text, judge

    conversations = inputs.conversations
    log(f"Judging {len(conversations)} answers with {evaluation.judge.model}")
    result = judge(
        evaluation.judge,
        [conversation_text(e["messages"][:-1]) for e in conversations],
        [e["messages"][-1]["content"] for e in conversations],
        tuned.answers,
        base.answers if base.answers else None,
        log=log,
    )
    tuned.metrics.update(result.metrics("tuned"))
    base_judged = result.metrics("base")
    if base_judged:
        base.metrics.update(base_judged)
        base.metrics[GateMetric.JUDGE_WIN_RATE.value] = 0.5
    return result


def lm_eval_skipped(evaluation: EvaluationSpec) -> dict[str, str]:
    """lm-evaluation-harness tasks that cannot run here, each with the reason."""
    if Metric.LM_EVAL not in evaluation.metrics:
        return {}
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        why = "lm-evaluation-harness (the lm_eval package) is not installed in the trainer image"
    else:
        why = "running lm-evaluation-harness tasks is not supported by this version of kubetune"
    return {task: why for task in evaluation.lm_eval_tasks}
