"""CPU runs: the memory a process may still take (machine and container limit) and the
preflight that plans checkpointing or refuses the run before the OOM killer would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import Reason, exit_code_for
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.calc import KNOWN_ARCHITECTURES, estimate_memory
from kubetune.calc.host import (
    BUDGET_ENV,
    cgroup_dirs,
    cgroup_headroom,
    meminfo_available,
    memory_budget,
    peak_resident_gib,
    read_host_memory,
    reset_peak_resident,
    resident_gib,
    status_peak_resident,
)
from kubetune.calc.memory import CUDA_CONTEXT_GIB, TrainingSetup
from kubetune.calc.preflight import INSUFFICIENT_MEMORY, host_preflight

GIB = 1024**3
SMOL = KNOWN_ARCHITECTURES["smollm2-135m"]
MEMINFO = "MemTotal:       24684092 kB\nMemFree:  100 kB\nMemAvailable:   20971520 kB\n"


def spec(**training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "builtin://smollm2-135m-instruct"},
            "dataset": {"uri": "data.jsonl"},
            "training": training,
        }
    )


def test_meminfo_available_is_read_in_bytes() -> None:
    assert meminfo_available(MEMINFO) == 20 * GIB
    assert meminfo_available("MemTotal: 1 kB\n") is None


def test_cgroup_headroom_counts_inactive_page_cache_as_available() -> None:
    stat = "anon 100\ninactive_file 2147483648\nactive_file 5\n"
    assert cgroup_headroom(str(8 * GIB), str(7 * GIB), stat) == 3 * GIB
    assert cgroup_headroom(str(8 * GIB), str(7 * GIB), None) == 1 * GIB
    assert cgroup_headroom(str(8 * GIB), str(9 * GIB), None) == 0  # already over
    assert cgroup_headroom("max", str(GIB), None) is None  # v2: no limit
    assert cgroup_headroom("9223372036854771712", str(GIB), None) is None  # v1: no limit
    assert cgroup_headroom(None, None, None) is None


def test_cgroup_dirs_cover_v1_v2_and_namespaced_roots(tmp_path: Path) -> None:
    v2 = cgroup_dirs("0::/kubepods/pod1/abc\n", tmp_path)
    assert v2 == [(tmp_path, "v2"), (tmp_path / "kubepods/pod1/abc", "v2")]
    v1 = cgroup_dirs("4:memory:/docker/abc\n3:cpu:/\n", tmp_path)
    assert v1 == [(tmp_path / "memory", "v1"), (tmp_path / "memory/docker/abc", "v1")]
    assert cgroup_dirs("garbage\n", tmp_path) == []


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_container_limit_bounds_what_the_machine_has(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "meminfo", MEMINFO)
    write(proc / "self" / "cgroup", "0::/pod\n")
    write(cgroup / "pod" / "memory.max", str(6 * GIB))
    write(cgroup / "pod" / "memory.current", str(2 * GIB))
    write(cgroup / "pod" / "memory.stat", "inactive_file 0\n")
    memory = read_host_memory(proc, cgroup)
    assert memory is not None
    assert memory.available_gib == pytest.approx(0.9 * 4.0)  # USABLE of the headroom
    assert memory.source == "the container's memory limit"

    write(cgroup / "pod" / "memory.max", "max\n")
    memory = read_host_memory(proc, cgroup)
    assert memory is not None
    assert (memory.available_gib, memory.source) == (pytest.approx(18.0), "this machine")
    assert read_host_memory(tmp_path / "missing", cgroup) is None


def test_the_budget_variable_caps_what_a_cpu_run_plans_for(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc / "meminfo", MEMINFO)  # 20 GiB available, 18 usable
    assert memory_budget({}, proc) == read_host_memory(proc, tmp_path / "none")
    capped = memory_budget({BUDGET_ENV: "6.5"}, proc)
    assert capped is not None
    assert (capped.available_gib, capped.source) == (6.5, BUDGET_ENV)
    above = memory_budget({BUDGET_ENV: "64"}, proc)  # a cap above what there is: no effect
    assert above is not None
    assert above.source == "this machine"
    for bad in ("lots", "0", "-2", "nan"):
        with pytest.raises(ValueError, match=rf"{BUDGET_ENV}='{bad}' is not a positive number"):
            memory_budget({BUDGET_ENV: bad}, proc)


def test_this_process_resident_memory_and_its_peak_are_readable() -> None:
    held, peak = resident_gib(), peak_resident_gib()
    assert held is not None
    assert peak is not None
    assert 0 < held <= peak
    assert status_peak_resident("Name: x\nVmHWM:\t  2048 kB\n") == 2 * 1024 * 1024
    if reset_peak_resident():  # Linux 4.0+: the peak restarts from what is resident now
        after = peak_resident_gib()
        assert after is not None
        assert after <= peak


def test_a_cpu_run_is_planned_in_fp32_without_a_cuda_context() -> None:
    cpu = estimate_memory(SMOL, TrainingSetup(seq_len=1024, batch_size=2, host=True))
    gpu = estimate_memory(SMOL, TrainingSetup(seq_len=1024, batch_size=2))
    assert cpu.precision.value == "FP32"
    assert cpu.cuda_context_gib == 0
    assert gpu.cuda_context_gib == CUDA_CONTEXT_GIB
    assert cpu.weights_gib == pytest.approx(2 * gpu.weights_gib)  # fp32 against bf16


def test_auto_checkpointing_on_a_cpu_is_off_when_the_step_fits() -> None:
    verdict = host_preflight(spec(), SMOL, 64.0, dense_attention=False)
    assert verdict.fits is True
    assert not verdict.setup.gradient_checkpointing
    assert verdict.setup.host
    assert not verdict.setup.fused_kernels  # Liger needs a GPU
    assert not verdict.setup.lean_adapters


def test_auto_checkpoints_on_a_cpu_the_fewest_layers_that_fit() -> None:
    # The default job (4 x 2048 tokens): ~32 GiB without checkpointing on a CPU, which the
    # OOM killer ended on a 24 GiB machine before the check existed.
    verdict = host_preflight(spec(), SMOL, 24.0, dense_attention=False)
    assert verdict.fits is True
    assert 0 < verdict.estimate.checkpointed_layers < SMOL.num_layers
    assert verdict.needed_gib <= 24.0
    # Eager attention keeps its score matrices: more layers need it.
    eager = host_preflight(spec(), SMOL, 24.0, dense_attention=True)
    assert eager.estimate.checkpointed_layers > verdict.estimate.checkpointed_layers


def test_a_cpu_run_that_cannot_fit_is_refused_with_cpu_advice() -> None:
    job = spec(gradientCheckpointing="Disabled")
    verdict = host_preflight(job, SMOL, 12.0, dense_attention=False)
    assert verdict.fits is False
    assert verdict.reason == INSUFFICIENT_MEMORY == Reason.INSUFFICIENT_MEMORY.value
    assert verdict.advice.startswith(f"needs ~{verdict.needed_gib:.0f} GiB more memory, ")
    assert "12 GiB available (this machine): enable gradient checkpointing, " in verdict.advice
    assert "lower training.batchSize to 1" in verdict.advice
    for gpu_only in ("QLoRA", "GPUs", "cpuOffload"):
        assert gpu_only not in verdict.advice
    assert exit_code_for(Reason.INSUFFICIENT_MEMORY) == 19


def test_unknown_available_memory_leaves_a_cpu_run_unjudged() -> None:
    verdict = host_preflight(spec(), SMOL, None, dense_attention=False)
    assert verdict.fits is None
    assert not verdict.setup.gradient_checkpointing  # Auto stays off, as before the check
    assert verdict.needed_gib > 0
