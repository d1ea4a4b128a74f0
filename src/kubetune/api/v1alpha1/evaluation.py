"""Evaluation, the gate before rollout, and export (merge, quantize)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel, Decimal, Fraction, Rule, SignedDecimal, Text, Uri
from kubetune.api.meta import SecretKeyRef
from kubetune.api.uris import DATASET_URI, ENDPOINT_URL, matches
from kubetune.api.v1alpha1.dataset import DatasetSpec


class GenerationSpec(ApiModel):
    """How answers are generated for the generation metrics."""

    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=32768)] = 128
    """Longest answer in tokens."""

    temperature: Decimal = "0"
    """Sampling temperature; "0" is greedy (reproducible)."""

    top_p: Fraction = "1.0"
    """Nucleus sampling threshold (with temperature above 0)."""


class Metric(str, Enum):
    """A family of evaluation metrics to compute."""

    PERPLEXITY = "Perplexity"
    BLEU = "BLEU"
    ROUGE = "ROUGE"
    BERT_SCORE = "BERTScore"
    EXACT_MATCH = "ExactMatch"
    JUDGE = "Judge"
    SUITE = "Suite"
    LM_EVAL = "LMEval"


class GateMetric(str, Enum):
    """A metric value a gate rule can test."""

    PERPLEXITY = "Perplexity"
    EVAL_LOSS = "EvalLoss"
    BLEU = "BLEU"
    ROUGE1 = "ROUGE1"
    ROUGE2 = "ROUGE2"
    ROUGEL = "ROUGEL"
    BERT_SCORE_F1 = "BERTScoreF1"
    EXACT_MATCH = "ExactMatch"
    JUDGE_SCORE = "JudgeScore"
    JUDGE_WIN_RATE = "JudgeWinRate"
    SUITE_ACCURACY = "SuiteAccuracy"


GATE_METRIC_SOURCE: dict[GateMetric, Metric] = {
    GateMetric.PERPLEXITY: Metric.PERPLEXITY,
    GateMetric.EVAL_LOSS: Metric.PERPLEXITY,
    GateMetric.BLEU: Metric.BLEU,
    GateMetric.ROUGE1: Metric.ROUGE,
    GateMetric.ROUGE2: Metric.ROUGE,
    GateMetric.ROUGEL: Metric.ROUGE,
    GateMetric.BERT_SCORE_F1: Metric.BERT_SCORE,
    GateMetric.EXACT_MATCH: Metric.EXACT_MATCH,
    GateMetric.JUDGE_SCORE: Metric.JUDGE,
    GateMetric.JUDGE_WIN_RATE: Metric.JUDGE,
    GateMetric.SUITE_ACCURACY: Metric.SUITE,
}
"""Which computed metric family produces each gate metric."""

_GATE_SOURCE_CEL = (
    "{" + ", ".join(f"'{g.value}': '{m.value}'" for g, m in GATE_METRIC_SOURCE.items()) + "}"
)


class GateOperator(str, Enum):
    """Comparison of a gate rule."""

    GE = ">="
    LE = "<="
    GT = ">"
    LT = "<"


class RelativeTo(str, Enum):
    """What a gate value is compared with."""

    ABSOLUTE = "Absolute"
    BASE = "Base"


class GateRule(ApiModel):
    """One condition the tuned model must meet before it may be deployed.

    With relativeTo Absolute the metric itself is compared with value; with Base the
    difference (tuned minus base) is, e.g. {metric: ROUGEL, operator: ">=", value: "0.02",
    relativeTo: Base} means at least 0.02 better than the base model.
    """

    metric: GateMetric
    """Metric to test; its family must be listed in evaluation.metrics."""

    operator: GateOperator
    """>=, <=, > or <."""

    value: SignedDecimal
    """Threshold, as a decimal string."""

    relative_to: RelativeTo = RelativeTo.ABSOLUTE
    """Absolute, or Base (compare tuned minus base)."""


class JudgeMode(str, Enum):
    """How the judge scores answers."""

    RUBRIC = "Rubric"
    PAIRWISE = "Pairwise"
    BOTH = "Both"


class JudgeSpec(ApiModel):
    """An LLM judge behind any OpenAI-compatible endpoint."""

    rules = (
        Rule(
            cel="self.endpoint.matches('" + ENDPOINT_URL + "')",
            message="must be an http:// or https:// URL of an OpenAI-compatible API",
            check=lambda j: matches(ENDPOINT_URL, j.endpoint),
            field_path=".endpoint",
        ),
    )

    endpoint: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    """Base URL of the API, e.g. https://api.openai.com/v1 or http://judge.ns.svc:8000/v1."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    """Model name sent to the endpoint."""

    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the API key; given to the pod as an environment variable."""

    mode: JudgeMode = JudgeMode.BOTH
    """Rubric (1-10 scores), Pairwise (base vs tuned, positions swapped) or Both."""

    rubric: Text | None = None
    """What the judge should look for (default: helpfulness, correctness, clarity)."""

    max_retries: Annotated[StrictInt, Field(ge=0, le=20)] = 3
    """Retries per request on errors and rate limits."""

    timeout_seconds: Annotated[StrictInt, Field(ge=1, le=3600)] = 60
    """Timeout per request."""

    max_concurrency: Annotated[StrictInt, Field(ge=1, le=256)] = 4
    """Requests in flight at once."""


class SuiteType(str, Enum):
    """How a benchmark suite is scored."""

    MULTIPLE_CHOICE = "MultipleChoice"
    GENERATION = "Generation"


class SuiteSpec(ApiModel):
    """A benchmark suite in JSONL (docs/evaluation.md describes the row format)."""

    rules = (
        Rule(
            cel="self.uri.matches('" + DATASET_URI + "')",
            message="must be s3://, pvc://, https://, hf://, file:// or a local path",
            check=lambda s: matches(DATASET_URI, s.uri),
            field_path=".uri",
        ),
    )

    name: Annotated[StrictStr, Field(min_length=1, max_length=63)]
    """Name shown in the report."""

    uri: Uri
    """The suite's JSONL file."""

    type: SuiteType = SuiteType.MULTIPLE_CHOICE
    """MultipleChoice (scored by log-likelihood) or Generation (scored by exact match)."""


class BERTScoreSpec(ApiModel):
    """The embedding model BERTScore uses."""

    model_uri: Uri = "builtin://all-minilm-l6-v2"
    """hf://, s3://, a local path, or builtin://all-minilm-l6-v2 (shipped, works offline)."""

    num_layers: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    """Layer whose embeddings are compared (default: the model's recommended layer)."""


class EvaluationSpec(ApiModel):
    """Evaluation of the base and the tuned model, and the gate before rollout."""

    rules = (
        Rule(
            cel="self.gate.all(g, " + _GATE_SOURCE_CEL + "[g.metric] in self.metrics)",
            message="every gate metric must be computed: add its family (e.g. ROUGE for "
            "ROUGEL, Perplexity for EvalLoss) to evaluation.metrics",
            check=lambda e: all(GATE_METRIC_SOURCE[g.metric] in e.metrics for g in e.gate),
            field_path=".gate",
        ),
        Rule(
            cel="!('Judge' in self.metrics) || has(self.judge)",
            message="metric Judge needs evaluation.judge (endpoint and model)",
            check=lambda e: Metric.JUDGE not in e.metrics or e.judge is not None,
            field_path=".judge",
        ),
        Rule(
            cel="!('Suite' in self.metrics) || size(self.suites) > 0",
            message="metric Suite needs at least one entry in evaluation.suites",
            check=lambda e: Metric.SUITE not in e.metrics or len(e.suites) > 0,
            field_path=".suites",
        ),
        Rule(
            cel="!('LMEval' in self.metrics) || size(self.lmEvalTasks) > 0",
            message="metric LMEval needs at least one entry in evaluation.lmEvalTasks",
            check=lambda e: Metric.LM_EVAL not in e.metrics or len(e.lm_eval_tasks) > 0,
            field_path=".lmEvalTasks",
        ),
        Rule(
            cel="self.compareBase || self.gate.all(g, g.relativeTo != 'Base')",
            message="a gate rule relative to Base needs evaluation.compareBase: true",
            check=lambda e: e.compare_base or all(g.relative_to != RelativeTo.BASE for g in e.gate),
            field_path=".gate",
        ),
    )

    metrics: Annotated[list[Metric], Field(max_length=8)] = [Metric.PERPLEXITY]
    """Metric families to compute on the validation set (or evalDataset)."""

    eval_dataset: DatasetSpec | None = None
    """A separate evaluation set, instead of the validation split."""

    max_samples: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 200
    """Evaluate on at most this many examples (generation metrics are slow)."""

    generation: GenerationSpec | None = None
    """Sampling settings for generated answers (default greedy, 128 new tokens)."""

    compare_base: bool = True
    """Also evaluate the base model, report deltas and side-by-side samples."""

    bert_score: BERTScoreSpec | None = Field(default=None, alias="bertScore")
    """BERTScore embedding model (default: the shipped all-MiniLM-L6-v2)."""

    judge: JudgeSpec | None = None
    """LLM-as-judge settings (metric Judge)."""

    suites: Annotated[list[SuiteSpec], Field(max_length=16)] = []
    """Benchmark suites (metric Suite)."""

    lm_eval_tasks: Annotated[
        list[Annotated[StrictStr, Field(min_length=1, max_length=128)]], Field(max_length=32)
    ] = []
    """lm-evaluation-harness task names (metric LMEval; needs the package and its data)."""

    gate: Annotated[list[GateRule], Field(max_length=16)] = []
    """Rules the tuned model must meet; a failed gate still publishes artifacts, but
    ModelDeployments refuse the run unless requireGate is false."""


class QuantScheme(str, Enum):
    """A vLLM-loadable quantized variant (compressed-tensors)."""

    W4A16 = "W4A16"
    W8A8 = "W8A8"
    FP8 = "FP8"


class ExportSpec(ApiModel):
    """Artifacts made after training: merged weights and quantized variants."""

    rules = (
        Rule(
            cel="self.quantize.all(q, self.quantize.exists_one(p, p == q))",
            message="each quantization scheme may be listed once",
            check=lambda x: len(set(x.quantize)) == len(x.quantize),
            field_path=".quantize",
        ),
    )

    merge: bool = False
    """Merge the adapter into the base weights (safetensors shards, vLLM-loadable)."""

    quantize: Annotated[list[QuantScheme], Field(max_length=3)] = []
    """Quantized variants to produce from the merged weights (W4A16, W8A8, FP8)."""

    calibration_samples: Annotated[StrictInt, Field(ge=1, le=100_000)] = 128
    """Training examples used to calibrate W4A16 and W8A8."""

    group_size: Annotated[StrictInt, Field(ge=8, le=1024)] | None = None
    """W4A16 group size (default: the largest of 128, 64 and 32 dividing every quantized
    layer's input dimension)."""
