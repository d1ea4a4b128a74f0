"""Run the trainer entry point many times, each in a fresh process, without paying the heavy
imports each time: the processes are forked from multiprocessing's fork server, which has
imported torch, transformers, PEFT, TRL and the trainer once (about 4-7 s saved per run on
2 cores).

Each run is a new process, as a restarted pod is: nothing of an earlier run survives in
memory, signals (an injected SIGKILL) end that process alone, and its exit code is reported
as the pod's would be (`-9` after SIGKILL). Differences from `python -m kubetune.trainer`,
all chosen for speed and reproducibility on a shared CPU: torch uses one thread, and the
trainer's own worker pools fork (as they do in a pod, where fork is the default).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRELOAD = [
    "torch",
    "transformers",
    "transformers.trainer",
    "transformers.models.llama.modeling_llama",
    "peft",
    "trl",
    "trl.trainer.sft_trainer",
    "datasets",
    "safetensors.torch",
]
"""Modules the fork server imports once; every run starts with them loaded. Not kubetune:
the server does not get the test's `sys.path` (Python 3.11 ignores it), while each child
does, so kubetune comes from the checkout under test, not from an installed copy."""

TIMEOUT_S = 600


@dataclass(frozen=True)
class TrainerRun:
    """One trainer process: its exit code (negative: the signal that ended it), the
    TrainerResult it wrote ({} when it wrote none) and its log."""

    code: int
    result: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def _child(config: str, result: str, work: str, env: dict[str, str], log: str) -> None:
    """The trainer's main in the forked process, with its output in `log`."""
    multiprocessing.set_start_method("fork", force=True)
    os.environ.pop("KUBETUNE_FAULT", None)
    os.environ.update(env)
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    import torch

    from kubetune.trainer.runner import run_from_file

    torch.set_num_threads(1)
    sys.exit(run_from_file(Path(config), Path(result), Path(work)))


class ForkedTrainer:
    """Starts trainer processes from a fork server with `PRELOAD` imported."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        self.runs = 0

    def run(
        self,
        config: Path,
        work: Path,
        fault: str | None = None,
        env: dict[str, str] | None = None,
    ) -> TrainerRun:
        """Run the trainer on `config` in a fresh `work` dir; `fault` sets KUBETUNE_FAULT."""
        self.runs += 1
        result = work.parent / f"result-{work.name}.json"
        log = work.parent / f"log-{work.name}.txt"
        child_env = dict(env or {})
        if fault:
            child_env["KUBETUNE_FAULT"] = fault
        process = self._context.Process(
            target=_child, args=(str(config), str(result), str(work), child_env, str(log))
        )
        process.start()
        process.join(TIMEOUT_S)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise TimeoutError(f"the trainer on {config} ran over {TIMEOUT_S} s; see {log}")
        written = json.loads(result.read_text()) if result.exists() else {}
        return TrainerRun(process.exitcode, written, log.read_text(errors="replace"))
