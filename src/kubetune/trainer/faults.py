"""Fault injection for tests of the trainer's recovery (never set in production).

`KUBETUNE_FAULT="<signal>@<point>:<step>"` sends the signal to this process when the
trainer reaches the point at that step, e.g. `KILL@checkpoint-committed:4` (a pod lost
right after a checkpoint) or `TERM@step-end:3` (a preemption with a grace period). A point
prefixed with a stage type (`KILL@DPO.checkpoint-committed:2`) fires in that stage only,
where the caller names its stage. The fault fires the first time its point and step are
reached in the process; a restarted process without the variable runs clean.

The points, in the order a run reaches them, with what their step counts:

- `data` (files of the dataset already published): the prepared data is being published
  (`data_stage`), before each file; its report goes last.
- `eval` (0 or 1): 0 = the base model is measured, `eval/base.json` not yet written;
  1 = the tuned model is measured, the judge not yet run (`eval_stage`).
- `mid-step` (the optimizer step under way): the step's gradients are computed, the
  optimizer has not updated the weights (`sft`, every Trainer stage).
- `step-end` (the optimizer step): after a step (`sft` for every Trainer stage,
  `rlhf_stage` for PPO).
- `checkpoint-download` (files already downloaded): a restarted stage is downloading the
  checkpoint it resumes from, before each file (`checkpointing`).
- `checkpoint-upload` (the checkpoint's step): half of a checkpoint's files are in the
  store, the rest and its `COMMITTED` marker are not.
- `checkpoint-marker` (the checkpoint's step): every file of a checkpoint is in the store,
  its marker is not.
- `checkpoint-prune` (the pruned checkpoint's step): an older checkpoint is half deleted,
  its marker gone and its files still there.
- `checkpoint-committed` (the checkpoint's step): a checkpoint is committed and the
  training log uploaded (`sft`).
- `export` (0, 1, …): 0 = the merged weights are made, nothing quantized yet; i = the i-th
  quantized variant is made (`export_stage`).
- `publish` (files already uploaded): the evaluation files and the report are being
  uploaded (`eval_publish`), before each file.
- `manifest` (0): every evaluation file and the report are in the store, `manifest.json`
  is not yet written.

The checkpoint points fire in every stage (the stage prefix works where the caller passes
its stage). docs/reliability.md ("Trainer faults") says what a restart guarantees at each.
"""

from __future__ import annotations

import os
import signal

ENV = "KUBETUNE_FAULT"

POINTS = (
    "data",
    "eval",
    "mid-step",
    "step-end",
    "checkpoint-download",
    "checkpoint-upload",
    "checkpoint-marker",
    "checkpoint-prune",
    "checkpoint-committed",
    "export",
    "publish",
    "manifest",
)
"""Every fault point, in the order a run reaches them."""


def reach(point: str, step: int, stage: str | None = None) -> None:
    """Deliver the configured fault if this is its point (in this stage) and step."""
    fault = os.environ.get(ENV)
    if not fault:
        return
    name, _, where = fault.partition("@")
    at_point, _, at_step = where.rpartition(":")
    if at_point in (point, f"{stage}.{point}") and at_step == str(step):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
