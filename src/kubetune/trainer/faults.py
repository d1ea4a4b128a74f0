"""Fault injection for tests of the trainer's recovery (never set in production).

`KUBETUNE_FAULT="<signal>@<point>:<step>"` sends the signal to this process when the
trainer reaches the point at that step, e.g. `KILL@checkpoint-committed:4` (a pod lost
right after a checkpoint) or `TERM@step-end:3` (a preemption with a grace period). A point
prefixed with a stage type (`KILL@DPO.checkpoint-committed:2`) fires in that stage only.
"""

from __future__ import annotations

import os
import signal

ENV = "KUBETUNE_FAULT"


def reach(point: str, step: int, stage: str | None = None) -> None:
    """Deliver the configured fault if this is its point (in this stage) and step."""
    fault = os.environ.get(ENV)
    if not fault:
        return
    name, _, where = fault.partition("@")
    at_point, _, at_step = where.rpartition(":")
    if at_point in (point, f"{stage}.{point}") and at_step == str(step):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
