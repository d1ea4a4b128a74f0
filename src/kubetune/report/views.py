"""What the report and the terminal summary show, derived from `RunArtifacts`: metric rows
with their direction, the gate, judge counts, suites, quantized variants and artifact
groups. Pure functions; the HTML and text renderers only format these.

The `eval/metrics.json` keys read here (every one optional; unknown keys are ignored)::

    base, tuned, delta   {metric: number}; metric keys as in METRIC_ORDER, plus
                         "Suite/<name>[/AccuracyNorm]" and any other name (shown last)
    gate                 [{"rule": {metric, operator, value, relativeTo}, "value", "passed"}]
    gatePassed           bool (the verdict when `gate` is empty)
    examples, source     how many examples were evaluated, and from where
    skipped              {metric: "why it was not computed"}
    judge                {"model", "requests", "promptTokens", "completionTokens",
                          "rubric": {"base" | "tuned": {"mean", "scored", "unparseable",
                          "failed"}}, "pairwise": {"winRate", "wins", "ties", "losses",
                          "inconsistent", "unparseable", "failed"}}
    suites               {name: {"base" | "tuned": {"type", "accuracy", "n", …} or number}}
    merged               {"sizeBytes", "perplexity"}
    quantized            {scheme: {"sizeBytes", "perplexity", "perplexityDelta",
                          "referencePerplexity", "seconds", "groupSize", "format",
                          "calibrationSamples"} or {"skipped": "why"}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.report.artifacts import RunArtifacts
from kubetune.storage.manifest import FileEntry

METRIC_ORDER = (
    "EvalLoss",
    "Perplexity",
    "BLEU",
    "ROUGE1",
    "ROUGE2",
    "ROUGEL",
    "BERTScoreP",
    "BERTScoreR",
    "BERTScoreF1",
    "ExactMatch",
    "JudgeScore",
    "JudgeWinRate",
    "SuiteAccuracy",
)
"""Known metrics, in the order the report lists them; `Suite/<name>` rows follow
SuiteAccuracy, other keys (e.g. `LMEval/<task>`) come last, sorted."""

LOWER_IS_BETTER = frozenset({"EvalLoss", "Perplexity"})

METRIC_HELP = {
    "EvalLoss": "mean cross-entropy per answer token (lower is better)",
    "Perplexity": "exp(EvalLoss) (lower is better)",
    "BLEU": "corpus BLEU of generated answers, 0-1",
    "ROUGE1": "unigram overlap F1 with the reference, 0-1",
    "ROUGE2": "bigram overlap F1 with the reference, 0-1",
    "ROUGEL": "longest-common-subsequence F1 with the reference, 0-1",
    "BERTScoreP": "BERTScore precision (embedding similarity), 0-1",
    "BERTScoreR": "BERTScore recall (embedding similarity), 0-1",
    "BERTScoreF1": "BERTScore F1 (embedding similarity), 0-1",
    "ExactMatch": "share of answers equal to the reference (case and spacing ignored)",
    "JudgeScore": "mean rubric score given by the LLM judge, 1-10",
    "JudgeWinRate": "share of pairwise comparisons the tuned model wins (ties count half)",
    "SuiteAccuracy": "mean accuracy over the benchmark suites, 0-1",
}

Direction = Literal["better", "worse", "same"]


@dataclass(frozen=True)
class MetricRow:
    """One metric of the base and the tuned model."""

    name: str
    base: float | None
    tuned: float | None
    delta: float | None
    lower_is_better: bool

    @property
    def direction(self) -> Direction | None:
        """Whether the tuned model is better than the base on this metric."""
        if self.delta is None:
            return None
        if self.delta == 0:
            return "same"
        improved = self.delta < 0 if self.lower_is_better else self.delta > 0
        return "better" if improved else "worse"

    @property
    def help(self) -> str:
        """A one-line description of the metric."""
        if self.name.startswith("Suite/") and self.name.endswith("/AccuracyNorm"):
            suite = self.name[6 : -len("/AccuracyNorm")]
            return f"length-normalized accuracy on the benchmark suite {suite}, 0-1"
        if self.name.startswith("Suite/"):
            return f"accuracy on the benchmark suite {self.name[6:]}, 0-1"
        return METRIC_HELP.get(self.name, "")


def number(value: Any) -> float | None:
    """A finite number from JSON, else None (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def section(container: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """`container[name]` when it is a JSON object, else an empty mapping."""
    value = container.get(name)
    return value if isinstance(value, Mapping) else {}


def _order(name: str) -> tuple[int, str]:
    if name in METRIC_ORDER:
        return METRIC_ORDER.index(name), ""
    if name.startswith("Suite/"):
        return METRIC_ORDER.index("SuiteAccuracy"), name
    return len(METRIC_ORDER), name


def metric_rows(metrics: Mapping[str, Any]) -> list[MetricRow]:
    """Base, tuned and delta of every numeric metric, in report order.

    The delta is `metrics["delta"][name]` when recorded, else tuned minus base.
    """
    base, tuned, delta = (section(metrics, k) for k in ("base", "tuned", "delta"))
    names = {k for k in (*base, *tuned) if number(base.get(k)) is not None}
    names |= {k for k in tuned if number(tuned.get(k)) is not None}
    rows = []
    for name in sorted(names, key=_order):
        b, t = number(base.get(name)), number(tuned.get(name))
        d = number(delta.get(name))
        if d is None and b is not None and t is not None:
            d = t - b
        rows.append(MetricRow(name, b, t, d, name in LOWER_IS_BETTER))
    return rows


@dataclass(frozen=True)
class GateCheck:
    """One gate rule and its outcome."""

    metric: str
    operator: str
    threshold: str
    relative_to: str
    value: float | None
    passed: bool | None

    @property
    def subject(self) -> str:
        """What was compared: `ROUGEL`, or `ROUGEL - base` for rules relative to Base."""
        return f"{self.metric} - base" if self.relative_to == "Base" else self.metric


def gate_checks(metrics: Mapping[str, Any]) -> list[GateCheck]:
    """The gate outcomes recorded in `metrics.json` (`gate: [{rule, value, passed}]`)."""
    checks = []
    outcomes = metrics.get("gate")
    for outcome in outcomes if isinstance(outcomes, list) else []:
        if not isinstance(outcome, Mapping):
            continue
        rule = section(outcome, "rule")
        passed = outcome.get("passed")
        checks.append(
            GateCheck(
                metric=str(rule.get("metric", "?")),
                operator=str(rule.get("operator", "?")),
                threshold=str(rule.get("value", "?")),
                relative_to=str(rule.get("relativeTo", "Absolute")),
                value=number(outcome.get("value")),
                passed=passed if isinstance(passed, bool) else None,
            )
        )
    return checks


Verdict = Literal["passed", "failed", "none"]


def gate_verdict(run: RunArtifacts) -> Verdict:
    """`failed` if any rule failed, `passed` if all passed, `none` without a gate
    (`gatePassed` of metrics.json or of the lineage decides when there are no outcomes)."""
    checks = gate_checks(run.metrics)
    if checks:
        return "failed" if any(c.passed is not True for c in checks) else "passed"
    recorded = run.metrics.get("gatePassed", run.lineage.get("gatePassed"))
    if isinstance(recorded, bool):
        return "passed" if recorded else "failed"
    return "none"


COUNT_KEYS = ("scored", "unparseable", "failed", "wins", "ties", "losses", "inconsistent")


def judge_counts(metrics: Mapping[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """The judge's counts as (row name, counts): rubric scoring of the base and the tuned
    answers (`judge.rubric.base|tuned`), then the pairwise comparison (`judge.pairwise`)."""
    judge = section(metrics, "judge")
    rubric = section(judge, "rubric")
    found = [(f"rubric, {side} answers", section(rubric, side)) for side in ("base", "tuned")]
    found.append(("pairwise, tuned vs base", section(judge, "pairwise")))
    rows = []
    for name, value in found:
        numbers = {k: number(value.get(k)) for k in COUNT_KEYS}
        row = {k: int(v) for k, v in numbers.items() if v is not None}
        if row:
            rows.append((name, row))
    return rows


@dataclass(frozen=True)
class SuiteRow:
    """One benchmark suite."""

    name: str
    type: str
    examples: int | None
    base: float | None
    tuned: float | None


def _accuracy(value: Any) -> float | None:
    """A suite's accuracy: a number, or a result object's `accuracy`."""
    if isinstance(value, Mapping):
        return number(value.get("accuracy"))
    return number(value)


def suite_rows(metrics: Mapping[str, Any]) -> list[SuiteRow]:
    """`suites: {name: {"base": result, "tuned": result}}`, a result being a number or
    `{"type", "accuracy", "n", …}`; missing accuracies come from `Suite/<name>`."""
    base, tuned = section(metrics, "base"), section(metrics, "tuned")
    rows = []
    for name, value in section(metrics, "suites").items():
        info = value if isinstance(value, Mapping) else {}
        sides = [section(info, "tuned"), section(info, "base")]
        kind = info.get("type") or next((x["type"] for x in sides if x.get("type")), "")
        examples = number(info.get("examples"))
        if examples is None:
            examples = next((n for x in sides if (n := number(x.get("n"))) is not None), None)
        b, t = _accuracy(info.get("base")), _accuracy(info.get("tuned"))
        rows.append(
            SuiteRow(
                name=str(name),
                type=str(kind),
                examples=int(examples) if examples is not None else None,
                base=b if b is not None else number(base.get(f"Suite/{name}")),
                tuned=t if t is not None else number(tuned.get(f"Suite/{name}")),
            )
        )
    return rows


@dataclass(frozen=True)
class QuantVariant:
    """A quantized variant, or the merged model it is compared with."""

    scheme: str
    size_bytes: int | None
    perplexity: float | None
    perplexity_delta: float | None
    seconds: float | None
    skipped: str | None = None
    details: str = ""
    """How it was made, e.g. `group size 64, pack-quantized, 32 calibration examples`."""


def folder_size(files: Sequence[FileEntry], folder: str) -> int | None:
    """Total size of the files under `folder/`, or None when there are none."""
    sizes = [f.size for f in files if f.path.startswith(folder.rstrip("/") + "/")]
    return sum(sizes) if sizes else None


def merged_reference(run: RunArtifacts) -> QuantVariant | None:
    """The unquantized model the variants are compared with: size from `metrics.json`
    `merged.sizeBytes` or the files of `merged/`; perplexity from `merged.perplexity`, a
    variant's `referencePerplexity`, or the tuned model's Perplexity."""
    info = section(run.metrics, "merged")
    size = number(info.get("sizeBytes"))
    if size is None:
        size = folder_size(run.files, "merged")
    candidates = [info.get("perplexity")]
    candidates += [
        v.get("referencePerplexity")
        for v in section(run.metrics, "quantized").values()
        if isinstance(v, Mapping)
    ]
    candidates.append(section(run.metrics, "tuned").get("Perplexity"))
    perplexity = next((p for c in candidates if (p := number(c)) is not None), None)
    if size is None and perplexity is None:
        return None
    return QuantVariant("merged", int(size) if size is not None else None, perplexity, 0.0, None)


def _details(info: Mapping[str, Any]) -> str:
    parts = []
    if (group := number(info.get("groupSize"))) is not None:
        parts.append(f"group size {int(group)}")
    if isinstance(info.get("format"), str) and info["format"]:
        parts.append(str(info["format"]))
    if (samples := number(info.get("calibrationSamples"))) is not None and samples > 0:
        parts.append(f"{int(samples)} calibration examples")
    return ", ".join(parts)


def quantized_variants(run: RunArtifacts) -> list[QuantVariant]:
    """Each variant of `metrics.json` `quantized`, plus variants found only as files under
    `quantized/<scheme>/` (size only)."""
    recorded = section(run.metrics, "quantized")
    schemes = {str(s) for s in recorded}
    schemes |= {
        f.path.split("/")[1]
        for f in run.files
        if f.path.count("/") >= 2 and f.path.startswith("quantized/")
    }
    reference = merged_reference(run)
    variants = []
    # Produced variants first, then the skipped ones; by name within each.
    for scheme in sorted(schemes, key=lambda s: ("skipped" in section(recorded, s), s)):
        info = section(recorded, scheme)
        skipped = info.get("skipped")
        size = number(info.get("sizeBytes"))
        if size is None:
            size = folder_size(run.files, f"quantized/{scheme}")
        perplexity = number(info.get("perplexity"))
        delta = number(info.get("perplexityDelta"))
        if delta is None and perplexity is not None and reference and reference.perplexity:
            delta = perplexity - reference.perplexity
        variants.append(
            QuantVariant(
                scheme=scheme,
                size_bytes=int(size) if size is not None else None,
                perplexity=perplexity,
                perplexity_delta=delta,
                seconds=number(info.get("seconds")),
                skipped=str(skipped) if skipped is not None else None,
                details=_details(info),
            )
        )
    return variants


@dataclass(frozen=True)
class ArtifactGroup:
    """Files of one artifact: `adapter`, `merged`, `quantized/W4A16`, `data`, `eval`, …"""

    name: str
    files: int
    size: int


def artifact_groups(files: Sequence[FileEntry]) -> list[ArtifactGroup]:
    """The run's files grouped by artifact (first folder; `quantized/<scheme>` apart)."""
    groups: dict[str, list[int]] = {}
    for entry in files:
        parts = entry.path.split("/")
        name = "/".join(parts[:2]) if parts[0] == "quantized" and len(parts) > 2 else parts[0]
        if len(parts) == 1:
            name = "(run root)"
        groups.setdefault(name, []).append(entry.size)
    order = ["adapter", "merged", "quantized", "data", "eval", "logs"]

    def rank(name: str) -> tuple[int, str]:
        head = name.split("/")[0]
        return (order.index(head) if head in order else len(order), name)

    return [ArtifactGroup(n, len(groups[n]), sum(groups[n])) for n in sorted(groups, key=rank)]


def human_size(size: int | None) -> str:
    """`538.1 MB` style sizes (powers of 1000, like `ls --si`)."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def format_metric(value: float | None, signed: bool = False) -> str:
    """Four decimals; large values (e.g. the perplexity of a broken model) in 4 digits."""
    if value is None:
        return "-"
    if abs(value) >= 1e4:
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def normalize_answer(text: str) -> str:
    """The normalization of ExactMatch: lower case, runs of whitespace as one space, and
    surrounding spaces and periods removed."""
    return " ".join(text.lower().split()).strip(" .")


def exact_match(sample: Mapping[str, Any], model: str) -> bool | None:
    """Whether `model`'s answer (`base` or `tuned`) matches the reference: the sample's
    `exactMatch[model]` when recorded, else computed with `normalize_answer`."""
    recorded = sample.get("exactMatch")
    if isinstance(recorded, Mapping) and isinstance(recorded.get(model), bool):
        return bool(recorded[model])
    answer, reference = sample.get(model), sample.get("reference")
    if not isinstance(answer, str) or not isinstance(reference, str):
        return None
    return normalize_answer(answer) == normalize_answer(reference)


def training_summary(run: RunArtifacts) -> list[tuple[str, dict[str, Any]]]:
    """Per stage, the last record of the training log that carries `train_loss` (the
    trainer's end-of-stage summary: runtime, mean loss, tokens seen)."""
    summaries: dict[str, dict[str, Any]] = {}
    for record in run.train_log:
        if "train_loss" in record:
            summaries[str(record.get("stage", ""))] = dict(record)
    return list(summaries.items())
