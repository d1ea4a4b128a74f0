"""Progress of a training stage: log lines, a JSONL log, Prometheus metrics, ETA.

The operator polls the Prometheus endpoint for `status.progress`; people read the log
lines; the JSONL log is published with the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("kubetune.trainer")


def format_eta(seconds: float) -> str:
    """A short human duration: "45s", "12m", "3h05m"."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


PHASES = ("Preparing", "Training", "Evaluating", "Exporting", "Publishing")
"""The pipeline's steps, in order, as the `kubetune_trainer_phase` gauge labels them."""


class Metrics:
    """The Prometheus gauges of the trainer (one set per process)."""

    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("stage",)) -> Gauge:
            return Gauge(f"kubetune_trainer_{name}", doc, labels, registry=self.registry)

        self.step = gauge("step", "Optimizer steps done in the current stage")
        self.total_steps = gauge("total_steps", "Optimizer steps planned in the current stage")
        self.loss = gauge("loss", "Latest training loss")
        self.eval_loss = gauge("eval_loss", "Latest validation loss")
        self.learning_rate = gauge("learning_rate", "Current learning rate")
        self.tokens_per_second = gauge("tokens_per_second", "Training tokens per second")
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds until the stage ends")
        self.epoch = gauge("epoch", "Current epoch")
        self.gpu_memory = gauge("gpu_memory_bytes", "Peak GPU memory allocated")
        self.stage_info = gauge("stage_info", "1 for the stage running now", ("stage", "index"))
        self.phase = gauge(
            "phase", "1 for the pipeline step running now, 0 for the others", ("phase",)
        )
        self.server = None
        if port:
            self.server, _ = start_http_server(port, registry=self.registry)

    def set_phase(self, phase: str) -> None:
        """Mark the pipeline step running now (Preparing, Training, Evaluating, Exporting,
        Publishing); the operator shows it as `status.stage`."""
        for name in PHASES:
            self.phase.labels(name).set(1 if name == phase else 0)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@dataclass
class StageProgress:
    """Tracks one stage; fed by the trainer's log events."""

    stage: str
    total_steps: int
    log_path: Path
    metrics: Metrics | None = None
    started: float = field(default_factory=time.monotonic)
    first_step_time: float | None = None
    first_step: int = 0
    tokens_start: int | None = None
    latest: dict[str, Any] = field(default_factory=dict)

    def eta_seconds(self, step: int) -> float | None:
        if self.first_step_time is None or step <= self.first_step:
            return None
        rate = (time.monotonic() - self.first_step_time) / (step - self.first_step)
        return rate * max(0, self.total_steps - step)

    def record(
        self, step: int, values: dict[str, Any], tokens_seen: int | None = None
    ) -> dict[str, Any]:
        """Record one log event; returns the JSONL record written."""
        now = time.monotonic()
        if self.first_step_time is None:
            self.first_step_time, self.first_step = now, step
            self.tokens_start = tokens_seen
        record: dict[str, Any] = {"time": round(time.time(), 3), "stage": self.stage, "step": step}
        record.update({k: v for k, v in values.items() if isinstance(v, int | float)})
        elapsed = now - self.first_step_time
        if tokens_seen is not None and self.tokens_start is not None and elapsed > 0:
            record["tokens_per_second"] = round((tokens_seen - self.tokens_start) / elapsed, 1)
        eta = self.eta_seconds(step)
        if eta is not None:
            record["eta_seconds"] = round(eta, 1)
        self.latest.update(record)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._export(step, record)
        return record

    def _export(self, step: int, record: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        m, s = self.metrics, self.stage
        m.step.labels(s).set(step)
        m.stage_info.labels(s, "0").set(1)
        try:
            import torch

            if torch.cuda.is_available():
                m.gpu_memory.labels(s).set(torch.cuda.max_memory_allocated())
        except ImportError:
            pass
        m.total_steps.labels(s).set(self.total_steps)
        for gauge, key in (
            (m.loss, "loss"),
            (m.eval_loss, "eval_loss"),
            (m.learning_rate, "learning_rate"),
            (m.tokens_per_second, "tokens_per_second"),
            (m.eta_seconds, "eta_seconds"),
            (m.epoch, "epoch"),
        ):
            if key in record:
                gauge.labels(s).set(record[key])

    def line(self, record: dict[str, Any]) -> str:
        """A concise log line for people."""
        parts = [f"{self.stage} step {record['step']}/{self.total_steps}"]
        for key, label, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("eval_loss", "eval_loss", "{:.4f}"),
            ("rewards/margins", "margin", "{:.4f}"),
            ("rewards/accuracies", "reward acc", "{:.2f}"),
            ("eval_rewards/margins", "eval margin", "{:.4f}"),
            ("eval_rewards/accuracies", "eval reward acc", "{:.2f}"),
            ("reward", "reward", "{:.4f}"),
            ("kl", "KL", "{:.4f}"),
            ("learning_rate", "lr", "{:.2e}"),
            ("tokens_per_second", "tok/s", "{:.0f}"),
        ):
            if key in record:
                parts.append(f"{label} {fmt.format(record[key])}")
        if "eta_seconds" in record:
            parts.append(f"ETA {format_eta(record['eta_seconds'])}")
        return " | ".join(parts)
