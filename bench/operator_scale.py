"""How the operator copes with many FineTuneJobs created at once.

Starts a local Kubernetes API (the real apiextensions-apiserver + etcd for the CRDs, the
stateful fake for built-in kinds: tests/support/kubeenv.py), starts an operator as its own
process, creates N FineTuneJobs from 8 client threads, and measures:

- seconds from the first create until all N child Jobs exist;
- API requests the operator made per job, counted at the server from the first create on
  (the benchmark's own creates subtracted; the watches and discovery the operator opened
  at startup, before the burst, are not in the count);
- the operator process's peak RSS (sampled every 50 ms).

Operators compared in one run, each against a fresh API: `kubetune` (`python -m
kubetune.operator`) and `naive` (bench/naive_operator.py: kopf used the common way, same
children). Needs `make apiserver` (the CRD server binaries).

    .venv/bin/python bench/operator_scale.py --jobs 1000
    .venv/bin/python bench/operator_scale.py --jobs 200 --operators kubetune --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]
os.environ.setdefault("KUBETUNE_K8S_CACHE", str(Path.home() / ".cache/kubetune/k8s"))

from support.kubeenv import KubeEnv  # noqa: E402

NAMESPACE = "scale"
COMMANDS = {
    "kubetune": [sys.executable, "-m", "kubetune.operator"],
    "naive": [sys.executable, "-m", "kopf", "run", "--standalone", "-A", "--quiet",
              str(REPO / "bench" / "naive_operator.py")],
}  # fmt: skip


def job_manifest(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"job-{index:05d}", "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "builtin://smollm2-135m-instruct"},
            "dataset": {"uri": "builtin://quickstart", "format": "Alpaca"},
            "training": {"maxSteps": 20 + index % 7},
            "output": {"uri": "pvc://artifacts/runs"},
            "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
        },
    }


class PeakRSS(threading.Thread):
    """Samples a process's resident set size until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except Exception:
                return
            time.sleep(0.05)


def wait(predicate: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def measure(operator: str, jobs: int, timeout: float) -> dict[str, Any]:
    with KubeEnv() as env:
        env.ensure_namespace(NAMESPACE)
        settings = Path(env.kubeconfig_path).with_name("settings.yaml")
        settings.write_text("statusPollIntervalSeconds: 30\n")
        child_env = {
            **os.environ,
            **env.env(),
            "KUBETUNE_OPERATOR_SETTINGS": str(settings),
            "KUBETUNE_OPERATOR_METRICS_PORT": "0",
            "PYTHONPATH": str(REPO / "src"),
        }
        log = settings.with_name(f"{operator}.log")
        with log.open("w") as out:
            process = subprocess.Popen(COMMANDS[operator], env=child_env, stdout=out, stderr=out)
        sampler = PeakRSS(process.pid)
        sampler.start()
        try:
            # Ready: one job round-trips before the measured burst.
            env.create(
                {**job_manifest(99999), "metadata": {"name": "warmup", "namespace": NAMESPACE}}
            )
            wait(lambda: len(env.fake.objects("jobs.batch", NAMESPACE)) >= 1, 60, "the operator")
            time.sleep(1.0)
            env.reset_counts()
            start = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: env.create(job_manifest(i)), range(jobs)))
            created = time.monotonic() - start
            wait(lambda: len(env.fake.objects("jobs.batch", NAMESPACE)) >= jobs + 1,
                 timeout, "all Jobs")  # fmt: skip
            all_jobs = time.monotonic() - start
            wait(lambda: _statuses(env) >= jobs + 1, timeout, "every status")
            time.sleep(2.0)  # let trailing writes land before counting
            counts = env.request_counts()
        finally:
            sampler.done.set()
            process.terminate()
            process.wait(30)
        ours = counts.get(("create", "finetunejobs.kubetune.io"), 0)
        operator_requests = sum(counts.values()) - ours
        return {
            "operator": operator,
            "jobs": jobs,
            "create_seconds": round(created, 2),
            "all_jobs_seconds": round(all_jobs, 2),
            "requests_per_job": round(operator_requests / jobs, 2),
            "peak_rss_mib": round(sampler.peak / 2**20, 1),
            "requests": {f"{v} {r}": n for (v, r), n in sorted(counts.items())},
        }


def _statuses(env: KubeEnv) -> int:
    listing = env.list("kubetune.io/v1alpha1", "FineTuneJob", NAMESPACE)
    return sum(1 for item in listing if (item.get("status") or {}).get("stage"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--operators", default="kubetune,naive")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [measure(name, args.jobs, args.timeout) for name in args.operators.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| operator | jobs | all Jobs exist | requests per job | peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['operator']} | {r['jobs']} | {r['all_jobs_seconds']} s | "
              f"{r['requests_per_job']} | {r['peak_rss_mib']} MiB |")  # fmt: skip
    for r in results:
        print(f"\n{r['operator']} requests: {json.dumps(r['requests'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
