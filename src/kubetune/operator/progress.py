"""Live progress of a training pod, read from the trainer's Prometheus endpoint.

The trainer exports one gauge per quantity, labelled by stage (`kubetune_trainer_step
{stage="SFT"}`; see `kubetune.trainer.progress.Metrics`). The operator polls that endpoint
for `status.progress` and `status.stages[]`. Polling is best effort: a pod that is starting,
restarting or gone gives None, never an exception, and the status keeps what it last saw.

The numbers become the short strings of `status.progress` (no floats in the API): a loss of
1.234567 becomes "1.2346", a learning rate "2.00e-04", a throughput "1234.5".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api.v1alpha1.status import JobStage, Progress

PREFIX = "kubetune_trainer_"
"""Prefix of every metric the trainer exports."""

STAGE_LABEL = "stage"
DEFAULT_METRICS_PORT = 9400
"""The trainer's default metrics port (TrainerConfig.metrics_port)."""

DEFAULT_TIMEOUT = 2.0
"""Seconds to wait for a pod's metrics before giving up on this poll."""

GAUGES = (
    "step",
    "total_steps",
    "loss",
    "eval_loss",
    "learning_rate",
    "tokens_per_second",
    "eta_seconds",
    "epoch",
)
"""The trainer's per-stage gauges read here (`kubetune_trainer_<name>`); each name is also
the StageSample attribute it fills."""

PHASE_METRIC = "phase"
"""`kubetune_trainer_phase{phase="Evaluating"} 1`: the pipeline step after training, when
the trainer exports it (Preparing, Training, Evaluating, Exporting or Publishing). Without
it, the operator infers the step from the training gauges."""

PHASES = (
    JobStage.PREPARING,
    JobStage.TRAINING,
    JobStage.EVALUATING,
    JobStage.EXPORTING,
    JobStage.PUBLISHING,
)


@dataclass(frozen=True)
class StageSample:
    """The trainer's gauges for one training stage."""

    stage: str
    """The stage label as exported (the stage type, e.g. "SFT" or "DPO")."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    epoch: float | None = None

    @property
    def finished(self) -> bool:
        """Whether the stage reached its planned steps."""
        return bool(self.total_steps) and (self.step or 0) >= (self.total_steps or 0)


@dataclass(frozen=True)
class Scrape:
    """One poll of the trainer's metrics endpoint."""

    stages: tuple[StageSample, ...] = ()
    """One sample per stage seen, in the order the stages started (the trainer creates a
    stage's gauges when the stage starts, and the exposition keeps that order)."""

    phase: JobStage | None = None
    """The pipeline step the trainer reports, when it exports one."""

    observed_at: datetime | None = None
    """When the endpoint was read."""

    @property
    def current(self) -> StageSample | None:
        """The stage running now: the last one to start."""
        return self.stages[-1] if self.stages else None

    def sample(self, stage_type: str) -> StageSample | None:
        """The sample of a stage type ("SFT"); labels and names in the `<i>-<type>` form
        ("0-sft") match too."""
        wanted = _stage_key(stage_type)
        return next((s for s in self.stages if _stage_key(s.stage) == wanted), None)

    def progress(self) -> Progress | None:
        """`status.progress` for the current stage."""
        current = self.current
        if current is None:
            return None
        return to_progress(current, self.observed_at)


def _stage_key(stage: str) -> str:
    """`SFT`, `sft` and `0-sft` all name the SFT stage."""
    return re.sub(r"^[0-9]+-", "", stage.lower())


def format_eta(seconds: float) -> str:
    """A short human duration: "45s", "12m", "3h05m" (as the trainer's log lines)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def format_decimal(value: float | None, spec: str) -> str | None:
    """A float as a status string with `spec` (e.g. ".4f"); NaN and infinity as "NaN",
    "+Inf" and "-Inf"; None stays None."""
    if value is None:
        return None
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return format(value, spec)[:32]


def format_percent(step: int | None, total: int | None) -> str | None:
    """ "42%" (floored, at most 100%), or None without a positive total."""
    if step is None or not total:
        return None
    return f"{min(100, max(0, step * 100 // total))}%"


def rfc3339(moment: datetime) -> str:
    """A UTC timestamp as Kubernetes writes them: 2025-01-31T12:00:00Z."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_progress(sample: StageSample, observed_at: datetime | None = None) -> Progress:
    """The status model's Progress for one stage sample."""
    eta_seconds = None
    if sample.eta_seconds is not None and math.isfinite(sample.eta_seconds):
        eta_seconds = max(0, int(sample.eta_seconds))
    return Progress(
        step=sample.step,
        total_steps=sample.total_steps,
        percent=format_percent(sample.step, sample.total_steps),
        epoch=format_decimal(sample.epoch, ".2f"),
        loss=format_decimal(sample.loss, ".4f"),
        eval_loss=format_decimal(sample.eval_loss, ".4f"),
        learning_rate=format_decimal(sample.learning_rate, ".2e"),
        tokens_per_second=format_decimal(sample.tokens_per_second, ".1f"),
        eta_seconds=eta_seconds,
        eta=format_eta(eta_seconds) if eta_seconds is not None else None,
        update_time=rfc3339(observed_at) if observed_at is not None else None,
    )


def _count(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def parse_metrics(text: str, observed_at: datetime | None = None) -> Scrape:
    """Parse the trainer's Prometheus text exposition.

    Metrics the trainer does not export are ignored, so the endpoint may grow.

    Raises:
        ValueError: the text is not the Prometheus text format.
    """
    values: dict[str, dict[str, float]] = {}
    order: list[str] = []
    phase: JobStage | None = None
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix(PREFIX)
        if not family.name.startswith(PREFIX):
            continue
        for sample in family.samples:
            if name == PHASE_METRIC:
                phase = _later_phase(phase, sample.labels.get(PHASE_METRIC), sample.value)
                continue
            stage = sample.labels.get(STAGE_LABEL)
            if name not in GAUGES or not stage:
                continue
            if stage not in values:
                values[stage] = {}
                order.append(stage)
            values[stage][name] = float(sample.value)
    return Scrape(
        stages=tuple(_sample(stage, values[stage]) for stage in order),
        phase=phase,
        observed_at=observed_at,
    )


def _sample(stage: str, values: Mapping[str, float]) -> StageSample:
    floats: dict[str, Any] = {k: v for k, v in values.items() if k not in ("step", "total_steps")}
    return StageSample(
        stage=stage,
        step=_count(values.get("step")),
        total_steps=_count(values.get("total_steps")),
        **floats,
    )


def _later_phase(current: JobStage | None, label: str | None, value: float) -> JobStage | None:
    if value != 1 or label is None:
        return current
    try:
        candidate = JobStage(label)
    except ValueError:
        return current
    if candidate not in PHASES:
        return current
    if current is None or PHASES.index(candidate) > PHASES.index(current):
        return candidate
    return current


def metrics_url(pod: Mapping[str, Any], port: int = DEFAULT_METRICS_PORT) -> str | None:
    """The trainer's metrics URL in a pod, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not isinstance(ip, str) or not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def _parse_response(response: httpx.Response, now: datetime | None) -> Scrape | None:
    if response.status_code != 200:
        return None
    try:
        return parse_metrics(response.text, now or datetime.now(timezone.utc))
    except (ValueError, UnicodeDecodeError):
        return None


def scrape(
    url: str, timeout: float = DEFAULT_TIMEOUT, now: datetime | None = None
) -> Scrape | None:
    """Read a trainer's metrics endpoint; None when it cannot be reached or read.

    Args:
        url: the endpoint (`metrics_url(pod)`).
        timeout: seconds for connecting and reading together.
        now: the observation time to record (default: the current time).
    """
    try:
        response = httpx.get(url, timeout=timeout)
    except (httpx.HTTPError, httpx.InvalidURL):
        return None
    return _parse_response(response, now)


async def scrape_async(
    url: str, timeout: float = DEFAULT_TIMEOUT, now: datetime | None = None
) -> Scrape | None:
    """`scrape` for async handlers: the event loop keeps serving other objects."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(url)
    except (httpx.HTTPError, httpx.InvalidURL):
        return None
    return _parse_response(response, now)
