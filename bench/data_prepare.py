"""Benchmark: kubetune's data stage against the straightforward Hugging Face pipeline.

    .venv/bin/python bench/data_prepare.py --rows 1000000

Generates N synthetic Alpaca-style rows (bench/synthetic.py), then prepares them twice,
each side in its own subprocess: **ours** (`kubetune.trainer.data.prepare.prepare_dataset`,
near dedup at 0.85, maxSeqLength 1024, validation fraction 0.05, 2 workers, the built-in
SmolLM2 tokenizer) and **baseline** (bench/baseline_prepare.py: `datasets.map` with
num_proc=2 and `datasketch.MinHashLSH`). It checks that both wrote the same train and
validation files (byte for byte) and the same counts, and prints rows/s, CPU time and peak
memory of each side.

Peak memory: while a side runs, the parent samples the processes of its tree (the
subprocess and all its descendants, via psutil; see `TreeMemory`) and keeps the largest sum
of RSS (shared pages count once per process, so this overstates) and of PSS (shared pages
split between the processes that map them). CPU time is the user + system time of the tree
from `getrusage(RUSAGE_CHILDREN)`; "other CPU" is what the rest of the machine used
meanwhile (from /proc/stat, less the tree and this script's sampling).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SIDES = ("ours", "baseline")
COMPARED = ("counts", "invalidByReason", "filteredByReason", "duplicatesByKind")
RSS_INTERVAL_S = 0.1
LIST_INTERVAL_S = 1.0
PSS_INTERVAL_S = 1.0
MIB = 1024 * 1024
TOKENIZER_ENV = "BENCH_TOKENIZER_DIR"


@dataclass
class Measured:
    """One side's run."""

    side: str
    rows: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    peak_pss_mib: float
    other_cpu_seconds: float
    """CPU time the rest of the machine used meanwhile (other users disturb the timing)."""
    monitor_cpu_seconds: float
    """CPU time this script spent sampling memory meanwhile."""
    result: dict[str, Any]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def _tokenizer_dir() -> Path:
    from kubetune.api.v1alpha1.finetunejob import ModelSource
    from kubetune.trainer.resolve import resolve_model

    return resolve_model(ModelSource(uri="builtin://smollm2-135m-instruct")).path


def run_ours(data: Path, out: Path, tokenizer_dir: Path, workers: int) -> dict[str, Any]:
    """kubetune's data stage (what `kubetune prepare` runs)."""
    from kubetune.api.v1alpha1.dataset import DatasetSpec
    from kubetune.trainer.data.prepare import prepare_dataset

    spec = DatasetSpec.model_validate(
        {
            "uri": str(data),
            "format": "Auto",
            "filters": {"dedup": "Near", "nearDedupThreshold": "0.85"},
            "validation": {"fraction": "0.05"},
        }
    )
    prepared = prepare_dataset(
        spec,
        tokenizer_dir=tokenizer_dir,
        max_seq_length=1024,
        out_dir=out / "data",
        work_dir=out / "work",
        workers=workers,
        log=lambda _: None,
    )
    return {key: prepared.summary[key] for key in COMPARED}


def run_baseline(data: Path, out: Path, tokenizer_dir: Path, workers: int) -> dict[str, Any]:
    """The straightforward `datasets` + `datasketch` pipeline."""
    sys.path.insert(0, str(BENCH_DIR))
    from baseline_prepare import prepare_baseline

    return prepare_baseline(data, out / "data", out / "cache", tokenizer_dir, num_proc=workers)


def _child(side: str, data: Path, out: Path, tokenizer_dir: Path, workers: int) -> None:
    runner = run_ours if side == "ours" else run_baseline
    result = runner(data, out, tokenizer_dir, workers)
    (out / "result.json").write_text(json.dumps(result), encoding="utf-8")


class TreeMemory:
    """Peak memory of a process and its descendants, sampled cheaply enough not to slow
    the run down: RSS (from /proc/PID/statm) every 0.1 s, the process list refreshed every
    second, PSS (from smaps, costly for big processes) at most once a second and only
    while the summed RSS is within 5 % of its peak so far."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.processes = [self.root]
        self.listed_at = self.pss_at = time.perf_counter()
        self.peak_rss = self.peak_pss = 0

    def _each(self, read: Callable[[Any], int]) -> int:
        import psutil

        total = 0
        for process in self.processes:
            try:
                total += read(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # exited since it was listed
        return total

    def sample(self) -> None:
        """Take one sample."""
        import psutil

        now = time.perf_counter()
        if now - self.listed_at >= LIST_INTERVAL_S:
            try:
                self.processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.listed_at = now
        rss = self._each(lambda p: p.memory_info().rss)
        self.peak_rss = max(self.peak_rss, rss)
        if rss >= 0.95 * self.peak_rss and now - self.pss_at >= PSS_INTERVAL_S:
            self.peak_pss = max(self.peak_pss, self._each(lambda p: p.memory_full_info().pss))
            self.pss_at = now


def _machine_busy_seconds() -> float:
    """CPU seconds all processors have spent not idle since boot (/proc/stat)."""
    with open("/proc/stat", encoding="utf-8") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(side: str, data: Path, out: Path, tokenizer_dir: Path, workers: int) -> Measured:
    """Run one side in a subprocess; wall time, CPU time and peak memory of its tree."""

    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        side,
        "--data",
        str(data),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    monitor_before = resource.getrusage(resource.RUSAGE_SELF)
    busy_before = _machine_busy_seconds()
    start = time.perf_counter()
    # The tokenizer path travels in the environment: a command line naming "kubetune" is
    # what a colleague's `pkill -f kubetune` on a shared machine would hit.
    env = {**os.environ, TOKENIZER_ENV: str(tokenizer_dir)}
    process = subprocess.Popen(command, env=env)
    memory = TreeMemory(process.pid)
    while process.poll() is None:
        memory.sample()
        time.sleep(RSS_INTERVAL_S)
    seconds = time.perf_counter() - start
    busy = _machine_busy_seconds() - busy_before
    monitor_after = resource.getrusage(resource.RUSAGE_SELF)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"{side} failed with exit code {process.returncode}")
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    monitor = (monitor_after.ru_utime - monitor_before.ru_utime) + (
        monitor_after.ru_stime - monitor_before.ru_stime
    )
    return Measured(
        side,
        result["counts"]["rows"],
        seconds,
        cpu,
        memory.peak_rss / MIB,
        memory.peak_pss / MIB,
        max(0.0, busy - cpu - monitor),
        monitor,
        result,
    )


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _first_difference(ours: Path, baseline: Path) -> str:
    with ours.open(encoding="utf-8") as a, baseline.open(encoding="utf-8") as b:
        for number, (left, right) in enumerate(zip(a, b, strict=False), start=1):
            if left != right:
                return f"line {number}:\n  ours:     {left[:300]}\n  baseline: {right[:300]}"
    return "one file is a prefix of the other"


def compare(ours: Measured, ours_dir: Path, baseline: Measured, baseline_dir: Path) -> list[str]:
    """Differences between the two sides' outputs and counts (empty when equal)."""
    problems = []
    for name in ("train.jsonl", "val.jsonl"):
        left, right = ours_dir / name, baseline_dir / name
        if _digest(left) != _digest(right):
            problems.append(f"{name} differs at {_first_difference(left, right)}")
    for key in COMPARED:
        if ours.result[key] != baseline.result[key]:
            problems.append(f"{key}: ours {ours.result[key]} != baseline {baseline.result[key]}")
    return problems


def table(runs: list[Measured]) -> str:
    """The runs as a Markdown table."""
    lines = [
        "| side | rows | seconds | rows/s | CPU s | other CPU s | sampling CPU s "
        "| peak RSS MiB | peak PSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in runs:
        lines.append(
            f"| {m.side} | {m.rows:,} | {m.seconds:.1f} | {m.rows_per_s:,.0f} | "
            f"{m.cpu_seconds:.1f} | {m.other_cpu_seconds:.1f} | {m.monitor_cpu_seconds:.1f} | "
            f"{m.peak_rss_mib:,.0f} | "
            f"{m.peak_pss_mib:,.0f} |"
        )
    return "\n".join(lines)


def best(runs: list[Measured], side: str) -> Measured:
    """A side's fastest run (the least disturbed by other load)."""
    return min((m for m in runs if m.side == side), key=lambda m: m.seconds)


def ratios(ours: Measured, baseline: Measured) -> dict[str, float]:
    """Ours relative to the baseline (above 1 is better for speed, below 1 for the rest)."""
    return {
        "speedup": round(ours.rows_per_s / baseline.rows_per_s, 2),
        "cpu": round(ours.cpu_seconds / baseline.cpu_seconds, 2),
        "peakRss": round(ours.peak_rss_mib / baseline.peak_rss_mib, 2),
        "peakPss": round(ours.peak_pss_mib / baseline.peak_pss_mib, 2),
    }


def _machine() -> dict[str, Any]:
    import datasets
    import datasketch
    import tokenizers
    import transformers

    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memoryGiB": round(memory, 1),
        "loadAverage": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__,
        "datasketch": datasketch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 when the outputs differ)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows")
    parser.add_argument("--seed", type=int, default=1234, help="generator seed")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per side")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the sides alternately this many times"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON (the table to stderr)"
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.child:
        _child(args.child, args.data, args.out, Path(os.environ[TOKENIZER_ENV]), args.workers)
        return 0

    sys.path.insert(0, str(BENCH_DIR))
    from synthetic import write_jsonl

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-data-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer_dir = _tokenizer_dir()
        data = root / f"alpaca-{args.rows}-{args.seed}.jsonl"
        if not data.is_file():
            print(f"Writing {args.rows:,} rows to {data}", file=sys.stderr)
            write_jsonl(data, args.rows, args.seed)
        runs: list[Measured] = []
        for _ in range(args.repeat):
            for side in args.sides:
                out = root / side
                shutil.rmtree(out, ignore_errors=True)
                print(f"Running {side}", file=sys.stderr)
                runs.append(measure(side, data, out, tokenizer_dir, args.workers))
        both = len(args.sides) == 2
        problems = (
            compare(
                best(runs, "ours"),
                root / "ours" / "data",
                best(runs, "baseline"),
                root / "baseline" / "data",
            )
            if both
            else []
        )
        summary = ratios(best(runs, "ours"), best(runs, "baseline")) if both else {}
        lines = [table(runs), json.dumps(runs[0].result["counts"])]
        if both:
            lines.append(
                f"ours vs baseline (fastest runs): {summary['speedup']:.2f}x rows/s, "
                f"{summary['cpu']:.2f}x CPU time, {summary['peakRss']:.2f}x peak RSS, "
                f"{summary['peakPss']:.2f}x peak PSS"
            )
            lines.append("\n".join(["OUTPUTS DIFFER:", *problems]) if problems else "outputs equal")
        # With --json the table goes to stderr and the JSON alone to stdout.
        print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
        if args.json:
            report = {
                "machine": _machine(),
                "rows": args.rows,
                "seed": args.seed,
                "workers": args.workers,
                "runs": [{**asdict(m), "rowsPerS": round(m.rows_per_s, 1)} for m in runs],
                "oursVsBaseline": summary,
                "equal": not problems,
                "differences": problems,
            }
            print(json.dumps(report, indent=2))
        return 1 if problems else 0
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
