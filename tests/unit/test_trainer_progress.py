"""Progress: the JSONL log, the log line, ETA, and the Prometheus endpoint over HTTP."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from kubetune.trainer.progress import Metrics, StageProgress, format_eta


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5s"), (59.9, "59s"), (600, "10m"), (3 * 3600 + 300, "3h05m")]
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_records_go_to_the_log_the_line_and_the_metrics_endpoint(tmp_path: Path) -> None:
    port = free_port()
    metrics = Metrics(port)
    try:
        progress = StageProgress("SFT", 10, tmp_path / "train.jsonl", metrics)
        progress.record(1, {"loss": 2.5, "learning_rate": 1e-4}, tokens_seen=0)
        record = progress.record(3, {"loss": 1.25, "learning_rate": 2e-4, "epoch": 0.3}, 3000)
        assert record["step"] == 3
        assert "eta_seconds" in record
        assert "tokens_per_second" in record
        line = progress.line(record)
        assert line.startswith("SFT step 3/10 | loss 1.2500 | lr 2.00e-04")
        lines = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 3]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kubetune_trainer_step{stage="SFT"} 3.0' in body
        assert 'kubetune_trainer_total_steps{stage="SFT"} 10.0' in body
        assert 'kubetune_trainer_loss{stage="SFT"} 1.25' in body
    finally:
        metrics.close()


class _State:
    is_world_process_zero = True

    def __init__(self, step: int, max_steps: int) -> None:
        self.global_step, self.max_steps = step, max_steps


def test_rich_bar_on_a_terminal_shows_steps_and_loss() -> None:
    import io

    from rich.console import Console

    from kubetune.trainer.progressbar import RichProgressBar

    out = io.StringIO()
    bar = RichProgressBar("SFT", Console(file=out, force_terminal=True, width=120))
    state = _State(4, 10)  # resumed at step 4
    bar.on_train_begin(None, state, None)
    state.global_step = 7
    bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 0.1234, "learning_rate": 1e-4})
    bar.on_train_end(None, state, None)
    text = out.getvalue()
    assert "SFT" in text
    assert "7/10" in text
    assert "loss 0.1234" in text


def test_rich_bar_is_silent_without_a_terminal() -> None:
    import io

    from rich.console import Console

    from kubetune.trainer.progressbar import RichProgressBar

    out = io.StringIO()
    bar = RichProgressBar("SFT", Console(file=out, force_terminal=False))
    state = _State(0, 10)
    bar.on_train_begin(None, state, None)
    bar.on_step_end(None, state, None)
    bar.on_train_end(None, state, None)
    assert out.getvalue() == ""


def test_dpo_log_line_shows_reward_margin_and_accuracy(tmp_path: Path) -> None:
    progress = StageProgress("DPO", 10, tmp_path / "train.jsonl")
    record = progress.record(
        4, {"loss": 0.6542, "rewards/margins": 0.0213, "rewards/accuracies": 0.75}
    )
    line = progress.line(record)
    assert line.startswith("DPO step 4/10 | loss 0.6542 | margin 0.0213 | reward acc 0.75")


def test_the_phase_gauge_is_what_the_operator_reads() -> None:
    from datetime import datetime, timezone

    from prometheus_client import generate_latest

    from kubetune.api.v1alpha1.status import JobStage
    from kubetune.operator.progress import parse_metrics
    from kubetune.trainer.progress import PHASES, Metrics

    metrics = Metrics(0)
    seen = []
    for phase in PHASES:
        metrics.set_phase(phase)
        text = generate_latest(metrics.registry).decode()
        seen.append(parse_metrics(text, datetime.now(timezone.utc)).phase)
    assert seen == [JobStage(p) for p in PHASES]
