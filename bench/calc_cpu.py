"""The memory calculator on CPU runs: the trainer's host-memory estimate against the peak
resident memory the training stage reached, on a grid of short `kubetune run` jobs.

Each job trains the built-in SmolLM2-135M-Instruct for a few steps on a CPU, with packed
(or padded) rows of text whose token lengths follow the lognormal distribution of
`throughput.py`. The trainer logs, before it loads the weights,

    Memory estimate: X GiB more (this process holds Y GiB), of Z GiB available on ...

and, after the training stage,

    Peak memory: P GiB resident

(the process's VmHWM, reset when the stage starts). The prediction is X + Y: what the
process held at the check plus what the calculator says training adds.

    python bench/calc_cpu.py --out OUT            # the documented grid (~40 min, 2 cores)
    python bench/calc_cpu.py --only lora-2x1024 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from throughput import write_rows

MODEL = "builtin://smollm2-135m-instruct"
GRID: dict[str, dict[str, Any]] = {
    "lora-1x128": {"batchSize": 1, "maxSeqLength": 128},
    "lora-2x1024": {"batchSize": 2, "maxSeqLength": 1024},
    "lora-2x1024-gc": {"batchSize": 2, "maxSeqLength": 1024, "gradientCheckpointing": "Enabled"},
    "lora-1x2048": {"batchSize": 1, "maxSeqLength": 2048},
    "lora-4x512": {"batchSize": 4, "maxSeqLength": 512},
    "lora-2x1024-padded": {"batchSize": 2, "maxSeqLength": 1024, "packing": "None"},
    "full-2x512": {"batchSize": 2, "maxSeqLength": 512, "method": "Full"},
    "lora-2x2048": {"batchSize": 2, "maxSeqLength": 2048},
    "lora-4x2048-gc": {"batchSize": 4, "maxSeqLength": 2048, "gradientCheckpointing": "Enabled"},
    "lora-2x2048-auto-15g": {
        "batchSize": 2,
        "maxSeqLength": 2048,
        "gradientCheckpointing": "Auto",
        "env": {"KUBETUNE_HOST_MEMORY_GIB": "15"},
    },
    "lora-4x2048-auto": {"batchSize": 4, "maxSeqLength": 2048, "gradientCheckpointing": "Auto"},
}
ESTIMATE = re.compile(r"Memory estimate: ([\d.]+) GiB more \(this process holds ([\d.]+) GiB\)")
PEAK = re.compile(r"Peak memory: ([\d.]+) GiB resident")
CHECKPOINTING = re.compile(r"Gradient checkpointing: (.*)")


def job(name: str, data: Path, steps: int, fields: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in fields.items() if k != "env"}
    method = fields.pop("method", "LoRA")
    training = {
        "maxSteps": steps,
        "gradientCheckpointing": "Disabled",
        "logEverySteps": 1,
        "checkpoint": {"everySteps": 100000},
        **fields,
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": MODEL},
            "dataset": {"uri": str(data), "format": "Alpaca", "validation": {"count": 4}},
            "method": method,
            "training": training,
            "evaluation": {"metrics": ["Perplexity"], "maxSamples": 2, "compareBase": False},
            "export": {"merge": False},
        },
    }


def run(
    name: str, spec: dict[str, Any], out: Path, work: Path, env: dict[str, str]
) -> dict[str, Any]:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    command = [sys.executable, "-m", "kubetune", "run", str(path), "--output", str(work)]
    started = time.monotonic()
    with (out / f"{name}.log").open("w") as handle:
        code = subprocess.call(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    text = (out / f"{name}.log").read_text()
    result: dict[str, Any] = {
        "name": name,
        "exit": code,
        "wall_s": round(time.monotonic() - started),
    }
    if found := ESTIMATE.search(text):
        result["estimate_more_GiB"], result["held_GiB"] = map(float, found.groups())
        result["predicted_GiB"] = round(result["estimate_more_GiB"] + result["held_GiB"], 2)
    if found := PEAK.search(text):
        result["measured_GiB"] = float(found.group(1))
    if found := CHECKPOINTING.search(text):
        result["checkpointing"] = found.group(1)
    if "predicted_GiB" in result and "measured_GiB" in result:
        result["error"] = result["predicted_GiB"] / result["measured_GiB"] - 1
    if code != 0:
        result["log_tail"] = text[-2000:]
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| Job | Gradient checkpointing | Held at the check | Estimate (held + more) "
        "| Measured peak | Error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" not in r:
            lines.append(f"| {r['name']} | failed (exit {r['exit']}) | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r.get('checkpointing', '')} | {r['held_GiB']:.1f} GiB "
            f"| {r['predicted_GiB']:.2f} GiB | {r['measured_GiB']:.2f} GiB "
            f"| {100 * r['error']:+.1f} % |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="run folders (default OUT/runs)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--only", nargs="*", choices=sorted(GRID), help="a subset of the grid")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "runs"
    data = args.out / "data.jsonl"
    write_rows(data, args.rows, None)
    results = [
        run(name, job(name, data, args.steps, fields), args.out, work, fields.get("env", {}))
        for name, fields in GRID.items()
        if not args.only or name in args.only
    ]
    (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(table(results))
    return 0 if all("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
