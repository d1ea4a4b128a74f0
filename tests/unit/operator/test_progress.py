"""Live progress from the trainer's metrics endpoint, and the operator's own metrics."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client import generate_latest, start_http_server

from kubetune.api.v1alpha1.status import JobStage, Progress
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.progress import (
    GAUGES,
    PREFIX,
    format_decimal,
    format_eta,
    format_percent,
    metrics_url,
    parse_metrics,
    scrape,
    scrape_async,
)
from kubetune.trainer import progress as trainer_progress
from kubetune.trainer.progress import Metrics

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sft_metrics() -> Metrics:
    """The trainer's own registry, in the middle of an SFT stage."""
    metrics = Metrics(0)
    for gauge, value in (
        (metrics.step, 40),
        (metrics.total_steps, 100),
        (metrics.loss, 1.234567),
        (metrics.eval_loss, 1.5),
        (metrics.learning_rate, 2e-4),
        (metrics.tokens_per_second, 1234.56),
        (metrics.eta_seconds, 750.4),
        (metrics.epoch, 0.4),
        (metrics.gpu_memory, 8e9),
    ):
        gauge.labels("SFT").set(value)
    metrics.stage_info.labels("SFT", "0").set(1)
    return metrics


def test_every_progress_gauge_is_one_the_trainer_exports() -> None:
    exported = {family.name for family in sft_metrics().registry.collect()}
    assert {PREFIX + name for name in GAUGES} <= exported


def test_progress_parsed_from_the_trainers_registry() -> None:
    text = generate_latest(sft_metrics().registry).decode()
    parsed = parse_metrics(text, NOW)
    assert [s.stage for s in parsed.stages] == ["SFT"]
    assert parsed.progress() == Progress(
        step=40,
        total_steps=100,
        percent="40%",
        epoch="0.40",
        loss="1.2346",
        eval_loss="1.5000",
        learning_rate="2.00e-04",
        tokens_per_second="1234.6",
        eta_seconds=750,
        eta="12m",
        update_time="2025-03-01T12:00:00Z",
    )


def test_the_stage_running_now_is_the_last_to_start() -> None:
    metrics = sft_metrics()
    metrics.step.labels("DPO").set(3)
    metrics.total_steps.labels("DPO").set(30)
    parsed = parse_metrics(generate_latest(metrics.registry).decode())
    assert parsed.current is not None
    assert parsed.current.stage == "DPO"
    assert parsed.sample("SFT") is not None
    assert parsed.sample("1-dpo") is parsed.sample("DPO")
    assert parsed.sample("RewardModel") is None
    progress = parsed.progress()
    assert progress is not None
    assert (progress.step, progress.percent, progress.loss) == (3, "10%", None)


def test_the_pipeline_phase_is_read_when_exported() -> None:
    text = (
        "# TYPE kubetune_trainer_phase gauge\n"
        'kubetune_trainer_phase{phase="Training"} 0\n'
        'kubetune_trainer_phase{phase="Exporting"} 1\n'
        'kubetune_trainer_phase{phase="Bogus"} 1\n'
    )
    assert parse_metrics(text).phase == JobStage.EXPORTING


def test_unrelated_metrics_and_an_empty_endpoint_give_no_stage() -> None:
    text = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3.5\n"
    parsed = parse_metrics(text)
    assert parsed.stages == ()
    assert parsed.progress() is None


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.9, "59s"), (600, "10m"), (11100, "3h05m")]
)
def test_eta_reads_like_the_trainers_log_lines(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text == trainer_progress.format_eta(seconds)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, None),
        (float("nan"), "NaN"),
        (float("inf"), "+Inf"),
        (-float("inf"), "-Inf"),
        (0.5, "0.5000"),
    ],
)
def test_decimal_strings(value: float | None, text: str | None) -> None:
    assert format_decimal(value, ".4f") == text


@pytest.mark.parametrize(
    ("step", "total", "text"),
    [(0, 100, "0%"), (999, 1000, "99%"), (120, 100, "100%"), (5, 0, None), (None, 10, None)],
)
def test_percent_is_floored_and_capped(
    step: int | None, total: int | None, text: str | None
) -> None:
    assert format_percent(step, total) == text


def test_metrics_url_of_a_pod() -> None:
    assert metrics_url({"status": {"podIP": "10.0.0.7"}}) == "http://10.0.0.7:9400/metrics"
    assert metrics_url({"status": {"podIP": "fd00::7"}}, 9000) == "http://[fd00::7]:9000/metrics"
    assert metrics_url({"status": {}}) is None


@pytest.fixture
def trainer_endpoint() -> Iterator[str]:
    """The trainer's registry served over real HTTP, as the pod serves it."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=sft_metrics().registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_scrape_over_http(trainer_endpoint: str) -> None:
    scraped = scrape(trainer_endpoint, timeout=5, now=NOW)
    assert scraped is not None
    progress = scraped.progress()
    assert progress is not None
    assert (progress.step, progress.loss, progress.eta) == (40, "1.2346", "12m")
    assert progress.update_time == "2025-03-01T12:00:00Z"


def test_scrape_async_over_http(trainer_endpoint: str) -> None:
    scraped = asyncio.run(scrape_async(trainer_endpoint, timeout=5))
    assert scraped is not None
    assert scraped.current is not None
    assert scraped.current.step == 40
    assert scraped.observed_at is not None


@pytest.mark.parametrize(
    "url", ["refused", "http://[not-an-address/metrics", "ftp://127.0.0.1/metrics"], ids=str
)
def test_scrape_never_raises(url: str) -> None:
    if url == "refused":
        url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    assert scrape(url, timeout=1) is None
    assert asyncio.run(scrape_async(url, timeout=1)) is None


class _Garbage(BaseHTTPRequestHandler):
    """Answers what a wrong port or a sick pod might: not the Prometheus format."""

    def do_GET(self) -> None:
        status, body = (503, b"") if self.path == "/down" else (200, b"<html>{{{ not metrics")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.mark.parametrize("path", ["/metrics", "/down"], ids=["not-prometheus", "http-503"])
def test_scrape_of_a_wrong_endpoint_gives_none(path: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert scrape(f"http://127.0.0.1:{server.server_port}{path}", timeout=5) is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- The operator's own metrics -------------------------------------------------------


def sample(metrics: OperatorMetrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_reconciles_errors_and_latency() -> None:
    metrics = OperatorMetrics()
    metrics.observe_reconcile("FineTuneJob", 0.02, "success")
    metrics.observe_reconcile("FineTuneJob", 3.0, "retry")
    metrics.record_error("SecretNotFound")
    labels = {"kind": "FineTuneJob", "result": "success"}
    assert sample(metrics, "kubetune_operator_reconciles_total", labels) == 1
    assert sample(metrics, "kubetune_operator_errors_total", {"reason": "SecretNotFound"}) == 1
    buckets = {"kind": "FineTuneJob", "le": "0.025"}
    assert sample(metrics, "kubetune_operator_reconcile_duration_seconds_bucket", buckets) == 1
    assert (
        sample(
            metrics, "kubetune_operator_reconcile_duration_seconds_count", {"kind": "FineTuneJob"}
        )
        == 2
    )


def test_jobs_by_state_reports_every_stage() -> None:
    metrics = OperatorMetrics()
    metrics.set_jobs_by_state({"Training": 2, "Failed": 1})
    metrics.set_jobs_by_state({"Training": 1})
    assert sample(metrics, "kubetune_operator_finetunejobs", {"stage": "Training"}) == 1
    assert sample(metrics, "kubetune_operator_finetunejobs", {"stage": "Failed"}) == 0
    assert sample(metrics, "kubetune_operator_finetunejobs", {"stage": "Suspended"}) == 0


def test_gpu_hours_by_namespace_forget_removed_namespaces() -> None:
    metrics = OperatorMetrics()
    metrics.set_gpu_hours({"ml-team": 12.5, "research": 3.0})
    metrics.set_gpu_hours({"ml-team": 13.0})
    assert sample(metrics, "kubetune_operator_gpu_hours", {"namespace": "ml-team"}) == 13.0
    assert sample(metrics, "kubetune_operator_gpu_hours", {"namespace": "research"}) is None


def test_operator_metrics_are_served_over_http() -> None:
    metrics = OperatorMetrics()
    metrics.observe_reconcile("ModelDeployment", 0.1, "success")
    port = free_port()
    server, thread = metrics.start_server(port, addr="127.0.0.1")
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert 'kubetune_operator_reconciles_total{kind="ModelDeployment",result="success"} 1.0' in body
    # A dedicated registry: nothing from prometheus_client's default process collectors.
    assert "process_cpu_seconds_total" not in body
