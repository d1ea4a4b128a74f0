"""Training in several processes on CPUs (gloo): the multi-node command the operator renders,
run as two "nodes" on this machine, and `kubetune run --nproc-per-node 2`, both against one
process on the same data and global batch.

One process trains with batch 4 and gradient accumulation 2; two processes with batch 4 each
and no accumulation: every optimizer step sees the same 8 packed rows, so the losses and the
trained adapter agree (up to float summation order).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.contract import TrainerConfig
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator.children import build_children
from kubetune.operator.pod import CONFIG_KEY, CONFIG_PATH, TERMINATION_LOG, WORK_DIR
from kubetune.operator.settings import OperatorSettings
from support.distributed_runs import assert_same_training, environment, kubetune_run, spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The one-process run (gradient accumulation 2)."""
    tmp = tmp_path_factory.mktemp("single")
    config = {
        "run": {"namespace": "t", "jobName": "single", "runId": "r1", "outputUri": str(tmp)},
        "spec": spec(tiny_model_dir, 2),
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "kubetune.trainer", "--config", str(path)]
    command += ["--result-file", str(tmp / "result.json"), "--work-dir", str(tmp / "work")]
    subprocess.run(command, env=environment(), check=True, capture_output=True, timeout=600)
    return tmp / "t" / "single" / "r1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rendered_job(model: Path, output: Path) -> tuple[dict[str, Any], TrainerConfig]:
    """The Indexed Job the operator renders for two CPU nodes, and its TrainerConfig with
    the model and the output on this machine."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "two-nodes", "namespace": "t", "uid": "u-1"},
            "spec": {
                **spec(Path("/unused"), 1, distributed={"nodes": 2, "strategy": "DDP"}),
                "model": {"uri": "hf://example/tiny"},
                "resources": {"gpus": 0},
                "output": {"uri": "s3://bucket/kubetune"},
            },
        }
    )
    children = build_children(job, OperatorSettings(), "r1")
    config = TrainerConfig.model_validate_json(children.config_map["data"][CONFIG_KEY])
    local = config.model_copy(
        update={
            "run": config.run.model_copy(update={"output_uri": str(output)}),
            "spec": config.spec.model_copy(
                update={
                    "model": config.spec.model.model_copy(update={"uri": str(model)}),
                    "output": None,
                }
            ),
        }
    )
    return children.job, local


def node_command(
    job: dict[str, Any], index: int, port: int, config: Path, tmp: Path
) -> tuple[list[str], dict[str, str]]:
    """The trainer container's command for pod `index`, with what Kubernetes would fill in
    (the completion index, the rendezvous address) pointed at this machine."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    values = {e["name"]: e.get("value", "") for e in container["env"]}
    values.update(NODE_RANK=str(index), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    paths = {
        CONFIG_PATH: str(config),
        TERMINATION_LOG: str(tmp / f"result-{index}.json"),
        WORK_DIR: str(tmp / f"work-{index}"),
    }
    args = [
        paths.get(arg, re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg))
        for arg in container["args"]
    ]
    command = [sys.executable if part == "python" else part for part in container["command"]]
    env = environment()
    env.update({k: v for k, v in values.items() if k in ("NNODES", "NPROC_PER_NODE")})
    return [*command, *args], env


def test_the_rendered_two_node_command_trains_like_one_process(
    tmp_path: Path, tiny_model_dir: Path, reference: Path
) -> None:
    job, config = rendered_job(tiny_model_dir, tmp_path / "out")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "kubetune.trainer.launch"]
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json(by_alias=True))
    port = free_port()
    nodes = []
    for index in (0, 1):
        command, env = node_command(job, index, port, config_path, tmp_path)
        with (tmp_path / f"node-{index}.log").open("w") as log:
            nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], (tmp_path / "node-0.log").read_text()[-3000:]
    first = json.loads((tmp_path / "result-0.json").read_text())
    second = json.loads((tmp_path / "result-1.json").read_text())
    assert first["reason"] == "Succeeded"
    assert first["manifestDigest"]
    assert second["reason"] == "Succeeded"
    assert "rank 1 of 2" in second["message"]
    run = tmp_path / "out" / "t" / "two-nodes" / "r1"
    assert (run / "manifest.json").is_file()
    assert_same_training(run, reference)
    # Rank 1 read the data rank 0 prepared and wrote nothing to the store.
    assert not (tmp_path / "work-1" / "ranks" / "1" / "data-work").exists()


def test_kubetune_run_with_two_processes_trains_like_one(
    tmp_path: Path, tiny_model_dir: Path, reference: Path
) -> None:
    job_spec = spec(tiny_model_dir, 1, distributed={"strategy": "DDP"})
    proc = kubetune_run(tmp_path, "two-processes", job_spec, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training in 2 processes" in proc.stderr
    run = Path(proc.stdout.strip().splitlines()[-1])
    assert_same_training(run, reference)


def test_a_sharded_strategy_on_cpus_is_refused_before_any_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    job_spec = spec(tiny_model_dir, 1, distributed={"strategy": "FSDP"})
    proc = kubetune_run(tmp_path, "fsdp-on-cpus", job_spec, 2)
    assert proc.returncode == 10, proc.stderr[-2000:]
    assert "distributed.strategy: FSDP needs GPUs" in proc.stderr
    assert "use DDP on CPUs" in proc.stderr
    assert not list((tmp_path / "out").rglob("manifest.json"))
