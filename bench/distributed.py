"""Training on several GPUs against one, through `kubetune run`: loss agreement, tokens/s per
GPU, scaling efficiency, peak memory per GPU against the calculator, and a kill/resume.

Each case is one FineTuneJob run twice on the same data and the same global batch: on one
GPU with gradient accumulation 2, and on 2 GPUs (torchrun, one process per GPU) with
accumulation 1. Throughput counts the tokens of every rank after the first `--warmup` steps.

    python bench/distributed.py --out /tmp/dist              # all cases
    python bench/distributed.py --out /tmp/dist --cases lora-fsdp --resume
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "dist"},
    "spec": {
        "model": {"uri": "builtin://random/llama-3.2-1b"},
        "dataset": {"uri": "builtin://quickstart", "validation": {"count": 32}},
        "method": "LoRA",
        "lora": {"rank": 16, "targetModules": ["all-linear"]},
        "training": {
            "maxSteps": 40,
            "batchSize": 8,
            "maxSeqLength": 512,
            "logEverySteps": 1,
            "checkpoint": {"everySteps": 1000},
        },
        "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4, "compareBase": False},
        "export": {"merge": False},
    },
}
CASES = {
    "lora-fsdp": ("LoRA", "FSDP"),
    "lora-ddp": ("LoRA", "DDP"),
    "full-fsdp": ("Full", "FSDP"),
    "lora-zero3": ("LoRA", "DeepSpeedZeRO3"),
    "full-zero3": ("Full", "DeepSpeedZeRO3"),
    "full-zero2": ("Full", "DeepSpeedZeRO2"),
}


def job(name: str, method: str, strategy: str | None, accumulation: int) -> dict[str, Any]:
    spec = json.loads(json.dumps(BASE))
    spec["metadata"]["name"] = name
    body = spec["spec"]
    body["method"] = method
    if method == "Full":
        del body["lora"]
        body["training"]["learningRate"] = "1e-5"
    body["training"]["gradientAccumulationSteps"] = accumulation
    if strategy:
        body["distributed"] = {"strategy": strategy}
        body["resources"] = {"gpus": 2}
    return spec


def run(spec: dict[str, Any], out: Path, processes: int, fault: str | None = None) -> int:
    path = out / f"{spec['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "KUBETUNE_FAULT"}
    if fault:
        env["KUBETUNE_FAULT"] = fault
    command = [sys.executable, "-m", "kubetune", "run", str(path), "--output", str(out / "runs")]
    command += [f"--nproc-per-node={processes}"]
    log = (out / f"{spec['metadata']['name']}{'-killed' if fault else ''}.log").open("w")
    started = time.monotonic()
    code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{spec['metadata']['name']}: exit {code} in {time.monotonic() - started:.0f} s")
    return code


def run_dir(out: Path, name: str) -> Path:
    return next((out / "runs" / "local" / name).iterdir())


def measure(out: Path, name: str, processes: int, warmup: int) -> dict[str, Any]:
    folder = run_dir(out, name)
    records = [json.loads(line) for line in (folder / "logs" / "train.jsonl").open()]
    steps = [r for r in records if "loss" in r and "num_input_tokens_seen" in r]
    first = next(r for r in steps if r["step"] > warmup)
    last = steps[-1]
    tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    seconds = last["time"] - first["time"]
    manifest = json.loads((folder / "manifest.json").read_text())
    stage = manifest["metrics"]["stages"][0]["metrics"]
    return {
        "name": name,
        "processes": processes,
        "tokens_per_second": tokens / seconds,
        "tokens_per_second_per_gpu": tokens / seconds / processes,
        "losses": [r["loss"] for r in steps],
        "eval_loss": stage.get("eval_loss"),
        "peak_allocated_gib": stage.get("peak_memory_allocated_gib"),
        "peak_reserved_gib": stage.get("peak_memory_reserved_gib"),
        "peak_training_allocated_gib": stage.get("peak_memory_training_allocated_gib"),
        "run": str(folder),
    }


def predicted_gib(
    out: Path, name: str, processes: int, strategy: str | None, gpu_class: str
) -> dict[str, float]:
    """The calculator's peak memory per GPU for the job as run: allocated, and reserved
    (allocated + fragmentation; the CUDA context is not in torch's counters). The GPU class
    lets it settle `gradientCheckpointing: Auto` as the trainer did."""
    command = [sys.executable, "-m", "kubetune", "calc", "--job", str(out / f"{name}.yaml")]
    command += ["--gpus", str(processes), "--gpu-class", gpu_class, "--json"]
    if strategy:
        command += ["--strategy", strategy]
    report = json.loads(subprocess.check_output(command))
    memory = report["memory"]
    return {
        "allocated": float(memory["allocatedGiB"]),
        "reserved": float(memory["allocatedGiB"]) + float(memory["fragmentationGiB"]),
    }


def compare(single: dict[str, Any], multi: dict[str, Any]) -> dict[str, Any]:
    pairs = list(zip(single["losses"], multi["losses"], strict=False))
    tail = pairs[-10:]
    mean_single = sum(a for a, _ in tail) / len(tail)
    mean_multi = sum(b for _, b in tail) / len(tail)
    return {
        "max_step_loss_diff": max(abs(a - b) for a, b in pairs),
        "last10_mean_loss": [mean_single, mean_multi],
        "last10_relative_diff": abs(mean_multi - mean_single) / mean_single,
        "scaling_efficiency": multi["tokens_per_second"] / (2 * single["tokens_per_second"]),
    }


def resume_case(out: Path, reference: str, warmup: int) -> dict[str, Any]:
    """Kill rank 0 right after the checkpoint at step 20, restart, compare the adapter."""
    from safetensors.torch import load_file

    spec = job("lora-fsdp-resume", "LoRA", "FSDP", 1)
    spec["spec"]["training"]["checkpoint"] = {"everySteps": 20}
    killed = run(spec, out, 2, fault="KILL@checkpoint-committed:20")
    resumed = run(spec, out, 2)
    folder = run_dir(out, "lora-fsdp-resume")
    result: dict[str, Any] = {"killed_exit": killed, "resumed_exit": resumed}
    log = (out / "lora-fsdp-resume.log").read_text()
    result["resumed_from_checkpoint"] = "Resuming SFT from the checkpoint at step 20" in log
    train_log = folder / "logs" / "train.jsonl"
    if not train_log.is_file():
        return result
    records = [json.loads(line) for line in train_log.open()]
    result["steps_logged"] = sorted({r["step"] for r in records if "loss" in r})
    result["final_loss"] = [r["loss"] for r in records if "loss" in r][-1]
    if resumed == 0 and (out / "runs" / "local" / reference).is_dir():
        ours = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        theirs = load_file(str(run_dir(out, reference) / "adapter" / "adapter_model.safetensors"))
        result["max_adapter_diff"] = max(
            (ours[k].float() - theirs[k].float()).abs().max().item() for k in ours
        )
        result["max_adapter_value"] = max(t.float().abs().max().item() for t in theirs.values())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resume", action="store_true", help="also the kill/resume case")
    parser.add_argument("--gpu-class", default="H200", help="for the calculator's prediction")
    parser.add_argument(
        "--previous", type=Path, help="a results.json whose one-GPU runs this run reuses"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.previous:
        earlier = json.loads(args.previous.read_text())
        results.update({k: v for k, v in earlier.items() if k.endswith("-single")})
    if args.resume:
        results["resume"] = resume_case(args.out, "lora-fsdp", args.warmup)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for case in args.cases:
        method, strategy = CASES[case]
        single_name = f"{method.lower()}-single"
        if single_name not in results and run(job(single_name, method, None, 2), args.out, 1) == 0:
            results[single_name] = measure(args.out, single_name, 1, args.warmup)
            results[single_name]["predicted_gib"] = predicted_gib(
                args.out, single_name, 1, None, args.gpu_class
            )
        if run(job(case, method, strategy, 1), args.out, 2) != 0:
            results[case] = {"failed": True}
            continue
        results[case] = measure(args.out, case, 2, args.warmup)
        results[case]["predicted_gib"] = predicted_gib(args.out, case, 2, strategy, args.gpu_class)
        if single_name in results:
            results[case]["against_single"] = compare(results[single_name], results[case])
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    brief = {k: {x: y for x, y in v.items() if x != "losses"} for k, v in results.items()}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
