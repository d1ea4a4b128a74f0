"""Fused kernels, lean adapters, torch.compile and gradient checkpointing: what the trainer
turns on, with the reason, and what it refuses."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.api.v1alpha1.training import FastPaths, Toggle
from kubetune.calc import TrainingSetup
from kubetune.trainer import models
from kubetune.trainer.fastpath import kernels
from kubetune.trainer.models import TrainingSetupError


def spec(**fields: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "builtin://random/llama-3.2-1b"},
            "dataset": {"uri": "s3://bucket/data.jsonl"},
            **fields,
        }
    )


def fast(**toggles: Toggle) -> FastPaths:
    return FastPaths(**toggles)  # type: ignore[arg-type]


def test_fused_kernels_stay_off_on_a_cpu_and_say_why() -> None:
    choice = kernels.fused_kernels_choice(None, cuda=False, model_type="llama")
    assert not choice.enabled
    assert "need a GPU" in choice.reason


def test_fused_kernels_enabled_on_a_cpu_is_refused_with_the_field() -> None:
    with pytest.raises(TrainingSetupError, match=r"training\.fastPaths\.fusedKernels Enabled"):
        kernels.fused_kernels_choice(fast(fused_kernels=Toggle.ENABLED), False, "llama")


def test_fused_kernels_disabled_is_honoured_everywhere() -> None:
    choice = kernels.fused_kernels_choice(fast(fused_kernels=Toggle.DISABLED), True, "llama")
    assert not choice.enabled
    assert "Disabled" in choice.reason


def test_fused_kernels_need_the_package_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    auto = kernels.fused_kernels_choice(None, True, "llama")
    assert not auto.enabled
    assert "kubetune[fast]" in auto.reason
    with pytest.raises(TrainingSetupError, match="liger-kernel"):
        kernels.fused_kernels_choice(fast(fused_kernels=Toggle.ENABLED), True, "llama")


def test_fused_kernels_skip_architectures_liger_does_not_know(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(kernels, "liger_model_types", lambda: frozenset({"llama"}))
    assert kernels.fused_kernels_choice(None, True, "llama").enabled
    other = kernels.fused_kernels_choice(None, True, "gpt_oss")
    assert not other.enabled
    assert "'gpt_oss'" in other.reason


def test_lean_adapters_only_under_autocast() -> None:
    assert kernels.lean_adapters_choice(None, autocast=True).enabled
    assert not kernels.lean_adapters_choice(None, autocast=False).enabled
    off = kernels.lean_adapters_choice(fast(lean_adapters=Toggle.DISABLED), autocast=True)
    assert not off.enabled
    with pytest.raises(TrainingSetupError, match="leanAdapters Enabled needs BF16"):
        kernels.lean_adapters_choice(fast(lean_adapters=Toggle.ENABLED), autocast=False)


def test_lean_adapters_switch_off_peft_input_casts_and_fuse_the_update() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(16, 16, dtype=torch.bfloat16)
            self.v_proj = nn.Linear(16, 16, dtype=torch.bfloat16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.v_proj(self.q_proj(x))

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
        assert kernels.apply_lean_adapters(model) == 2
        after = model(x)
    # the update's sum is rounded once instead of three times: bf16 noise (at most two
    # units in the last place of the largest output), not more
    ulp = 2.0 ** (math.floor(math.log2(before.abs().max().item())) - 7)
    torch.testing.assert_close(after, before, atol=2 * ulp, rtol=0)
    lora = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert all(type(m).forward is not type(m).__mro__[1].forward for m in lora)
    assert lora
    assert not any(m.cast_input_dtype_enabled for m in lora)


def test_compile_enabled_is_refused_until_supported() -> None:
    kernels.check_compile(None)
    kernels.check_compile(fast(compile=Toggle.DISABLED))
    with pytest.raises(TrainingSetupError, match=r"training\.fastPaths\.compile Enabled"):
        kernels.check_compile(fast(compile=Toggle.ENABLED))


PLAN = TrainingSetup(gradient_checkpointing=True, checkpoint_every=4)


@pytest.mark.parametrize(
    ("fields", "cuda", "planned", "every"),
    [
        ({}, False, None, 0),  # a CPU without a memory estimate: off, for speed
        ({}, False, PLAN, 4),  # a CPU whose memory needs it: as planned
        ({}, False, replace(PLAN, gradient_checkpointing=False), 0),
        ({}, True, None, 1),
        ({}, True, PLAN, 4),
        ({}, True, replace(PLAN, checkpoint_every=1), 1),
        ({}, True, replace(PLAN, gradient_checkpointing=False), 0),
        ({"training": {"gradientCheckpointing": "Enabled"}}, False, None, 1),
        ({"training": {"gradientCheckpointing": "Disabled"}}, True, PLAN, 0),
        ({"method": "PrefixTuning"}, True, PLAN, 0),
    ],
)
def test_gradient_checkpointing_follows_the_toggle_and_the_memory_plan(
    fields: dict[str, Any], cuda: bool, planned: TrainingSetup | None, every: int
) -> None:
    chosen = models.gradient_checkpointing(spec(**fields), cuda, planned)
    assert chosen.every_n_layers == every
    assert chosen.reason
    kwargs = chosen.trainer_kwargs()
    assert (kwargs or {}).get("every_n_layers") == (every or None)


OFFLOADED = replace(PLAN, checkpoint_every=1, offload_activations=True)


@pytest.mark.parametrize(
    ("fields", "cuda", "planned", "offload", "why"),
    [
        ({}, True, PLAN, False, "Auto: not needed"),
        ({}, True, OFFLOADED, True, "Auto: the step fits in GPU memory only with it"),
        ({}, True, None, False, "Auto: not needed"),
        ({}, False, OFFLOADED, False, "a CPU run keeps its activations in host memory"),
        ({"training": {"activationOffload": "Enabled"}}, True, PLAN, True, "is Enabled"),
        ({"training": {"activationOffload": "Disabled"}}, True, OFFLOADED, False, "is Disabled"),
        (
            {"training": {"activationOffload": "Enabled", "gradientCheckpointing": "Auto"}},
            True,
            replace(PLAN, gradient_checkpointing=False),
            False,
            "no layer is checkpointed",
        ),
        ({"method": "PrefixTuning"}, True, OFFLOADED, False, "no layer is checkpointed"),
    ],
)
def test_activation_offload_follows_the_toggle_and_the_memory_plan(
    fields: dict[str, Any], cuda: bool, planned: TrainingSetup | None, offload: bool, why: str
) -> None:
    chosen = models.gradient_checkpointing(spec(**fields), cuda, planned)
    assert chosen.offload is offload
    assert why in chosen.describe_offload()
    assert chosen.describe_offload().startswith("on (" if offload else "off (")
    assert (chosen.trainer_kwargs() or {}).get("offload", False) is offload


def test_offload_without_checkpointing_is_refused_with_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"training.activationOffload moves the inputs"):
        spec(training={"activationOffload": "Enabled", "gradientCheckpointing": "Disabled"})


def train_one_step(
    tiny_model_dir: Path,
    tmp_path: Path,
    checkpointing: models.Checkpointing,
    layers: int,
    prepare: Any = None,
) -> Any:
    """One full fine-tuning step of a `layers`-layer tiny Llama through TRL's SFTTrainer with
    the trainer's arguments on a CPU; `prepare(model)` runs before training. Returns the
    model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from trl import SFTTrainer

    from kubetune.trainer.models import Precisions
    from kubetune.trainer.sft import sft_config

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if prepare is not None:
        prepare(model)
    job = spec(method="Full", training={"maxSteps": 1, "batchSize": 2, "maxSeqLength": 64})
    args = sft_config(
        job,
        tmp_path / "out",
        Precisions(load=torch.float32, bf16=False, fp16=False),
        cuda=False,
        checkpointing=checkpointing,
        has_validation=False,
    )
    rows = [{"input_ids": list(range(5, 5 + n))} for n in (20, 30, 12, 40)]
    SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    ).train()
    return model


def test_the_trainer_hands_offload_to_transformers(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer passes `offload` from the job's checkpointing to the model when training
    starts (pinned host memory needs a GPU, so the recorded call trains without it here)."""
    calls: list[dict[str, Any]] = []

    def prepare(model: Any) -> None:
        enable = model.gradient_checkpointing_enable

        def record(**kwargs: Any) -> None:
            calls.append(kwargs)
            enable(**{**kwargs, "offload": False})

        monkeypatch.setattr(model, "gradient_checkpointing_enable", record)

    checkpointing = models.Checkpointing(1, "test", offload=True, offload_reason="test")
    train_one_step(tiny_model_dir, tmp_path, checkpointing, 2, prepare)
    assert calls[-1]["offload"] is True
    assert calls[-1]["every_n_layers"] == 1


@pytest.mark.parametrize(
    ("every", "words"),
    [(1, "every layer"), (2, "every 2nd layer"), (3, "every 3rd layer"), (4, "every 4th layer"),
     (11, "every 11th layer"), (21, "every 21st layer"), (22, "every 22nd layer")],
)  # fmt: skip
def test_the_log_names_which_layers_recompute(every: int, words: str) -> None:
    assert models.Checkpointing(every, "why").describe() == f"on, {words} (why)"


def test_the_trainer_checkpoints_every_nth_layer_as_planned(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The plan reaches the layers: the Trainer enables checkpointing with every_n_layers
    when training starts, and only layers 0, n, 2n, ... recompute."""
    model = train_one_step(tiny_model_dir, tmp_path, models.Checkpointing(2, "test"), 4)
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == [True, False, True, False]


def test_liger_warnings_about_other_hardware_stay_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Liger warns, in every process, that its Ascend and CuTe DSL backends cannot be
    imported; a CUDA backend that fails to import must still be heard."""
    import logging

    kernels.quiet_foreign_liger_backends()
    kernels.quiet_foreign_liger_backends()  # idempotent: one filter
    registry = logging.getLogger("liger_kernel.backends.registry")
    assert len(registry.filters) == 1
    caplog.set_level(logging.WARNING, logger="liger_kernel.backends.registry")
    template = (
        "Backend impl 'liger_kernel.ops.backends.%s.rope' for op 'rope' could not be imported"
    )
    registry.warning(template, "_ascend")
    registry.warning(template, "_cutedsl")
    registry.warning(template, "_cuda")
    registry.warning("something else")
    assert [r.getMessage() for r in caplog.records] == [template % "_cuda", "something else"]
