"""The evaluation report as one self-contained HTML file.

Inline CSS, plots as inline PNG (`data:` URIs), no script, no external fonts, styles or
images: the file opens offline and can be mailed or attached to a ticket. A
Content-Security-Policy forbids scripts and remote loads, and every piece of text from the
run (prompts, answers, names) is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune import __version__
from kubetune.report import sections
from kubetune.report.artifacts import RunArtifacts, load_folder
from kubetune.report.markup import CSP, STYLE, esc, figure, key_values, table
from kubetune.report.plots import Plot, build_plots, matplotlib_missing
from kubetune.report.views import (
    COUNT_KEYS,
    artifact_groups,
    format_metric,
    gate_checks,
    gate_verdict,
    human_size,
    judge_counts,
    merged_reference,
    metric_rows,
    number,
    quantized_variants,
    section,
    suite_rows,
    training_summary,
)
from kubetune.storage import ObjectInfo, RunLayout
from kubetune.storage.manifest import FileEntry

MAX_SAMPLE_ROWS = 50


def render_report(run: RunArtifacts, *, plots: Sequence[Plot] | None = None) -> str:
    """The whole report of a run as one HTML document.

    Args:
        run: what to show (`load_run` or `load_folder`).
        plots: plots already drawn (`build_plots(run)`), e.g. to also save them as PNG
            files; default: drawn here.
    """
    drawn = {p.name: p for p in (build_plots(run) if plots is None else plots)}
    sections_html = [
        _gate(run),
        _metrics(run, drawn),
        _training(run, drawn),
        sections.stages(run, drawn, _missing_plot_note("Stage plots")),
        _quantized(run, drawn),
        _artifacts(run),
        sections.samples(run, MAX_SAMPLE_ROWS),
        sections.data(run, figure(drawn.get("token-lengths"))),
    ]
    body = [_header(run, sections_html), *sections_html, _footer(run)]
    title = f"kubetune report: {run.job_name} {run.run_id}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="kubetune {esc(__version__)}">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main>\n</body>\n</html>\n"
    )


def render_unpublished(
    layout: RunLayout,
    paths: Mapping[str, str | Path],
    *,
    lineage: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    files: Iterable[FileEntry | ObjectInfo] | None = None,
    stages: Iterable[Mapping[str, Any]] | None = None,
) -> str:
    """The report of a run being published (the trainer, before the manifest).

    Args:
        layout: the run.
        paths: run-relative keys → local files, e.g. `{"eval/metrics.json": …,
            "eval/samples.jsonl": …, "logs/train.jsonl": …, "data/report.json": …,
            "data/train.jsonl": …, "data/val.jsonl": …}`; absent keys leave their section
            out.
        lineage: the lineage the manifest will record.
        created_at: the time the manifest will record.
        files: the files uploaded so far (the `ObjectInfo`s of `put_file`), for the
            artifacts table; default: the files of `paths`.
        stages: the stage records the manifest will hold as `metrics.stages`
            (`{"name", "type", "steps", "metrics"}` per stage), for the Stages section.
    """
    return render_report(
        load_folder(
            None,
            run_uri=layout.run_uri,
            lineage=lineage,
            created_at=created_at,
            files=files,
            paths=paths,
            stages=stages,
        )
    )


def render_report_from_folder(folder: str | Path, *, run_uri: str, **kwargs: Any) -> str:
    """`render_report(load_folder(folder, run_uri=…, …))`: the report of a run whose files
    are still local (the trainer, before it publishes). Keyword arguments as `load_folder`.
    """
    return render_report(load_folder(folder, run_uri=run_uri, **kwargs))


def _missing_plot_note(what: str) -> str:
    reason = matplotlib_missing()
    return f'<p class="note">{esc(what)}: {esc(reason)}.</p>' if reason else ""


VERDICT_TEXT = {"passed": "gate passed", "failed": "gate FAILED", "none": "no gate"}


def _lineage_model(lineage: Mapping[str, Any]) -> str:
    model = lineage.get("model")
    if isinstance(model, Mapping):
        uri, revision = model.get("uri"), model.get("revision")
        text = f"<code>{esc(uri)}</code>" if uri else ""
        return text + (f' <span class="muted">@ {esc(revision)}</span>' if revision else "")
    return f"<code>{esc(model)}</code>" if model else ""


def _stages(lineage: Mapping[str, Any]) -> str:
    stages = lineage.get("stages")
    names = []
    for stage in stages if isinstance(stages, list) else []:
        if isinstance(stage, Mapping):
            names.append(str(stage.get("name") or stage.get("type") or "?"))
        else:
            names.append(str(stage))
    text = " → ".join(names)
    steps = lineage.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        text += f" ({steps:,} steps)" if text else f"{steps:,} steps"
    return esc(text)


def dataset_digest(run: RunArtifacts) -> str | None:
    """The dataset digest: lineage `dataset.digest` (or `datasetDigest`), else the data
    report's `digest`."""
    dataset = run.lineage.get("dataset")
    if isinstance(dataset, Mapping) and dataset.get("digest"):
        return str(dataset["digest"])
    for value in (run.lineage.get("datasetDigest"), (run.data_report or {}).get("digest")):
        if value:
            return str(value)
    return None


SECTION_TITLES = {
    "gate": "Gate",
    "metrics": "Metrics",
    "training": "Training",
    "stages": "Stages",
    "quantized": "Quantized",
    "artifacts": "Artifacts",
    "samples": "Samples",
    "data": "Data",
}


def _header(run: RunArtifacts, sections_html: Sequence[str]) -> str:
    verdict = gate_verdict(run)
    lineage = run.lineage
    not_recorded = '<span class="muted">not recorded</span>'
    digest = dataset_digest(run)
    pairs = [
        ("Job", esc(f"{run.namespace}/{run.job_name}")),
        ("Run id", f"<code>{esc(run.run_id)}</code>"),
        ("RUN_URI", f"<code>{esc(run.run_uri)}</code>"),
        ("Base model", _lineage_model(lineage) or not_recorded),
        ("Method", esc(lineage["method"]) if lineage.get("method") else not_recorded),
        ("Stages", _stages(lineage) or not_recorded),
        ("Dataset digest", f"<code>{esc(digest)}</code>" if digest else not_recorded),
    ]
    if lineage.get("specHash"):
        pairs.append(("Spec hash", f"<code>{esc(lineage['specHash'])}</code>"))
    pairs.append(("Created", esc(run.created_at) if run.created_at else not_recorded))
    if run.published:
        pairs.append(("Manifest", f"<code>{esc(run.manifest_digest)}</code>"))
    else:
        written = "written after this report; it lists this file with its sha256"
        pairs.append(("Manifest", f'<span class="muted">{written}</span>'))
    nav = "".join(
        f'<a href="#{anchor}">{esc(label)}</a>'
        for anchor, label in SECTION_TITLES.items()
        if any(part.startswith(f'<section id="{anchor}">') for part in sections_html)
    )
    return (
        f'<header id="overview"><h1>{esc(run.job_name)} <span class="muted">'
        f"{esc(run.run_id)}</span> "
        f'<span class="badge verdict-{verdict}" id="verdict">{VERDICT_TEXT[verdict]}</span></h1>'
        f'<div class="muted">kubetune evaluation report</div>{key_values(pairs)}'
        f"<nav>{nav}</nav></header>"
    )


def _gate(run: RunArtifacts) -> str:
    checks = gate_checks(run.metrics)
    verdict = gate_verdict(run)
    head = '<section id="gate"><h2>Evaluation gate</h2>'
    if not checks:
        text = {
            "none": "No gate: <code>evaluation.gate</code> has no rules.",
            "passed": "The gate passed (recorded in the lineage; rules not available).",
            "failed": "The gate FAILED (recorded in the lineage; rules not available).",
        }[verdict]
        return head + f"<p>{text}</p></section>"
    rows = []
    for check in checks:
        result = {True: "passed", False: "FAILED", None: "not evaluated"}[check.passed]
        klass = "passed" if check.passed else "failed"
        rows.append(
            [
                esc(check.subject),
                esc(check.operator),
                esc(check.threshold),
                esc(format_metric(check.value)),
                f'<span class="{klass}">{esc(result)}</span>',
            ]
        )
    intro = (
        "Every rule must pass before a ModelDeployment accepts this run "
        "(unless it sets <code>requireGate: false</code>)."
    )
    if verdict == "failed":
        intro = "<strong>The gate FAILED</strong>: the run is published, deployments refuse it."
    body = table(
        ["Compared", "Operator", "Threshold", "Value", "Result"],
        rows,
        numeric=(2, 3),
        css="narrow gate",
    )
    return head + f"<p>{intro}</p>{body}</section>"


ARROWS = {"better": "▲", "worse": "▼", "same": "="}


def _delta_cell(row: Any) -> str:
    direction = row.direction
    if direction is None:
        return "-"
    arrow = "▲" if row.delta > 0 else "▼" if row.delta < 0 else "="
    relative = ""
    if row.base:
        relative = f" ({100 * row.delta / abs(row.base):+.1f} %)"
    return (
        f'<span class="delta {direction}" data-direction="{direction}">{arrow} '
        f"{esc(format_metric(row.delta, signed=True))}{esc(relative)} "
        f'<span class="dir">{direction}</span></span>'
    )


def _metrics(run: RunArtifacts, plots: Mapping[str, Plot]) -> str:
    head = '<section id="metrics"><h2>Metrics: base vs tuned</h2>'
    rows = metric_rows(run.metrics)
    if not rows:
        missing = "<p>Not computed: the run has no <code>eval/metrics.json</code>.</p>"
        return head + missing + "</section>"
    lines = []
    for row in rows:
        lines.append(
            f'<tr data-metric="{esc(row.name)}"><th title="{esc(row.help)}">{esc(row.name)}'
            f'<div class="muted" style="font-weight:normal;font-size:11px">{esc(row.help)}</div>'
            f'</th><td class="num">{esc(format_metric(row.base))}</td>'
            f'<td class="num">{esc(format_metric(row.tuned))}</td>'
            f'<td class="num">{_delta_cell(row)}</td></tr>'
        )
    metrics_table = (
        '<table class="metrics"><thead><tr><th>Metric</th><th class="num">Base</th>'
        '<th class="num">Tuned</th><th class="num">Delta (tuned - base)</th></tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table>"
    )
    note = (
        '<p class="muted">▲/▼ show the sign of the change; green is better, red is worse '
        "(EvalLoss and Perplexity are better when lower).</p>"
    )
    parts = [head, _evaluated_on(run.metrics), metrics_table, note, _skipped(run.metrics)]
    parts += [_judge(run.metrics), _suites(run.metrics)]
    parts.append(figure(plots.get("metrics")) or _missing_plot_note("Base vs tuned chart"))
    return "".join(parts) + "</section>"


def _evaluated_on(metrics: Mapping[str, Any]) -> str:
    examples, source = number(metrics.get("examples")), metrics.get("source")
    if examples is None and not source:
        return ""
    text = "Evaluated on " + (f"{int(examples):,} examples" if examples is not None else "")
    if source:
        text += f" from {source}" if examples is not None else f"examples from {source}"
    return f'<p class="muted">{esc(text)}.</p>'


def _skipped(metrics: Mapping[str, Any]) -> str:
    skipped = section(metrics, "skipped")
    if not skipped:
        return ""
    items = "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in skipped.items())
    return f'<p>Not computed:</p><ul class="skipped">{items}</ul>'


def _judge(metrics: Mapping[str, Any]) -> str:
    judge = section(metrics, "judge")
    counts = judge_counts(metrics)
    if not judge and not counts:
        return ""
    described = [f"model <code>{esc(judge['model'])}</code>"] if judge.get("model") else []
    if judge.get("mode"):
        described.append(f"mode {esc(judge['mode'])}")
    requests = number(judge.get("requests"))
    if requests is not None:
        tokens = [number(judge.get(k)) for k in ("promptTokens", "completionTokens")]
        used = f"{int(requests):,} requests"
        if None not in tokens:
            used += (
                f" ({int(tokens[0] or 0):,} prompt and {int(tokens[1] or 0):,} completion tokens)"
            )
        described.append(esc(used))
    text = ", ".join(described) or "settings not recorded"
    parts = [
        f"<h3>LLM judge</h3><p>Judge {text}. Unparseable replies and failed requests are "
        "left out of the scores.</p>"
    ]
    if counts:
        columns = [k for k in COUNT_KEYS if any(k in c for _, c in counts)]
        rows = [[esc(name)] + [esc(c.get(k, "-")) for k in columns] for name, c in counts]
        parts.append(
            table(
                ["Judged", *columns],
                rows,
                numeric=range(1, len(columns) + 1),
                css="narrow judge-counts",
            )
        )
    return "".join(parts)


def _suites(metrics: Mapping[str, Any]) -> str:
    rows = suite_rows(metrics)
    if not rows:
        return ""
    cells = [
        [
            esc(r.name),
            esc(r.type or "-"),
            esc(f"{r.examples:,}" if r.examples is not None else "-"),
            esc(format_metric(r.base)),
            esc(format_metric(r.tuned)),
        ]
        for r in rows
    ]
    return "<h3>Benchmark suites</h3>" + table(
        ["Suite", "Type", "Examples", "Base accuracy", "Tuned accuracy"],
        cells,
        numeric=(2, 3, 4),
        css="narrow suites",
    )


def _training(run: RunArtifacts, plots: Mapping[str, Plot]) -> str:
    head = '<section id="training"><h2>Training</h2>'
    if not run.train_log:
        missing = "<p>Not recorded: the run has no <code>logs/train.jsonl</code>.</p>"
        return head + missing + "</section>"
    parts = [head]
    for stage, record in training_summary(run):
        pairs = []
        for key, label, unit in (
            ("train_runtime", "runtime", " s"),
            ("train_loss", "mean training loss", ""),
            ("num_input_tokens_seen", "tokens seen", ""),
            ("epoch", "epochs", ""),
            ("train_samples_per_second", "examples per second", ""),
        ):
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                text = f"{value:,.0f}" if key == "num_input_tokens_seen" else f"{value:.4g}"
                pairs.append((label, esc(text + unit)))
        if pairs:
            title = f"Stage {stage}" if stage else "Summary"
            parts.append(f"<h3>{esc(title)}</h3>{key_values(pairs)}")
    parts.append(figure(plots.get("loss")) or _missing_plot_note("Loss curves"))
    parts.append(figure(plots.get("learning-rate")))
    return "".join(parts) + "</section>"


def _quantized(run: RunArtifacts, plots: Mapping[str, Plot]) -> str:
    variants = quantized_variants(run)
    if not variants:
        return ""
    reference = merged_reference(run)
    rows = []
    for v in ([reference] if reference else []) + variants:
        share = "-"
        if reference and reference.size_bytes and v.size_bytes and v.scheme != "merged":
            share = f"{100 * v.size_bytes / reference.size_bytes:.0f} %"
        name = "merged (reference)" if v.scheme == "merged" else v.scheme
        note = f"skipped: {v.skipped}" if v.skipped else v.details
        rows.append(
            [
                esc(name),
                esc(human_size(v.size_bytes)),
                esc(share),
                esc(format_metric(v.perplexity)),
                esc("-" if v.scheme == "merged" else format_metric(v.perplexity_delta, True)),
                esc(f"{v.seconds:.0f} s" if v.seconds is not None else "-"),
                esc(note),
            ]
        )
    body = table(
        ["Variant", "Size", "Of merged", "Perplexity", "Δ perplexity", "Time", "Note"],
        rows,
        numeric=(1, 2, 3, 4, 5),
        css="quantized",
    )
    chart = figure(plots.get("quantized"))
    if not chart and any(v.skipped is None for v in variants):
        chart = _missing_plot_note("Quantized variants chart")
    return f'<section id="quantized"><h2>Quantized variants</h2>{body}{chart}</section>'


def _artifacts(run: RunArtifacts) -> str:
    head = '<section id="artifacts"><h2>Artifacts</h2>'
    groups = artifact_groups(run.files)
    if not groups:
        return head + "<p>No files recorded.</p></section>"
    rows = [[f"<code>{esc(g.name)}/</code>", esc(g.files), esc(human_size(g.size))] for g in groups]
    if run.published:
        note = (
            "Every file listed in <code>manifest.json</code> is present with its size; the "
            "files this report read matched their sha256."
        )
    else:
        note = (
            "Sizes as uploaded when this report was written; <code>manifest.json</code> "
            "lists every file of the run with its sha256."
        )
    return (
        head
        + f'<p class="muted">{note}</p>'
        + table(["Artifact", "Files", "Size"], rows, numeric=(1, 2), css="narrow artifacts")
        + "</section>"
    )


def _footer(run: RunArtifacts) -> str:
    notes = "".join(f"<li>{esc(n)}</li>" for n in run.notes)
    listed = f'<ul class="notes">{notes}</ul>' if notes else ""
    return f"<footer>{listed}Generated by kubetune {esc(__version__)}.</footer>"
