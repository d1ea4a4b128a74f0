"""Who does what among several trainer processes, what each strategy asks of the Trainer, and
the launcher's exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api.contract import Reason, TrainerResult, exit_code_for
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.training import DistributedStrategy
from kubetune.storage.local import LocalStore
from kubetune.trainer import distributed
from kubetune.trainer.launch import exit_code_from, result_file, split_arguments
from kubetune.trainer.models import TrainingSetupError

TWO = distributed.Topology(rank=1, world_size=2, local_rank=1, local_world_size=2)


def make_spec(**extra: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "builtin://random/llama-3.2-1b"},
            "dataset": {"uri": "builtin://quickstart"},
            **extra,
        }
    )


def test_topology_comes_from_torchrun_environment() -> None:
    topo = distributed.topology(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert topo == distributed.Topology(3, 4, 1, 2)
    assert topo.distributed
    assert not topo.main
    assert topo.work_dir(Path("/scratch/work")) == Path("/scratch/work/ranks/3")
    alone = distributed.topology({})
    assert alone == distributed.Topology()
    assert not alone.distributed
    assert alone.work_dir(Path("/w")) == Path("/w")


@pytest.mark.parametrize(
    ("extra", "cuda", "message"),
    [
        pytest.param(
            {"stages": [{"type": "SFT"}, {"type": "DPO"}]},
            True,
            "stages: a run on several GPUs trains one stage",
            id="chain",
        ),
        pytest.param(
            {"method": "PromptTuning", "distributed": {"strategy": "FSDP"}},
            True,
            "use DDP (or None) for prefix and prompt tuning",
            id="prompt-tuning-sharded",
        ),
        pytest.param(
            {"method": "QLoRA", "distributed": {"strategy": "FSDP"}},
            True,
            "use DDP, or LoRA with FSDP",
            id="qlora-fsdp",
        ),
        pytest.param(
            {"distributed": {"strategy": "FSDP"}},
            False,
            "FSDP needs GPUs",
            id="fsdp-on-cpus",
        ),
    ],
)
def test_what_does_not_train_on_several_processes_is_refused(
    extra: dict[str, Any], cuda: bool, message: str
) -> None:
    with pytest.raises(TrainingSetupError) as caught:
        distributed.check(make_spec(**extra), TWO, cuda=cuda)
    assert caught.value.reason == Reason.INVALID_SPEC
    assert message in str(caught.value)


def test_one_process_is_never_refused() -> None:
    spec = make_spec(stages=[{"type": "SFT"}, {"type": "DPO"}], distributed={"strategy": "FSDP"})
    distributed.check(spec, distributed.Topology(), cuda=False)


@pytest.mark.parametrize(
    ("strategy", "shards"),
    [
        (None, False),
        ("DDP", False),
        ("FSDP", True),
        ("DeepSpeedZeRO2", True),
        ("DeepSpeedZeRO3", True),
    ],
)
def test_strategies_that_manage_the_parameters_keep_peft_layers_unfused(
    strategy: str | None, shards: bool
) -> None:
    extra = {"distributed": {"strategy": strategy}} if strategy else {}
    assert distributed.shards_parameters(make_spec(**extra)) is shards


def test_deepspeed_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "_installed", lambda module: False)
    with pytest.raises(TrainingSetupError, match="needs the deepspeed package"):
        distributed.check(make_spec(distributed={"strategy": "DeepSpeedZeRO3"}), TWO, cuda=True)


def test_strategy_arguments() -> None:
    assert distributed.trainer_arguments(make_spec(), distributed.Topology(), cuda=True) == {}
    ddp = distributed.trainer_arguments(make_spec(), TWO, cuda=True)
    assert ddp == {"ddp_find_unused_parameters": False, "ddp_backend": "nccl"}
    fsdp = distributed.trainer_arguments(
        make_spec(distributed={"strategy": "FSDP", "cpuOffload": True}), TWO, cuda=True
    )
    assert fsdp["fsdp"] is True
    assert fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["cpu_offload"] is True
    assert fsdp["fsdp_config"]["reshard_after_forward"] is True
    # Rank 0's checkpoint must be complete across nodes: full state dicts.
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    zero3 = distributed.trainer_arguments(
        make_spec(distributed={"strategy": "DeepSpeedZeRO3", "cpuOffload": True}), TWO, cuda=True
    )["deepspeed"]
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    zero2 = distributed.deepspeed_config(distributed.DistributedStrategy.DEEPSPEED_ZERO2, False)
    assert zero2["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in zero2["zero_optimization"]
    assert "torch_autocast" not in zero3  # LoRA: DeepSpeed's bf16 mode
    # Full fine-tuning: fp32 weights under torch autocast, as on one GPU (DeepSpeed's bf16
    # mode would start the fp32 masters from bf16-rounded weights), and the Trainer's own
    # bf16 switch off, as transformers requires.
    for strategy in ("DeepSpeedZeRO2", "DeepSpeedZeRO3"):
        full = distributed.trainer_arguments(
            make_spec(method="Full", distributed={"strategy": strategy}), TWO, cuda=True, bf16=True
        )
        assert full["bf16"] is False
        assert full["deepspeed"]["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp32 = distributed.trainer_arguments(
        make_spec(method="Full", distributed={"strategy": "DeepSpeedZeRO3"}), TWO, cuda=True
    )
    assert "bf16" not in fp32
    assert "torch_autocast" not in fp32["deepspeed"]
    # The buffers the calculator counts are the ones DeepSpeed allocates.
    from kubetune.calc.memory import DEEPSPEED_MAX_LIVE_PARAMETERS, DEEPSPEED_REDUCE_BUCKET

    assert zero2["zero_optimization"]["reduce_bucket_size"] == DEEPSPEED_REDUCE_BUCKET
    assert zero3["zero_optimization"]["reduce_bucket_size"] == DEEPSPEED_REDUCE_BUCKET
    assert zero3["zero_optimization"]["stage3_max_live_parameters"] == (
        DEEPSPEED_MAX_LIVE_PARAMETERS
    )


def test_fsdp_arguments_are_what_the_trainer_expects(tmp_path: Path) -> None:
    """transformers turns them into accelerate's FSDP2 plugin without the deprecated
    string form (checked without processes: the plugin is built from the arguments)."""
    from transformers import TrainingArguments

    arguments = distributed.trainer_arguments(
        make_spec(distributed={"strategy": "FSDP"}), TWO, cuda=True
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **arguments)
    plugin = args._process_fsdp_args()
    assert plugin is not None
    assert plugin["fsdp_version"] == 2
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["reshard_after_forward"] is True


def test_ranks_other_than_zero_read_but_never_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes(b"prepared", "data/train.jsonl")
    assert distributed.store_for(store, distributed.Topology()) is store
    worker = distributed.store_for(store, TWO)
    assert worker.get_bytes("data/train.jsonl") == b"prepared"
    assert worker.exists("data/train.jsonl")
    assert [o.key for o in worker.list("data/")] == ["data/train.jsonl"]
    for write in (
        lambda: worker.put_bytes(b"x", "manifest.json"),
        lambda: worker.put_file(tmp_path / "data" / "train.jsonl", "copy"),
        lambda: worker.delete("data/train.jsonl"),
        lambda: worker.delete_prefix("data/"),
    ):
        with pytest.raises(RuntimeError, match=r"rank 1 of 2 .* only rank 0 publishes"):
            write()
    assert store.get_bytes("data/train.jsonl") == b"prepared"


def test_launcher_arguments() -> None:
    torchrun, trainer = split_arguments(
        ["--standalone", "--nproc-per-node=2", "--", "--config", "c.yaml", "--result-file", "r"]
    )
    assert torchrun == ["--standalone", "--nproc-per-node=2"]
    assert result_file(trainer) == Path("r")
    assert result_file(["--result-file=/x/y.json"]) == Path("/x/y.json")
    assert result_file([]) == Path("/dev/termination-log")
    with pytest.raises(SystemExit, match="usage"):
        split_arguments(["--standalone"])


@pytest.mark.parametrize(
    ("result", "failed", "code"),
    [
        pytest.param(None, False, 0, id="no-result-no-failure"),
        pytest.param(None, True, exit_code_for(Reason.INFRASTRUCTURE_ERROR), id="killed"),
        pytest.param(Reason.SUCCEEDED, False, 0, id="succeeded"),
        pytest.param(Reason.EVALUATION_GATE_FAILED, False, 0, id="gate-failed"),
        pytest.param(
            Reason.SUCCEEDED, True, exit_code_for(Reason.INFRASTRUCTURE_ERROR), id="lost-a-rank"
        ),
        pytest.param(
            Reason.DATASET_INVALID, True, exit_code_for(Reason.DATASET_INVALID), id="user-error"
        ),
        pytest.param(
            Reason.OUT_OF_MEMORY, True, exit_code_for(Reason.OUT_OF_MEMORY), id="out-of-memory"
        ),
    ],
)
def test_launcher_exits_with_the_trainer_code(
    tmp_path: Path, result: Reason | None, failed: bool, code: int
) -> None:
    path = tmp_path / "result.json"
    if result is not None:
        path.write_text(TrainerResult(reason=result, message="m").to_termination_message())
    assert exit_code_from(path, failed) == code


def test_evaluation_runs_under_deepspeeds_autocast(tmp_path: Path) -> None:
    """The Trainer evaluates the bare module, outside DeepSpeed's engine and its autocast:
    under `torch_autocast` the trainer gives the evaluation the same autocast."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    model = LlamaForCausalLM(config)
    seen: list[bool] = []
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda *_: seen.append(torch.is_autocast_enabled("cpu"))
    )
    rows = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])

    plain = Trainer(model=model, args=args, eval_dataset=rows)
    assert not distributed.evaluate_under_autocast(plain)
    seen.clear()
    plain.evaluate()
    assert seen
    assert not any(seen)  # fp32 without autocast, as the bare module runs

    args.deepspeed = distributed.deepspeed_config(
        DistributedStrategy.DEEPSPEED_ZERO3, False, torch_autocast=True
    )
    trainer = Trainer(model=model, args=args, eval_dataset=rows)
    assert distributed.evaluate_under_autocast(trainer)
    seen.clear()
    trainer.evaluate()
    assert seen
    assert all(seen)
    model.train()  # training steps get their autocast from DeepSpeed's engine
    with trainer.compute_loss_context_manager():
        assert not torch.is_autocast_enabled("cpu")
