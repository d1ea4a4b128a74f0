"""The local progress bar: rich, on a terminal only.

In a pod (no terminal) the concise log lines of `progress.StageProgress` are the progress
display; a bar would only fill the container log with redraws. On a terminal the bar stays
at the bottom and log lines scroll above it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback


def make_progress(console: Console) -> Progress:
    """Stage name, bar, steps done of total, latest loss, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class RichProgressBar(TrainerCallback):
    """A Trainer callback drawing one bar per training stage."""

    def __init__(self, stage: str, console: Console | None = None) -> None:
        self.stage = stage
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    @property
    def enabled(self) -> bool:
        return self.console.is_terminal

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if not self.enabled or not state.is_world_process_zero:
            return
        self.progress = make_progress(self.console)
        self.progress.start()
        self.task = self.progress.add_task(
            self.stage, total=state.max_steps, completed=state.global_step, loss="-"
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        loss = (logs or {}).get("loss")
        if self.progress is not None and self.task is not None and isinstance(loss, float):
            self.progress.update(self.task, loss=f"{loss:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
