"""`kubetune calc`: the table, the JSON schema, FineTuneJob files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["calc", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_shows_memory_fit_advice_parameters_and_compute(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "--arch", "llama-3.1-8b", "--gpu-class", "L4", "--tokens", "1e7",
        "--no-activation-offload",
    )  # fmt: skip
    assert code == 1  # it does not fit: a script can gate on the exit status
    for expected in (
        "llama-3.1-8b (llama, 8.03B parameters): LoRA, 8,192 tokens per micro-batch (4 x 2048)",
        "gradient checkpointing on",
        "  weights                           14.96",
        "fits L4 (22.5 GiB): NO",
        "needs ~25 GiB of GPU memory, the GPU has 22.5 GiB: set training.activationOffload "
        "to Enabled (checkpointed layer inputs in host memory), use method QLoRA",
        "trainable parameters   41,943,040 of 8,072,204,288 (0.520 %)",
        "FLOPs per token        31.88B",
        "time at 20% MFU        3.7 h on 1 x L4 (121 TFLOP/s peak), 3.66 GPU-hours",
        "checkpoint             0.50 GB",
    ):
        assert expected in out, expected


def test_activation_offload_is_the_last_resort_before_no(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "--arch", "llama-3.1-8b", "--gpu-class", "L4")
    assert code == 0
    assert "gradient checkpointing on, inputs offloaded to host memory" in out
    assert "fits L4 (22.5 GiB): yes" in out
    assert "note: activation offload: 2.0 GiB of checkpointed layer inputs" in out
    code, out, _ = run(capsys, "--arch", "llama-3.1-8b", "--gpu-class", "H200", "--json")
    assert json.loads(out)["setup"]["activationOffload"] is False  # fits without it
    code, out, _ = run(
        capsys, "--arch", "llama-3.1-8b", "--gpu-class", "H200", "--gradient-checkpointing",
        "--activation-offload", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert data["setup"]["activationOffload"] is True
    assert data["memory"]["hostOffloadGiB"] == pytest.approx(32 * 8192 * 4096 * 2 / 2**30)


def test_json_follows_the_documented_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "--model", "builtin://random/llama-3.2-1b", "--method", "full", "--seq-len",
        "2048", "--batch-size", "8", "--gradient-checkpointing", "--gpu-class", "H200",
        "--tokens", "1000000", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert set(data) == {
        "schemaVersion", "model", "setup", "parameters", "memory", "gpu", "compute", "checkpoint"
    }  # fmt: skip
    assert data["schemaVersion"] == 1
    assert data["setup"]["method"] == "Full"
    assert data["setup"]["gradientCheckpointing"] is True
    assert data["parameters"]["trainable"] == 1_235_814_400
    assert data["memory"]["allocatedGiB"] == pytest.approx(21.2, rel=0.05)  # PERF_BASELINE
    assert data["gpu"] == {
        "class": "H200", "memoryGiB": 140.0, "peakTFLOPs": 989.0, "fits": True, "advice": None
    }  # fmt: skip
    assert data["compute"]["tokens"] == 1_000_000
    assert data["compute"]["gpuHours"] > 0
    assert data["checkpoint"]["totalBytes"] == 1_235_814_400 * 10


def test_without_a_gpu_nothing_is_judged_and_no_time_is_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "--arch", "gemma-2-2b", "--target-modules", "q_proj,v_proj",
                       "--lora-rank", "8", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0
    assert data["gpu"]["fits"] is None
    assert data["compute"]["seconds"] is None
    assert data["setup"]["lora"]["targetModules"] == ["q_proj", "v_proj"]
    assert data["parameters"]["trainable"] == 26 * 8 * ((2304 + 2048) + (2304 + 1024))


def test_a_finetunejob_file_supplies_model_method_and_training(
    capsys: pytest.CaptureFixture[str], repo_root: Path
) -> None:
    job = repo_root / "examples" / "finetunejob-qlora.yaml"
    code, out, _ = run(capsys, "--job", str(job), "--gpu-class", "L4", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["model"]["name"] == "qwen2.5-7b"  # hf://Qwen/Qwen2.5-7B-Instruct, by name
    assert data["setup"]["method"] == "QLoRA"
    assert data["setup"]["optimizer"] == "PagedAdamW8bit"
    assert data["parameters"]["trainable"] == 28 * 32 * (7168 + 4096 + 4096 + 7168 + 3 * 22528)
    assert data["gpu"]["fits"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "gpt-5"], "unknown architecture 'gpt-5'; known: gemma-2-27b"),
        (["--arch", "llama-3.1-8b", "--method", "Adapter"], "--method 'Adapter' is not one of"),
        (["--arch", "llama-3.1-8b", "--gpu-class", "RTX-9090"], "known: H200"),
        (["--arch", "llama-3.1-8b", "--target-modules", "qkv"], "unknown target module 'qkv'"),
        (["--model", "s3://bucket/custom"], "pass --arch NAME"),
    ],
)
def test_errors_say_what_to_do(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err


def test_calc_is_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "calc" in capsys.readouterr().out


def test_fast_paths_estimate_what_the_trainer_runs_on_a_gpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ("--arch", "llama-3.1-8b", "--no-gradient-checkpointing", "--json")
    code, plain, _ = run(capsys, *args)
    assert code == 0
    code, fast, _ = run(capsys, *args, "--fast-paths")
    assert code == 0
    plain_gib = json.loads(plain)["memory"]["allocatedGiB"]
    fast_gib = json.loads(fast)["memory"]["allocatedGiB"]
    # Measured on an H200 (docs/calc.md): 81.70 GiB plain, 70.55 GiB with the fast paths.
    assert plain_gib == pytest.approx(81.70, rel=0.02)
    assert fast_gib == pytest.approx(70.55, rel=0.02)
