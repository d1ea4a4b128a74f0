"""Every fine-tuning method for a few steps on one GPU, through the pod's entry point
(`python -m kubetune.trainer`), with peak GPU memory next to the calculator's estimate.

    python bench/trainer_methods.py --arch llama-3.2-1b --out DIR [--work DIR] [--methods …]

Writes DIR/methods.json and one log per method; artifacts go to --work. Needs a CUDA
GPU (and bitsandbytes for QLoRA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

METHODS = ("LoRA", "QLoRA", "Full", "PrefixTuning", "PromptTuning")


def spec_for(method: str, arch: str, seq: int, batch: int, steps: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": f"builtin://random/{arch}"},
        "dataset": {"uri": "builtin://quickstart", "validation": {"count": 16}},
        "method": method,
        "training": {
            "maxSteps": steps,
            "batchSize": batch,
            "maxSeqLength": seq,
            "logEverySteps": 1,
            "gradientCheckpointing": "Disabled" if method == "PrefixTuning" else "Enabled",
            "learningRate": "1e-5" if method == "Full" else "2e-4",
            "checkpoint": {"everySteps": 1000},
        },
        "evaluation": {"metrics": ["Perplexity"], "maxSamples": 16},
    }
    if method in ("LoRA", "QLoRA"):
        spec["lora"] = {"rank": 16, "alpha": 32, "targetModules": ["all-linear"]}
    if method == "PrefixTuning":
        spec["prefixTuning"] = {"numVirtualTokens": 20}
    if method == "PromptTuning":
        spec["promptTuning"] = {"numVirtualTokens": 20}
    return spec


def estimate(spec: dict[str, Any], arch: str) -> float:
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.calc import load_architecture, preflight

    verdict = preflight(FineTuneJobSpec.model_validate(spec), load_architecture(arch), None, 1)
    return verdict.needed_gib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama-3.2-1b")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        spec = spec_for(method, args.arch, args.seq, args.batch, args.steps)
        work = args.work / f"work-{method}"
        config = {
            "run": {"namespace": "bench", "jobName": method.lower(), "runId": "r1",
                    "outputUri": str(args.work / "artifacts")},
            "spec": spec, "metricsPort": 0, "allowBuiltinRandom": True,
        }  # fmt: skip
        path = args.work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(config))
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune.trainer", "--config", str(path),
             "--result-file", str(args.work / f"{method}-result.json"), "--work-dir", str(work)],
            capture_output=True, text=True,
        )  # fmt: skip
        (args.out / f"{method}.log").write_text(proc.stdout + proc.stderr)
        run_uri = args.work / "artifacts" / "bench" / method.lower() / "r1"
        manifest = run_uri / "manifest.json"
        training = {}
        if manifest.exists():
            training = json.loads(manifest.read_text())["metrics"]["training"]
        rows.append(
            {
                "method": method,
                "exit": proc.returncode,
                "seconds": round(time.time() - started, 1),
                "peak_allocated_gib": training.get("peak_memory_allocated_gib"),
                "peak_reserved_gib": training.get("peak_memory_reserved_gib"),
                "estimate_gib": round(estimate(spec, args.arch), 2),
                "train_loss": training.get("train_loss"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "methods.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
