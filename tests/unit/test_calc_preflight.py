"""The preflight check of a FineTuneJob: fits, advice, gradient checkpointing, GPU count."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.api.v1alpha1.training import Optimizer
from kubetune.calc import KNOWN_ARCHITECTURES, choose_gpus, preference_batch_tokens, preflight
from kubetune.calc.preflight import INSUFFICIENT_GPU_MEMORY

L8, L70 = KNOWN_ARCHITECTURES["llama-3.1-8b"], KNOWN_ARCHITECTURES["llama-3.1-70b"]


def spec(**fields: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "builtin://random/llama-3.1-8b"},
            "dataset": {"uri": "s3://bucket/data.jsonl"},
            **fields,
        }
    )


def test_default_lora_job_fits_a_48_gib_gpu_with_checkpointing_chosen_automatically() -> None:
    result = preflight(spec(), L8, 48.0, 1)
    assert result.fits is True
    assert result.setup.gradient_checkpointing  # 4 x 2048 tokens need ~79 GiB without it
    assert result.advice == ""
    assert result.reason is None
    assert result.needed_gib == pytest.approx(result.estimate.total_gib)


def test_auto_checkpointing_stays_off_when_the_step_fits_without_it() -> None:
    result = preflight(spec(), L8, 140.0, 1)
    assert result.fits is True
    assert not result.setup.gradient_checkpointing


def test_a_job_that_does_not_fit_says_what_would() -> None:
    job = spec(training={"batchSize": 1, "gradientCheckpointing": "Disabled"})
    result = preflight(job, L8, 24.0, 1)
    assert result.fits is False
    assert result.reason == INSUFFICIENT_GPU_MEMORY == Reason.INSUFFICIENT_GPU_MEMORY.value
    assert result.advice == (
        "needs ~34 GiB of GPU memory, the GPU has 24 GiB: enable gradient checkpointing, "
        "use method QLoRA, or use 3 GPUs with distributed.strategy FSDP"
    )


def test_advice_names_batch_and_sequence_length_when_nothing_else_helps() -> None:
    job = spec(training={"batchSize": 8, "maxSeqLength": 4096})
    result = preflight(job, L8, 24.0, 1)
    assert result.fits is False
    assert "lower training.batchSize to 2" in result.advice
    assert "lower training.maxSeqLength to 1024" in result.advice


def test_advice_when_no_single_change_fits() -> None:
    job = spec(model={"uri": "builtin://random/llama-3.1-70b"}, method="Full")
    assert "no single change fits" in preflight(job, L70, 24.0, 1).advice


def test_unknown_memory_or_cpu_runs_are_not_judged() -> None:
    unknown = preflight(spec(), L8, None, 1)
    assert unknown.fits is None
    assert unknown.setup.gradient_checkpointing
    assert preflight(spec(), L8, 24.0, 0).fits is None


def test_spec_fields_reach_the_setup() -> None:
    job = spec(
        method="QLoRA",
        lora={"rank": 64, "targetModules": ["q_proj", "v_proj"], "dropout": "0"},
        qlora={"doubleQuant": False},
        training={"batchSize": 2, "maxSeqLength": 1024, "gradientCheckpointing": "Enabled",
                  "precision": "BF16"},
    )  # fmt: skip
    result = preflight(job, L8, 24.0, 1)
    s = result.setup
    assert (s.batch_size, s.seq_len, s.adapter.rank) == (2, 1024, 64)
    assert s.adapter.target_modules == ("q_proj", "v_proj")
    assert not s.adapter.dropout
    assert not s.double_quant
    assert s.gradient_checkpointing
    assert result.estimate.optimizer == Optimizer.PAGED_ADAMW_8BIT
    assert result.estimate.params.trainable == 32 * 64 * (8192 + 5120)


def test_prefix_tuning_never_checkpoints() -> None:
    job = spec(method="PrefixTuning", prefixTuning={"numVirtualTokens": 30})
    result = preflight(job, L8, 140.0, 1)
    assert not result.setup.gradient_checkpointing
    assert result.estimate.params.trainable == 30 * 32 * 2 * 1024


def test_the_most_demanding_stage_decides() -> None:
    pairs = preflight(spec(stages=[{"type": "SFT"}, {"type": "DPO"}]), L8, 80.0, 1)
    assert pairs.stage == "DPO"
    assert pairs.setup.sequences_per_example == 2
    small = spec(stages=[{"type": "SFT"}, {"type": "DPO", "training": {"batchSize": 1}}])
    assert preflight(small, L8, 80.0, 1).stage == "SFT"


def test_full_dpo_keeps_a_frozen_reference() -> None:
    job = spec(method="Full", stages=[{"type": "SFT"}, {"type": "DPO"}])
    result = preflight(job, L8, 140.0, 8)
    assert result.stage == "DPO"
    assert result.setup.frozen_model_copies == 1


def test_sharding_spans_every_node() -> None:
    job = spec(distributed={"nodes": 2, "strategy": "FSDP"})
    assert preflight(job, L8, 80.0, 4).setup.gpus == 8


@pytest.mark.parametrize(
    ("method", "strategy", "memory", "expected"),
    [
        ("LoRA", "None", 80.0, 1),
        ("LoRA", "None", 16.0, None),  # replicas: more GPUs never help
        ("Full", "FSDP", 80.0, 2),
        ("Full", "DeepSpeedZeRO3", 40.0, 6),  # live parameters, buckets, a 2nd grad partition
        ("Full", "FSDP", 8.0, None),
    ],
)
def test_choose_gpus_is_the_smallest_count_that_fits(
    method: str, strategy: str, memory: float, expected: int | None
) -> None:
    job = spec(method=method, distributed={"strategy": strategy})
    chosen = choose_gpus(job, L8, memory)
    assert chosen == expected
    if chosen is not None:
        assert preflight(job, L8, memory, chosen).fits
        assert chosen == 1 or not preflight(job, L8, memory, chosen - 1).fits


def test_advice_can_suggest_several_nodes_or_cpu_offload() -> None:
    job = spec(
        model={"uri": "builtin://random/llama-3.1-70b"},
        method="Full",
        training={"batchSize": 1},
        distributed={"strategy": "FSDP"},
    )
    assert preflight(job, L70, 79.6, 8).advice == (
        "needs ~151 GiB of GPU memory, the GPU has 79.6 GiB: use method QLoRA, use 16 GPUs "
        "(2 nodes), or set distributed.cpuOffload (optimizer and gradients in CPU memory)"
    )


def test_auto_checkpoints_only_the_layers_memory_needs() -> None:
    job = spec(training={"batchSize": 8})
    result = preflight(job, L8, 120.0, 1)
    assert result.fits is True
    layers = result.estimate.checkpointed_layers
    assert 0 < layers < L8.num_layers
    assert result.setup.checkpoint_every > 1
    # Every layer checkpointed would also fit, with more recomputation than needed.
    every = spec(training={"batchSize": 8, "gradientCheckpointing": "Enabled"})
    assert preflight(every, L8, 120.0, 1).estimate.checkpointed_layers == L8.num_layers


def test_auto_checkpoints_every_layer_in_chains_with_rlhf() -> None:
    job = spec(
        training={"batchSize": 8},
        stages=[{"type": "SFT"}, {"type": "RewardModel"}, {"type": "RLHF"}],
    )
    result = preflight(job, L8, 120.0, 1)
    assert result.estimate.checkpointed_layers == L8.num_layers


def test_the_trainers_fast_paths_lower_the_estimate_and_can_be_turned_off() -> None:
    fast = preflight(spec(), L8, 139.8, 1)
    plain = spec(training={"fastPaths": {"fusedKernels": "Disabled", "leanAdapters": "Disabled"}})
    slow = preflight(plain, L8, 139.8, 1)
    assert fast.setup.fused_kernels
    assert fast.setup.lean_adapters
    assert not slow.setup.fused_kernels
    assert not slow.setup.lean_adapters
    # Measured on an H200 (docs/calc.md): 70.55 GiB with Liger's kernels, 81.70 without.
    assert fast.estimate.allocated_gib == pytest.approx(70.55, rel=0.02)
    without_liger = preflight(spec(), L8, 139.8, 1, fused_kernels=False)
    assert without_liger.estimate.allocated_gib == pytest.approx(81.70, rel=0.02)


def test_preference_batches_are_bounded_by_the_longest_pairs_of_the_data() -> None:
    pairs = [(100, 300), (2000, 50), (700, 700), (10, 20)]
    # packed: the two longest pairs end to end, each sequence with its margin, at most 1024
    assert preference_batch_tokens(pairs, 2, 1024, packed=True) == (702 + 702) + (1024 + 52)
    assert preference_batch_tokens(pairs, 2, 4096, packed=True) == (2002 + 52) + (702 + 702)
    # padded: every sequence of the batch at the data's longest
    assert preference_batch_tokens(pairs, 2, 1024, packed=False) == 2 * 2 * 1024
    assert preference_batch_tokens(pairs, 3, 4096, packed=False) == 3 * 2 * 2002
    assert preference_batch_tokens(pairs, 8, 4096, packed=True) == sum(
        min(c + 2, 4096) + min(r + 2, 4096) for c, r in pairs
    )
    assert preference_batch_tokens([], 2, 1024, packed=True) is None


def test_dpo_sized_by_its_data_checkpoints_far_fewer_layers_on_an_80_gib_gpu() -> None:
    job = spec(stages=[{"type": "DPO"}], training={"batchSize": 4})
    planned = preflight(job, L8, 80.0, 1)
    assert planned.setup.checkpointed_layers(L8.num_layers) == L8.num_layers  # 4 x 2 x 2048
    # the 600 pairs of bench/throughput.py's dpo-8b part: its four longest hold 7,087 tokens
    sized = preflight(job, L8, 80.0, 1, data_tokens={0: 7087})
    assert sized.fits is True
    assert sized.setup.data_tokens == 7087
    assert sized.setup.checkpointed_layers(L8.num_layers) <= 2
    unsized = preflight(job, L8, 140.0, 1).estimate
    assert sized.estimate.allocated_gib < 0.55 * unsized.allocated_gib
    # batches that change shape every step get the wider margin
    assert sized.estimate.fragmentation_gib == pytest.approx(0.25 * sized.estimate.allocated_gib)
    assert sized.needed_gib <= 80.0
    # a bound above the planned tokens changes no tokens
    above = preflight(job, L8, 140.0, 1, data_tokens={0: 10**6})
    assert above.setup.tokens == planned.setup.tokens == 4 * 2 * 2048


def test_data_tokens_size_only_the_stage_they_name() -> None:
    job = spec(stages=[{"type": "SFT"}, {"type": "DPO"}])
    result = preflight(job, L8, 140.0, 1, data_tokens={1: 1000})
    assert result.stage == "SFT"  # the DPO stage, sized by its data, needs less
    assert result.setup.data_tokens is None


def test_auto_offloads_checkpointed_inputs_only_when_nothing_else_fits() -> None:
    job = spec(method="QLoRA", training={"batchSize": 4, "gradientCheckpointing": "Enabled"})
    roomy = preflight(job, L8, 24.0, 1)
    assert roomy.fits is True
    assert not roomy.setup.offload_activations
    assert roomy.estimate.host_offload_gib == 0
    tight = preflight(job, L8, roomy.needed_gib - 1.0, 1)
    assert tight.fits is True
    assert tight.setup.offload_activations
    # 31 of the 32 checkpointed inputs (8,192 tokens x 4,096 x 2 bytes each) leave the GPU.
    freed = roomy.estimate.allocated_gib - tight.estimate.allocated_gib
    assert freed == pytest.approx(31 * 8192 * 4096 * 2 / 2**30)
    assert tight.estimate.host_offload_gib == pytest.approx(32 * 8192 * 4096 * 2 / 2**30)
    assert any("activation offload" in note for note in tight.estimate.notes)
    assert preflight(job, L8, tight.needed_gib - 0.5, 1).fits is False


def test_auto_checkpointing_tries_every_layer_before_offloading() -> None:
    job = spec(method="QLoRA", training={"batchSize": 4})
    enabled = spec(method="QLoRA", training={"batchSize": 4, "gradientCheckpointing": "Enabled"})
    needed = preflight(enabled, L8, 139.8, 1).needed_gib
    every_layer = preflight(job, L8, needed + 0.1, 1)
    assert every_layer.setup.checkpoint_every == 1
    assert not every_layer.setup.offload_activations
    offloaded = preflight(job, L8, needed - 1.0, 1)
    assert offloaded.fits is True
    assert offloaded.setup.checkpoint_every == 1
    assert offloaded.setup.offload_activations


def test_offload_set_by_hand_is_kept_and_disabled_is_advised_against() -> None:
    training = {"batchSize": 4, "gradientCheckpointing": "Enabled"}
    enabled = spec(method="QLoRA", training={**training, "activationOffload": "Enabled"})
    assert preflight(enabled, L8, 139.8, 1).setup.offload_activations
    disabled = spec(method="QLoRA", training={**training, "activationOffload": "Disabled"})
    result = preflight(disabled, L8, 10.5, 1)
    assert result.fits is False
    assert "set training.activationOffload to Enabled (checkpointed layer inputs" in result.advice


def test_offload_leaves_cpu_runs_alone() -> None:
    from kubetune.calc.preflight import host_preflight

    job = spec(training={"gradientCheckpointing": "Enabled", "activationOffload": "Enabled"})
    verdict = host_preflight(job, KNOWN_ARCHITECTURES["smollm2-135m"], 64.0, dense_attention=False)
    assert not verdict.setup.offload_activations
