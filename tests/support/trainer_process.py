"""Run the trainer as the pod does (`python -m kubetune.trainer`), in a subprocess, with an
optional injected fault; returns its exit code and the TrainerResult it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_trainer(config: Path, work: Path, fault: str | None = None) -> tuple[int, dict[str, Any]]:
    result = work.parent / f"result-{work.name}.json"
    env = {k: v for k, v in os.environ.items() if k != "KUBETUNE_FAULT"}
    if fault:
        env["KUBETUNE_FAULT"] = fault
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(config),
         "--result-file", str(result), "--work-dir", str(work)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return proc.returncode, json.loads(result.read_text()) if result.exists() else {}
