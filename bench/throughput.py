"""Training throughput and memory of `kubetune run` against the plain Hugging Face stack,
measured in the same GPU lease on the same model shape and data distribution.

The baseline is `hf_baseline.py` (the script behind PERF_BASELINE.md: TRL's SFTTrainer with
its defaults, and "tuned" with padding-free batches + Liger), run from `--baseline`. Ours is
a FineTuneJob run through `kubetune run` with kubetune's defaults (packed rows with
per-document attention, fused kernels, lean adapters, gradient checkpointing only where the
calculator says memory needs it). Both see random weights of the same architecture and
documents whose token lengths follow the same lognormal distribution (median 350, sigma
0.8, clipped to [32, 2048]); ours get them as text rows through the data stage.

Throughput counts real (non-padding) tokens, end to end, after `--warmup` steps: for ours
from the trainer's own log (`logs/train.jsonl`, one record per step), for the baseline from
its step timer. Peak memory is the trainer stage's `max_memory_allocated` and
`max_memory_reserved`; the calculator's prediction for the same job sits next to it.

Parts (each fits one GPU command of under 8 minutes):

    python bench/throughput.py --part lora-8b  --baseline DIR/hf_baseline.py --out OUT
    python bench/throughput.py --part full-1b  --baseline DIR/hf_baseline.py --out OUT
    python bench/throughput.py --part qlora-8b --baseline DIR/hf_baseline.py --out OUT
    python bench/throughput.py --part dpo-8b --out OUT   # baseline: dpo_baseline.py (TRL)
    python bench/throughput.py --part calc-1b --steps 8 --warmup 2 --out OUT  # the calculator
    python bench/throughput.py --part calc-8b --steps 8 --warmup 2 --out OUT  # (needs bitsandbytes)

`--ours-only` skips the baseline; `--variants` adds runs of ours with one fast path off.
`--model`, `--steps` and `--rows` shrink a part for a quick check (e.g. on a CPU with
`--model builtin://smollm2-135m-instruct --steps 3 --ours-only`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

LEN_MEDIAN, LEN_SIGMA, LEN_MIN, LEN_MAX = 350, 0.8, 32, 2048
_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
)
WORDS = tuple(_TEXT.split(" "))

PARTS: dict[str, dict[str, Any]] = {
    "lora-8b": {
        "model": "builtin://random/llama-3.1-8b",
        "method": "LoRA",
        "baseline": ["A-8b", "B-8b"],
        "variants": {
            "batch-8": {"batchSize": 8},
            "no-fused-kernels": {"fastPaths": {"fusedKernels": "Disabled"}},
            "no-lean-adapters": {"fastPaths": {"leanAdapters": "Disabled"}},
            "checkpoint-all": {"gradientCheckpointing": "Enabled"},
        },
    },
    "full-1b": {
        "model": "builtin://random/llama-3.2-1b",
        "method": "Full",
        "baseline": ["D-1b", "Dpf-1b"],
        "variants": {
            "batch-8": {"batchSize": 8},
            "checkpoint-all": {"gradientCheckpointing": "Enabled"},
        },
    },
    "dpo-8b": {
        "model": "builtin://random/llama-3.1-8b",
        "method": "LoRA",
        "pairs": True,
        "baseline": ["TRL DPO defaults"],
        "variants": {
            "padded": {"packing": "None"},
            "checkpoint-all": {"gradientCheckpointing": "Enabled"},
        },
    },
    # The calculator against measured peaks: short runs of one configuration each (method x
    # model x sequence length x batch x checkpointing), ours only.
    "calc-1b": {
        "model": "builtin://random/llama-3.2-1b",
        "method": "LoRA",
        "grid": {
            "lora-4x2048-auto": {"batchSize": 4},
            "lora-8x1024-gc": {
                "batchSize": 8,
                "maxSeqLength": 1024,
                "gradientCheckpointing": "Enabled",
            },
            "lora-2x4096-auto": {"batchSize": 2, "maxSeqLength": 4096},
            "full-2x2048-gc": {
                "method": "Full",
                "batchSize": 2,
                "gradientCheckpointing": "Enabled",
            },
            "full-8x2048-auto": {"method": "Full", "batchSize": 8},
            "qlora-4x2048-gc": {
                "method": "QLoRA",
                "batchSize": 4,
                "gradientCheckpointing": "Enabled",
            },
        },
    },
    "calc-8b": {
        "model": "builtin://random/llama-3.1-8b",
        "method": "LoRA",
        "grid": {
            "lora-2x2048-auto": {"batchSize": 2},
            "lora-8x2048-gc": {"batchSize": 8, "gradientCheckpointing": "Enabled"},
            "lora-4x4096-auto": {"batchSize": 4, "maxSeqLength": 4096},
            "lora-4x2048-offload": {
                "batchSize": 4,
                "gradientCheckpointing": "Enabled",
                "activationOffload": "Enabled",
            },
            "qlora-4x2048-gc": {
                "method": "QLoRA",
                "batchSize": 4,
                "gradientCheckpointing": "Enabled",
            },
            "qlora-8x1024-gc": {
                "method": "QLoRA",
                "batchSize": 8,
                "maxSeqLength": 1024,
                "gradientCheckpointing": "Enabled",
            },
            "lora-2x2048-plain-hf": {
                "batchSize": 2,
                "fastPaths": {"fusedKernels": "Disabled", "leanAdapters": "Disabled"},
            },
        },
    },
    "qlora-8b": {
        "model": "builtin://random/llama-3.1-8b",
        "method": "QLoRA",
        "baseline": ["C-8b", "Cpf-8b"],
        # The 8 GiB budget: every layer checkpointed with its input in host memory, 4 packed
        # rows of 2048 tokens per step.
        "training": {
            "gradientCheckpointing": "Enabled",
            "activationOffload": "Enabled",
            "batchSize": 4,
        },
        "variants": {
            "batch-1": {"batchSize": 1, "activationOffload": "Disabled"},
            "batch-2": {"batchSize": 2, "activationOffload": "Disabled"},
            "no-offload": {"activationOffload": "Disabled"},
            "no-fused-kernels": {"fastPaths": {"fusedKernels": "Disabled"}},
            "no-lean-adapters": {"fastPaths": {"leanAdapters": "Disabled"}},
        },
    },
}


def log(*args: Any) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Data: text rows whose token counts follow the baseline's length distribution
# ---------------------------------------------------------------------------------------------
def target_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = math.exp(rng.gauss(math.log(LEN_MEDIAN), LEN_SIGMA))
        out.append(int(min(max(round(x), LEN_MIN), LEN_MAX)))
    return out


def write_rows(path: Path, n: int, tokenizer_dir: str | None, seed: int = 0) -> dict[str, Any]:
    """Alpaca rows (instruction, output) of about the target token counts (chat template
    included); returns the realised length statistics when a tokenizer is given."""
    rng = random.Random(seed + 1)
    lengths = target_lengths(n, seed)
    rows = []
    for i, length in enumerate(lengths):
        instruction = f"Task {i}: " + " ".join(rng.choice(WORDS) for _ in range(8))
        # The template and the instruction take about 45 tokens; a common word is one token.
        answer = " ".join(rng.choice(WORDS) for _ in range(max(length - 45, 4)))
        rows.append({"instruction": instruction, "output": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if tokenizer_dir is None:
        return {"rows": n}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = sorted(
        len(
            tok.apply_chat_template(
                [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ],
                tokenize=True,
                return_dict=False,
            )
        )
        for r in rows[:2000]
    )
    return {
        "rows": n,
        "median_tokens": counts[len(counts) // 2],
        "mean_tokens": round(sum(counts) / len(counts), 1),
        "p90_tokens": counts[int(0.9 * len(counts))],
    }


def write_pairs(path: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Preference pairs: a short prompt and two answers whose token counts follow the same
    lognormal distribution, halved (a pair is prompt + chosen + rejected)."""
    rng = random.Random(seed + 2)
    lengths = target_lengths(2 * n, seed)
    rows = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(20))

        def answer(length: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(max(length // 2 - 20, 4)))

        rows.append(
            {
                "prompt": prompt,
                "chosen": answer(lengths[2 * i]),
                "rejected": answer(lengths[2 * i + 1]),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"pairs": n}


# ---------------------------------------------------------------------------------------------
# Ours: one FineTuneJob through `kubetune run`
# ---------------------------------------------------------------------------------------------
def job(
    name: str, part: dict[str, Any], data: Path, steps: int, extra: dict[str, Any]
) -> dict[str, Any]:
    training: dict[str, Any] = {
        **part.get("training", {}),
        "maxSteps": steps,
        "logEverySteps": 1,
        "checkpoint": {"everySteps": 100000},
    }
    extra = dict(extra)
    part = {**part, "model": extra.pop("model", part["model"])}
    part["method"] = extra.pop("method", part["method"])
    fast = extra.pop("fastPaths", None)
    training.update(extra)
    if fast:
        training["fastPaths"] = fast
    pairs = bool(part.get("pairs"))
    spec: dict[str, Any] = {
        "model": {"uri": part["model"]},
        "dataset": {
            "uri": str(data),
            "format": "Preference" if pairs else "Alpaca",
            "validation": {"count": 8},
        },
        "method": part["method"],
        "training": training,
        "evaluation": {"metrics": ["Perplexity"], "maxSamples": 4, "compareBase": False},
        "export": {"merge": False},
    }
    if pairs:  # one DPO stage on the pairs, TRL's default learning rate
        spec["stages"] = [{"type": "DPO", "training": {"learningRate": "1e-6"}}]
    if part["method"] in ("LoRA", "QLoRA"):
        spec["lora"] = {"rank": 16, "targetModules": ["all-linear"]}
    else:
        training["learningRate"] = "2e-5"
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def run_ours(
    spec: dict[str, Any], out: Path, work: Path, warmup: int, timeout: float
) -> dict[str, Any]:
    name = spec["metadata"]["name"]
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    command = [sys.executable, "-m", "kubetune", "run", str(path), "--output", str(work / "runs")]
    started = time.monotonic()
    with (out / f"{name}.log").open("w") as handle:
        try:
            code = subprocess.call(
                command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            code = -9
    wall = time.monotonic() - started
    log(f"{name}: exit {code} in {wall:.0f} s")
    result: dict[str, Any] = {"name": name, "exit": code, "wall_s": round(wall, 1)}
    runs = work / "runs" / "local" / name
    folder = next(runs.iterdir(), None) if runs.is_dir() else None
    if folder is None or not (folder / "logs" / "train.jsonl").is_file():
        result["log_tail"] = (out / f"{name}.log").read_text()[-3000:]
        return result
    records = [json.loads(line) for line in (folder / "logs" / "train.jsonl").open()]
    steps = [r for r in records if "loss" in r and "num_input_tokens_seen" in r]
    if len(steps) > warmup + 1:
        first = next(r for r in steps if r["step"] > warmup)
        last = steps[-1]
        tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
        seconds = last["time"] - first["time"]
        batch = int(spec["spec"]["training"].get("batchSize", 4))
        result.update(
            {
                "tok_s": tokens / seconds,
                "pairs_s": (last["step"] - first["step"]) * batch / seconds,
                "measured_steps": last["step"] - first["step"],
                "tokens_per_step": tokens / max(last["step"] - first["step"], 1),
                "losses": [r["loss"] for r in steps],
            }
        )
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        stage = json.loads(manifest_path.read_text())["metrics"]["stages"][0]["metrics"]
        result["peak_alloc_GiB"] = stage.get("peak_memory_allocated_gib")
        result["peak_reserved_GiB"] = stage.get("peak_memory_reserved_gib")
    text = (out / f"{name}.log").read_text()
    lines = (
        "Gradient checkpointing:",
        "Activation offload:",
        "Fused kernels:",
        "Attention:",
        "Memory estimate:",
    )
    for prefix in (*lines, "DPO batches:"):
        line = next((x for x in text.splitlines() if prefix in x), None)
        if line:
            result[prefix.rstrip(":").lower().replace(" ", "_")] = line.split(prefix, 1)[1].strip()
    result["predicted"] = predicted(path)
    if code != 0:
        result["log_tail"] = text[-3000:]
    return result


def predicted(job_path: Path) -> dict[str, Any] | None:
    """The calculator's estimate for the job on this GPU (Auto decided as the trainer does)."""
    command = [sys.executable, "-m", "kubetune", "calc", "--job", str(job_path), "--json"]
    try:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
            command += ["--gpu-memory", f"{memory:.1f}"]
    except ImportError:
        pass
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        return {"error": done.stderr[-500:]}
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": done.stdout[-500:] + done.stderr[-500:]}
    memory = report["memory"]
    return {
        "allocated_GiB": float(memory["allocatedGiB"]),
        "reserved_GiB": float(memory["allocatedGiB"]) + float(memory["fragmentationGiB"]),
        "checkpointed_layers": report["setup"].get("checkpointedLayers"),
    }


# ---------------------------------------------------------------------------------------------
# The baseline: hf_baseline.py's driver in a subprocess
# ---------------------------------------------------------------------------------------------
def run_baseline(
    script: Path, names: list[str], out: Path, work: Path, deadline: float
) -> dict[str, Any]:
    folder = work / "baseline"
    command = [sys.executable, str(script), "--run", ",".join(names), "--out", str(folder)]
    command += ["--deadline", str(int(deadline))]
    with (out / "baseline.log").open("w") as handle:
        subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    results_path = folder / "results.json"
    if not results_path.is_file():
        return {"error": (out / "baseline.log").read_text()[-3000:]}
    data = json.loads(results_path.read_text())
    keep = ("name", "tok_s", "mfu_790", "peak_alloc_GiB", "peak_reserved_GiB", "error", "desc")
    return {
        "env": data.get("env", {}),
        "results": [{k: r[k] for k in keep if k in r} for r in data.get("results", [])],
    }


def run_dpo_baseline(
    part: dict[str, Any], data: Path, out: Path, work: Path, steps: int, warmup: int, timeout: float
) -> dict[str, Any]:
    """`dpo_baseline.py` on the same pairs and architecture (its config folder from
    kubetune's resolver: config.json and the tokenizer)."""
    from kubetune.api.v1alpha1.finetunejob import ModelSource
    from kubetune.trainer.resolve import resolve_model

    resolved = resolve_model(ModelSource(uri=part["model"]), allow_builtin_random=True)
    batch = int(part.get("training", {}).get("batchSize", 4))
    command = [
        sys.executable,
        str(Path(__file__).with_name("dpo_baseline.py")),
        "--config-dir",
        str(resolved.path),
        "--data",
        str(data),
        "--steps",
        str(steps - warmup - 1),
        "--warmup",
        str(warmup),
        "--batch",
        str(batch),
        "--out",
        str(work / "dpo-baseline"),
    ]
    with (out / "baseline.log").open("w") as handle:
        try:
            done = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=handle, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"results": [{"name": "TRL DPO defaults", "error": "timeout"}]}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return {"results": [json.loads(line[len("RESULT_JSON ") :])]}
    tail = (out / "baseline.log").read_text()[-2000:]
    return {"results": [{"name": "TRL DPO defaults", "error": f"exit {done.returncode}: {tail}"}]}


def table(report: dict[str, Any]) -> str:
    if PARTS[report["part"]].get("pairs"):
        return pairs_table(report)
    if "grid" in PARTS[report["part"]]:
        return calc_table(report)
    base = {r["name"]: r for r in report.get("baseline", {}).get("results", [])}
    names = report.get("baseline_configs") or PARTS[report["part"]]["baseline"]
    default = base.get(names[0], {}).get("tok_s") if names else None
    tuned = base.get(names[1], {}).get("tok_s") if len(names) > 1 else None
    lines = [
        "| Run | tok/s | vs HF default | vs HF tuned | Peak allocated / reserved GiB "
        "| Calculator reserved GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        r = base.get(name, {})
        if "tok_s" in r:
            lines.append(
                f"| HF {name} | {r['tok_s']:,.0f} | | | {r.get('peak_alloc_GiB', 0):.1f} / "
                f"{r.get('peak_reserved_GiB', 0):.1f} | |"
            )
    for r in report["ours"]:
        if "tok_s" not in r:
            lines.append(f"| {r['name']} | failed (exit {r.get('exit')}) | | | | |")
            continue
        pred = (r.get("predicted") or {}).get("reserved_GiB")
        lines.append(
            f"| {r['name']} | {r['tok_s']:,.0f} | "
            + (f"{r['tok_s'] / default:.2f}×" if default else "")
            + " | "
            + (f"{r['tok_s'] / tuned:.2f}×" if tuned else "")
            + f" | {r.get('peak_alloc_GiB') or 0:.1f} / {r.get('peak_reserved_GiB') or 0:.1f} | "
            + (f"{pred:.1f}" if pred else "")
            + " |"
        )
    return "\n".join(lines)


def calc_table(report: dict[str, Any]) -> str:
    """Measured peak memory against the calculator's estimate for each configuration."""
    lines = [
        "| Configuration | Checkpointed layers | Allocated GiB, estimate / measured "
        "| Reserved GiB, estimate / measured | Error (reserved) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["ours"]:
        pred, alloc, reserved = (
            r.get("predicted") or {},
            r.get("peak_alloc_GiB"),
            r.get("peak_reserved_GiB"),
        )
        if not alloc or "reserved_GiB" not in pred:
            lines.append(f"| {r['name']} | failed (exit {r.get('exit')}) | | | |")
            continue
        error = pred["reserved_GiB"] / reserved - 1
        lines.append(
            f"| {r['name']} | {pred.get('checkpointed_layers')} | "
            f"{pred['allocated_GiB']:.2f} / {alloc:.2f} | {pred['reserved_GiB']:.2f} / "
            f"{reserved:.2f} | {error:+.1%} |"
        )
    return "\n".join(lines)


def pairs_table(report: dict[str, Any]) -> str:
    """Preference parts compare pairs per second (the two sides count tokens differently:
    TRL's collator repeats the prompt in both sequences)."""
    base = (report.get("baseline", {}).get("results") or [{}])[0]
    reference = base.get("pairs_s")
    lines = [
        "| Run | pairs/s | vs TRL defaults | Peak allocated / reserved GiB |",
        "| --- | --- | --- | --- |",
    ]
    if reference:
        lines.append(
            f"| TRL DPO defaults | {reference:.2f} | | {base.get('peak_alloc_GiB') or 0:.1f} / "
            f"{base.get('peak_reserved_GiB') or 0:.1f} |"
        )
    for r in report["ours"]:
        if "pairs_s" not in r:
            lines.append(f"| {r['name']} | failed (exit {r.get('exit')}) | | |")
            continue
        ratio = f"{r['pairs_s'] / reference:.2f}×" if reference else ""
        lines.append(
            f"| {r['name']} | {r['pairs_s']:.2f} | {ratio} | {r.get('peak_alloc_GiB') or 0:.1f} / "
            f"{r.get('peak_reserved_GiB') or 0:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--baseline", type=Path, help="path of hf_baseline.py")
    parser.add_argument("--baseline-configs", help="comma-separated, instead of the part's")
    parser.add_argument("--work", type=Path, help="data and runs (default: --out)")
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--variants", nargs="*", default=[], help="extra runs of ours")
    parser.add_argument("--model", help="override the part's model URI")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--max-seq-length", type=int, help="one packed row of this length")
    parser.add_argument("--deadline", type=float, default=460, help="seconds for the part")
    parser.add_argument(
        "--baseline-share",
        type=float,
        default=0.45,
        help="fraction of --deadline the baseline may use (two 8B baselines need about 0.6)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder for the length statistics")
    args = parser.parse_args()
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    part = dict(PARTS[args.part])
    if args.model:
        part["model"] = args.model
    if args.max_seq_length:
        part["training"] = {
            **part.get("training", {}),
            "maxSeqLength": args.max_seq_length,
            "batchSize": 1,
        }
    report: dict[str, Any] = {"part": args.part, "model": part["model"], "ours": []}
    if args.baseline_configs:
        report["baseline_configs"] = args.baseline_configs.split(",")
    work = (args.work or out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    if part.get("pairs"):
        report["data"] = write_pairs(data, args.rows)
    else:
        report["data"] = write_rows(data, args.rows, args.tokenizer)

    def save() -> None:
        (out / "results.json").write_text(json.dumps(report, indent=1))

    if "grid" in part:
        pass  # the calculator against measured peaks: no baseline
    elif not args.ours_only and part.get("pairs"):
        report["baseline"] = run_dpo_baseline(
            part, data, out, work, args.steps, args.warmup, args.baseline_share * args.deadline
        )
        save()
    elif not args.ours_only:
        if args.baseline is None:
            parser.error("--baseline is required unless --ours-only")
        if args.baseline_configs:
            part["baseline"] = args.baseline_configs.split(",")
        report["baseline"] = run_baseline(
            args.baseline, part["baseline"], out, work, args.baseline_share * args.deadline
        )
        save()
    if "grid" in part:  # --variants picks configurations of the grid
        runs = [(k, v) for k, v in part["grid"].items() if not args.variants or k in args.variants]
    else:
        runs = [("ours", {})] + [(v, dict(part["variants"][v])) for v in args.variants]
    for label, extra in runs:
        left = args.deadline - (time.monotonic() - started)
        if left < 60:
            report["ours"].append({"name": f"{args.part}-{label}", "error": "out of time"})
            continue
        spec = job(f"{args.part}-{label}", part, data, args.steps, extra)
        report["ours"].append(run_ours(spec, out, work, args.warmup, left - 5))
        save()
    report["table"] = table(report)
    save()
    (out / "table.md").write_text(report["table"] + "\n", encoding="utf-8")
    brief = {k: v for k, v in report.items() if k not in ("ours", "table")}
    log(json.dumps(brief, indent=1, default=str)[:4000])
    for r in report["ours"]:
        log(json.dumps({k: v for k, v in r.items() if k != "losses"}, default=str)[:3000])
    log(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
