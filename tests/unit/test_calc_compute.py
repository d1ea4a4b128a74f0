"""FLOPs, time, GPU classes and checkpoint sizes."""

from __future__ import annotations

import pytest

from kubetune.api.v1alpha1.methods import Method
from kubetune.calc import (
    KNOWN_ARCHITECTURES,
    Architecture,
    estimate_checkpoint,
    estimate_compute,
    flops_per_token,
    gpu_class,
    trainable_params,
)

L8, L1 = KNOWN_ARCHITECTURES["llama-3.1-8b"], KNOWN_ARCHITECTURES["llama-3.2-1b"]
N_8B = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096


def test_matmul_parameters_count_the_head_but_not_the_embedding_lookup() -> None:
    assert L8.matmul_params() == N_8B == 7_504_658_432


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (Method.FULL, 6 * N_8B + 6 * 32 * 4096 * 2048),
        (Method.LORA, 4 * N_8B + 6 * 41_943_040 + 6 * 32 * 4096 * 2048),
        (Method.PROMPT_TUNING, 4 * N_8B + 6 * 81_920 + 6 * 32 * 4096 * 2048),
    ],
)
def test_flops_per_token(method: Method, expected: int) -> None:
    trainable = trainable_params(L8, method).trainable if method != Method.FULL else None
    assert flops_per_token(L8, method, 2048, trainable) == expected


# PERF_BASELINE.md: real tokens/s and MFU (against 790 TFLOP/s) of runs on data whose
# documents have a mean length of 472 and a mean of s^2 / mean s of about 912 tokens.
MEASURED_MFU = {
    "8b-lora-hf-default": (L8, Method.LORA, 2205, 0.086),
    "8b-lora-hf-tuned": (L8, Method.LORA, 5050, 0.197),
    "1b-full-hf-default": (L1, Method.FULL, 9116, 0.087),
    "1b-full-hf-tuned": (L1, Method.FULL, 14661, 0.141),
}


@pytest.mark.parametrize(
    ("arch", "method", "tokens_per_s", "mfu"), MEASURED_MFU.values(), ids=list(MEASURED_MFU)
)
def test_flop_accounting_reproduces_perf_baseline_mfu(
    arch: Architecture, method: Method, tokens_per_s: int, mfu: float
) -> None:
    trainable = trainable_params(arch, method).trainable if method != Method.FULL else None
    per_token = flops_per_token(arch, method, 912, trainable)
    assert per_token * tokens_per_s / 790e12 == pytest.approx(mfu, rel=0.03)


def test_time_and_gpu_hours_follow_from_flops_peak_and_mfu() -> None:
    est = estimate_compute(
        L8, Method.LORA, seq_len=2048, tokens=100_000_000, epochs=2, gpus=4,
        peak_tflops=989.0, mfu=0.4, trainable=41_943_040,
    )  # fmt: skip
    total = flops_per_token(L8, Method.LORA, 2048, 41_943_040) * 200_000_000
    assert est.total_flops == total
    assert est.seconds == pytest.approx(total / (4 * 989e12 * 0.4))
    assert est.gpu_hours == pytest.approx(est.seconds * 4 / 3600)


@pytest.mark.parametrize("bad", [{"mfu": 0.0}, {"mfu": 1.5}, {"gpus": 0}, {"peak_tflops": 0}])
def test_compute_refuses_nonsense(bad: dict[str, float]) -> None:
    args: dict[str, float] = {"mfu": 0.3, "gpus": 1, "peak_tflops": 989.0, **bad}
    with pytest.raises(ValueError, match="mfu"):
        estimate_compute(
            L8, Method.FULL, seq_len=2048, tokens=1000, gpus=int(args["gpus"]),
            peak_tflops=args["peak_tflops"], mfu=args["mfu"],
        )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "memory", "peak"),
    [("H200", 140.0, 989.0), ("h100", 79.6, 989.0), ("A100-80GB", 79.2, 312.0),
     ("L40S", 45.0, 362.0), ("L4", 22.5, 121.0), ("A10G", 22.5, 125.0), ("T4", 15.0, 65.0)],
)  # fmt: skip
def test_gpu_classes(name: str, memory: float, peak: float) -> None:
    gpu = gpu_class(name)
    assert (gpu.memory_gib, gpu.peak_tflops) == (memory, peak)


def test_h200_carries_the_measured_matmul_rate_and_unknown_classes_list_known_ones() -> None:
    assert gpu_class("H200").measured_tflops == 790.0
    with pytest.raises(KeyError, match="known: H200, H100"):
        gpu_class("RTX-9090")


def test_lora_checkpoint_is_the_fp32_adapter_plus_adam_states() -> None:
    ck = estimate_checkpoint(L8, trainable_params(L8, Method.LORA))
    assert ck.model_bytes == 41_943_040 * 4
    assert ck.optimizer_bytes == 41_943_040 * 8
    assert ck.write_seconds == pytest.approx(ck.total_bytes / 200e6)
    assert ck.grace_period_seconds() == 33


def test_full_checkpoint_is_weights_plus_optimizer_and_sets_a_longer_grace_period() -> None:
    ck = estimate_checkpoint(L8, trainable_params(L8, Method.FULL), write_mb_s=500)
    assert ck.total_bytes == 8_030_261_248 * (2 + 8)
    assert ck.write_seconds == pytest.approx(160.6, abs=0.1)
    assert ck.grace_period_seconds() == int(ck.write_seconds * 1.5) + 30
    no_states = estimate_checkpoint(L8, trainable_params(L8, Method.FULL), include_optimizer=False)
    assert no_states.total_bytes == 8_030_261_248 * 2
