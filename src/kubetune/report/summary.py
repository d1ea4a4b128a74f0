"""The plain-text summary `kubetune report` prints: the run, the headline of each alignment
stage, base vs tuned metrics, the gate, and the artifacts with their sizes."""

from __future__ import annotations

from kubetune.report.artifacts import RunArtifacts
from kubetune.report.render import dataset_digest
from kubetune.report.stages import run_stages, summary_line
from kubetune.report.views import (
    artifact_groups,
    format_metric,
    gate_checks,
    gate_verdict,
    human_size,
    metric_rows,
    quantized_variants,
)

VERDICT_LINE = {"passed": "passed", "failed": "FAILED", "none": "no gate"}


def _model(run: RunArtifacts) -> str:
    model = run.lineage.get("model")
    if isinstance(model, dict):
        uri, revision = model.get("uri", "?"), model.get("revision")
        return f"{uri} @ {revision}" if revision else str(uri)
    return str(model) if model else "not recorded"


def summary_text(run: RunArtifacts) -> str:
    """A few lines for the terminal; no colour, fixed-width columns."""
    stages = run.lineage.get("stages")
    stage_text = ", ".join(str(s) for s in stages) if isinstance(stages, list) else ""
    lines = [
        f"run       {run.run_uri}",
        f"job       {run.namespace}/{run.job_name}  run {run.run_id}"
        + (f"  created {run.created_at}" if run.created_at else ""),
        f"model     {_model(run)}"
        + (f"  method {run.lineage['method']}" if run.lineage.get("method") else "")
        + (f"  stages {stage_text}" if stage_text else ""),
    ]
    digest = dataset_digest(run)
    if digest:
        lines.append(f"dataset   {digest}")
    aligned = [stage for stage in run_stages(run) if stage.aligned]
    if aligned:
        lines.append("")
        lines.append("stages")
        lines += [f"  {summary_line(stage)}" for stage in aligned]
    lines.append("")
    rows = metric_rows(run.metrics)
    if rows:
        width = max(14, *(len(r.name) + 2 for r in rows))
        lines.append(f"{'metric':<{width}}{'base':>12}{'tuned':>12}{'delta':>12}")
        for row in rows:
            direction = f"  {row.direction}" if row.direction in ("better", "worse") else ""
            lines.append(
                f"{row.name:<{width}}{format_metric(row.base):>12}{format_metric(row.tuned):>12}"
                f"{format_metric(row.delta, signed=True):>12}{direction}"
            )
    else:
        lines.append("metrics   not computed (no eval/metrics.json)")
    lines.append("")
    lines.append(f"gate      {VERDICT_LINE[gate_verdict(run)]}")
    for check in gate_checks(run.metrics):
        result = {True: "passed", False: "FAILED", None: "not evaluated"}[check.passed]
        lines.append(
            f"  {check.subject} {check.operator} {check.threshold}: "
            f"{format_metric(check.value)} {result}"
        )
    groups = [
        g
        for g in artifact_groups(run.files)
        if g.name.split("/")[0] in ("adapter", "merged", "quantized")
    ]
    skipped = [v for v in quantized_variants(run) if v.skipped]
    if groups or skipped:
        lines.append("")
        lines.append("artifacts")
        for group in groups:
            lines.append(f"  {group.name:<18}{group.files:>5} files{human_size(group.size):>12}")
        for variant in skipped:
            lines.append(f"  quantized/{variant.scheme:<8}skipped: {variant.skipped}")
    return "\n".join(lines)
