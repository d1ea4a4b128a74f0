"""The report's training stages (headline metrics per stage and their plots), sample table
(prompt, reference, base and tuned answers, exact-match marks, judge verdicts) and data
summary (`data/report.json`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.report.artifacts import RunArtifacts
from kubetune.report.markup import esc, figure, key_values, table
from kubetune.report.plots import Plot
from kubetune.report.stages import (
    PREFERENCE_TYPES,
    REWARD_MODEL,
    RLHF,
    Stage,
    headlines,
    run_stages,
    shows_stages,
)
from kubetune.report.views import exact_match, number, section

MAX_CELL_CHARS = 2000
"""Longer prompts and answers are cut (the full text is in eval/samples.jsonl)."""

MAX_PROBLEMS = 10


GLOSSARY = (
    (
        PREFERENCE_TYPES,
        "<strong>Reward margin</strong>: the mean of chosen minus rejected implicit rewards "
        "(β times the log-probability ratio to the reference model); it starts at 0 and grows "
        "as the model learns the preferences (KTO has one only for batches holding both "
        "kinds of example). <strong>Preference accuracy</strong>: the share of pairs whose "
        "chosen answer gets the higher reward.",
    ),
    (
        frozenset({REWARD_MODEL}),
        "<strong>Held-out accuracy</strong>: the share of validation pairs the reward model "
        "scores chosen above rejected, before → after training (0.5 is chance); the "
        "<strong>margin</strong> is the mean score difference.",
    ),
    (
        frozenset({RLHF}),
        "<strong>Mean reward</strong>: the reward model's mean score of the policy's "
        "answers, first → last step. <strong>KL</strong>: how far the policy has moved from "
        "the reference model (the KL penalty keeps it small). <strong>Value loss</strong> "
        "(PPO): the value head's error; it should fall.",
    ),
)


def stages(run: RunArtifacts, plots: Mapping[str, Plot], missing_plots: str) -> str:
    """The Stages section ("" for a run of one SFT stage): a row per stage with its headline
    metrics, a glossary, and each alignment stage's figure (or `missing_plots`)."""
    found = run_stages(run)
    if not shows_stages(found):
        return ""
    rows = [
        [
            esc(stage.name),
            esc(stage.title),
            esc(f"{stage.steps:,}" if stage.steps is not None else "-"),
            _headline_cell(stage),
        ]
        for stage in found
    ]
    body = table(["Stage", "Type", "Steps", "Headline metrics"], rows, numeric=(2,), css="stages")
    kinds = {s.type for s in found}
    notes = " ".join(text for types, text in GLOSSARY if kinds & types)
    glossary = f'<p class="muted">{notes}</p>' if notes else ""
    charts = "".join(figure(plots.get(s.plot_name)) for s in found if s.aligned)
    if not charts and any(s.aligned and s.log for s in found):
        charts = missing_plots
    return f'<section id="stages"><h2>Training stages</h2>{body}{glossary}{charts}</section>'


def _headline_cell(stage: Stage) -> str:
    found = headlines(stage)
    if not found:
        return '<span class="muted">not recorded</span>'
    return "<br>".join(
        f'<span class="headline" data-metric="{esc(h.key)}">{esc(h.label)} '
        f'<span class="value">{esc(h.html_text())}</span></span>'
        for h in found
    )


def clip(text: str) -> str:
    """`text` escaped, cut to `MAX_CELL_CHARS` with a note of what was left out."""
    if len(text) <= MAX_CELL_CHARS:
        return esc(text)
    rest = len(text) - MAX_CELL_CHARS
    return esc(text[:MAX_CELL_CHARS]) + f'<span class="muted"> … ({rest:,} more characters)</span>'


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return clip(prompt)
    if not isinstance(prompt, list):
        return '<span class="muted">-</span>'
    turns = []
    for message in prompt:
        if isinstance(message, Mapping):
            role, content = message.get("role", ""), message.get("content", "")
            turns.append(
                f'<div class="turn"><span class="role">{esc(role)}</span>{clip(str(content))}</div>'
            )
    return "".join(turns)


def _judge_mark(verdict: Any) -> str:
    """A rubric verdict `{"status", "score", "reply", "error"}` as a mark under the answer."""
    if not isinstance(verdict, Mapping):
        return ""
    score = number(verdict.get("score"))
    if score is None:
        status = str(verdict.get("status") or "no score")
        error = verdict.get("error")
        text = f"{status}: {error}" if error else status
        return f'<br><span class="mark error">judge: {esc(text)}</span>' + _why(
            verdict.get("reply")
        )
    return f'<br><span class="mark judge">judge {score:g}/10</span>' + _why(verdict.get("reply"))


def _why(text: Any) -> str:
    """The judge's reply, folded."""
    if not isinstance(text, str) or not text.strip():
        return ""
    return f"<details><summary>why</summary>{clip(text.strip())}</details>"


def _answer(sample: Mapping[str, Any], model: str, marks: bool) -> str:
    answer = sample.get(model)
    if not isinstance(answer, str):
        return '<span class="muted">-</span>'
    cell = clip(answer)
    if marks:
        match = exact_match(sample, model)
        if match is True:
            cell += '<br><span class="mark match" title="exact match">✓ exact match</span>'
        elif match is False:
            cell += '<br><span class="mark miss" title="no exact match">✗ no match</span>'
    judge = sample.get("judge")
    if isinstance(judge, Mapping):
        cell += _judge_mark(judge.get(model))
    return cell


PAIRWISE_TEXT = {"win": "tuned wins", "loss": "base wins", "tie": "tie"}
PAIRWISE_CSS = {"win": "match", "loss": "miss", "tie": "judge"}


def _pairwise(sample: Mapping[str, Any]) -> str:
    """A pairwise comparison `{"outcome", "inconsistent", "tunedAsA", "tunedAsB", "errors"}`:
    the outcome for the tuned model and the judge's replies in both orders."""
    verdict = section(section(sample, "judge"), "pairwise")
    if not verdict:
        return '<span class="muted">-</span>'
    outcome = str(verdict.get("outcome") or "no verdict")
    replies = [
        f"tuned answer shown {label}: {reply.strip()}"
        for label, key in (("first (A)", "tunedAsA"), ("second (B)", "tunedAsB"))
        if isinstance(reply := section(verdict, key).get("reply"), str) and reply.strip()
    ]
    why = _why("\n\n".join(replies))
    if outcome not in PAIRWISE_TEXT:
        errors = verdict.get("errors")
        detail = "; ".join(str(e) for e in errors) if isinstance(errors, list) and errors else ""
        text = f"{outcome}: {detail}" if detail else outcome
        return f'<span class="mark error">judge: {esc(text)}</span>' + why
    mark = f'<span class="mark {PAIRWISE_CSS[outcome]}">{PAIRWISE_TEXT[outcome]}</span>'
    if verdict.get("inconsistent") is True:
        mark += '<br><span class="muted">(the two orders disagreed: counted as a tie)</span>'
    return mark + why


def samples(run: RunArtifacts, limit: int) -> str:
    """The side-by-side table of the first `limit` samples."""
    head = '<section id="samples"><h2>Samples</h2>'
    if not run.samples:
        return head + (
            "<p>No samples: the run has no <code>eval/samples.jsonl</code> (generation "
            "metrics were not computed).</p></section>"
        )
    tuned = section(run.metrics, "tuned")
    marks = "ExactMatch" in tuned or any("exactMatch" in s for s in run.samples)
    pairwise = any(section(section(s, "judge"), "pairwise") for s in run.samples)
    shown = run.samples[:limit]
    headers = ["#", "Prompt", "Reference", "Base", "Tuned"] + (["Judge"] if pairwise else [])
    rows = []
    for index, sample in enumerate(shown, start=1):
        reference = sample.get("reference")
        row = [
            esc(index),
            _prompt(sample.get("prompt")),
            clip(reference) if isinstance(reference, str) else '<span class="muted">-</span>',
            _answer(sample, "base", marks),
            _answer(sample, "tuned", marks),
        ]
        if pairwise:
            row.append(_pairwise(sample))
        rows.append(row)
    total = max(run.sample_count, len(run.samples))
    note = f"Showing {len(shown)} of {total:,} samples"
    note += " (all of them)." if len(shown) == total else "; the rest are in eval/samples.jsonl."
    body = table(headers, rows, css="samples")
    return head + f'<p class="muted" id="samples-note">{esc(note)}</p>{body}</section>'


def _counts(report: Mapping[str, Any], key: str) -> dict[str, int]:
    value = report.get(key)
    if not isinstance(value, Mapping):
        return {}
    numbers = {str(k): number(v) for k, v in value.items()}
    return {k: int(v) for k, v in numbers.items() if v is not None}


def data(run: RunArtifacts, chart: str) -> str:
    """The data summary: counts, rows left out by reason, sources and token statistics."""
    head = '<section id="data"><h2>Data</h2>'
    report = run.data_report
    if not report:
        missing = "<p>Not available: the run has no <code>data/report.json</code>.</p>"
        return head + missing + chart + "</section>"
    parts = [head]
    split = section(report, "split")
    dedup = section(report, "dedup")
    pairs = [
        ("Family", report.get("family")),
        ("Chat template", report.get("chatTemplate")),
        ("maxSeqLength", report.get("maxSeqLength")),
        ("Split", ", ".join(f"{k} {v}" for k, v in split.items()) or None),
        ("Dedup", dedup.get("mode")),
        ("Digest", report.get("digest")),
    ]
    parts.append(key_values((k, esc(v)) for k, v in pairs if v not in (None, "")))
    counts = _counts(report, "counts")
    if counts:
        parts.append(
            "<h3>Counts</h3>"
            + table(
                list(counts),
                [[esc(f"{v:,}") for v in counts.values()]],
                numeric=range(len(counts)),
                css="narrow data-counts",
            )
        )
    removed = []
    for key, label in (
        ("invalidByReason", "invalid"),
        ("filteredByReason", "filtered"),
        ("duplicatesByKind", "duplicate"),
        ("piiRedacted", "PII redacted"),
    ):
        for reason, count in _counts(report, key).items():
            if count:
                removed.append([esc(label), esc(reason), esc(f"{count:,}")])
    parts.append("<h3>Left out or changed, by reason</h3>")
    if removed:
        parts.append(table(["Kind", "Reason", "Rows"], removed, numeric=(2,), css="narrow reasons"))
    else:
        parts.append("<p>Nothing: every row was kept as it was.</p>")
    parts.append(_sources(report))
    parts.append(_token_stats(report))
    parts.append(chart)
    parts.append(_problems(report))
    return "".join(p for p in parts if p) + "</section>"


def _sources(report: Mapping[str, Any]) -> str:
    sources = report.get("sources")
    rows = []
    keys = ("rows", "invalid", "filtered", "duplicates", "kept")
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, Mapping):
            row = [f"<code>{esc(source.get('uri', '?'))}</code>", esc(source.get("format", "-"))]
            row += [
                esc(f"{int(v):,}" if (v := number(source.get(k))) is not None else "-")
                for k in keys
            ]
            rows.append(row)
    if not rows:
        return ""
    return "<h3>Sources</h3>" + table(
        ["Source", "Format", "Rows", "Invalid", "Filtered", "Duplicates", "Kept"],
        rows,
        numeric=range(2, 7),
        css="sources",
    )


def _token_stats(report: Mapping[str, Any]) -> str:
    tokens = report.get("tokens")
    keys = ("count", "min", "p50", "p90", "p99", "max", "mean", "total")
    rows = []
    for split, stats in tokens.items() if isinstance(tokens, Mapping) else ():
        if isinstance(stats, Mapping):
            rows.append(
                [esc(split)]
                + [
                    esc(f"{v:,.4g}" if (v := number(stats.get(k))) is not None else "-")
                    if k == "mean"
                    else esc(f"{int(v):,}" if (v := number(stats.get(k))) is not None else "-")
                    for k in keys
                ]
            )
    if not rows:
        return ""
    return "<h3>Tokens per example</h3>" + table(
        ["Split", *keys], rows, numeric=range(1, len(keys) + 1), css="narrow token-stats"
    )


def _problems(report: Mapping[str, Any]) -> str:
    problems = report.get("problems")
    if not isinstance(problems, list) or not problems:
        return ""
    items = "".join(f"<li><code>{esc(p)}</code></li>" for p in problems[:MAX_PROBLEMS])
    more = len(problems) - MAX_PROBLEMS
    tail = f'<p class="muted">… and {more} more in data/report.json.</p>' if more > 0 else ""
    return f"<h3>First problems</h3><ul>{items}</ul>{tail}"
