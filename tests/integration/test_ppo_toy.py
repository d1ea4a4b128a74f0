"""The project's PPO on a tiny random Llama with a LoRA adapter and a toy reward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import RLHFSpec
from kubetune.trainer.alignment.ppo import train_ppo
from kubetune.trainer.alignment.ppo_rollouts import (
    reference_logprobs,
    render_prompt,
    response_logprobs,
    sample_rollouts,
)
from kubetune.trainer.models import TrainingSetupError

PROMPTS = [
    [{"role": "user", "content": text}]
    for text in (
        "hi",
        "what is two plus two",
        "name a colour",
        "tell me a joke",
        "how are you",
        "say something",
        "count to three",
        "what is the capital of France",
    )
]

# The tiny model's logits are nearly flat over its 49k-token vocabulary (a random model),
# so no reward could move it at temperature 1 in a few steps. At a low temperature its
# samples concentrate on a few tokens, among them a newline, and the adapter can shift that
# choice: rewarding newlines gives PPO something it can visibly learn in seconds.
TOY_SPEC = {
    "klCoefficient": "0.05",
    "klTarget": "1",
    "generation": {"maxNewTokens": 8, "temperature": "0.09"},
    "ppo": {"ppoEpochs": 4},
}


def newline_share(prompts: list[str], completions: list[str]) -> list[float]:
    return [completion.count("\n") / 8 for completion in completions]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: threads only add contention on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def lora_policy(model_dir: Path, **lora: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", **lora)
    return get_peft_model(load(model_dir), config)


def tokenizer_of(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_ppo_raises_the_reward(tiny_model_dir: Path) -> None:
    policy = lora_policy(tiny_model_dir)
    lines: list[str] = []
    records: list[dict[str, float]] = []
    result = train_ppo(
        policy,
        tokenizer_of(tiny_model_dir),
        PROMPTS,
        newline_share,
        spec=RLHFSpec.model_validate(TOY_SPEC),
        steps=12,
        batch_size=16,
        learning_rate=2e-3,
        seed=0,
        log=lines.append,
        on_step=records.append,
    )
    scores = [record["score"] for record in result.history]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.15, scores
    assert records == result.history
    assert len(lines) == 12
    assert lines[0].startswith("PPO step 1/12: score ")
    assert set(result.history[0]) == {
        "step",
        "score",
        "kl",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "value_clip_fraction",
        "approx_kl",
        "response_length",
        "seconds",
    }
    # The adapter starts as a no-op, so the first batch has no KL to the reference; the
    # policy then moves away from it, past the KL target, so the controller raises β.
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert result.history[-1]["kl"] > 1.0
    assert result.history[-1]["kl_coef"] > 0.05
    assert result.metrics["initial_score"] == scores[0]
    # train_ppo turns dropout off while it runs and restores it.
    assert policy.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout[
        "default"
    ].p == pytest.approx(0.05)


def test_reference_log_probs_are_the_base_models(tiny_model_dir: Path) -> None:
    # A random (not zero) LoRA B matrix, so the adapter really changes the outputs.
    policy = lora_policy(tiny_model_dir, init_lora_weights=False)
    base = load(tiny_model_dir)
    tokenizer = tokenizer_of(tiny_model_dir)
    torch.manual_seed(0)
    rollouts = sample_rollouts(
        policy,
        tokenizer,
        [render_prompt(tokenizer, messages) for messages in PROMPTS[:4]],  # different lengths
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        eos_ids=[tokenizer.eos_token_id],
    )
    assert bool((rollouts.attention_mask == 0).any())  # some prompts are left-padded
    with torch.no_grad():
        adapted, _ = response_logprobs(policy, rollouts, 1.0)
        expected, _ = response_logprobs(base, rollouts, 1.0)
    reference = reference_logprobs(policy, None, rollouts, 1.0)
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    # The adapter is back on afterwards.
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(policy, rollouts, 1.0)[0], adapted)


def test_ppo_is_reproducible_with_its_seed(tiny_model_dir: Path) -> None:
    def run() -> tuple[list[dict[str, float]], torch.Tensor]:
        policy = lora_policy(tiny_model_dir)
        result = train_ppo(
            policy,
            tokenizer_of(tiny_model_dir),
            PROMPTS,
            newline_share,
            spec=RLHFSpec.model_validate(TOY_SPEC),
            steps=2,
            batch_size=4,
            learning_rate=2e-3,
            seed=7,
            log=lambda _: None,
            mini_batch_size=2,
        )
        history = [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]
        weights = policy.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"]
        return history, weights.weight.detach().clone()

    first_history, first_weights = run()
    second_history, second_weights = run()
    assert first_history == second_history
    assert torch.equal(first_weights, second_weights)
    assert not torch.equal(first_weights, torch.zeros_like(first_weights))  # it did train


def test_full_fine_tuning_takes_a_separate_reference(tiny_model_dir: Path) -> None:
    policy, reference = load(tiny_model_dir), load(tiny_model_dir)
    reference.requires_grad_(False)
    before = reference.model.layers[0].self_attn.q_proj.weight.clone()
    tokenizer = tokenizer_of(tiny_model_dir)
    arguments: dict[str, Any] = {
        "spec": RLHFSpec.model_validate(TOY_SPEC),
        "steps": 1,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "seed": 0,
        "log": lambda _: None,
    }
    with pytest.raises(ValueError, match="reference"):
        train_ppo(policy, tokenizer, PROMPTS, newline_share, **arguments)
    train_ppo(policy, tokenizer, PROMPTS, newline_share, reference=reference, **arguments)
    assert torch.equal(reference.model.layers[0].self_attn.q_proj.weight, before)
    assert not torch.equal(policy.model.layers[0].self_attn.q_proj.weight, before)


def test_prompt_learning_adapters_are_refused(tiny_model_dir: Path) -> None:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    policy = get_peft_model(
        load(tiny_model_dir), PromptTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM)
    )
    with pytest.raises(TrainingSetupError) as raised:
        train_ppo(
            policy,
            tokenizer_of(tiny_model_dir),
            PROMPTS,
            newline_share,
            spec=RLHFSpec(),
            steps=1,
            batch_size=1,
            learning_rate=1e-3,
            seed=0,
            log=lambda _: None,
        )
    assert raised.value.reason == Reason.INVALID_SPEC


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tiny_model_dir: Path) -> None:
    """Steps 1-2, a checkpoint (adapter + state), then steps 3-4 in a fresh policy give the
    same weights, value head and KL coefficient as steps 1-4 in one go."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    spec = RLHFSpec.model_validate(TOY_SPEC)
    tokenizer = tokenizer_of(tiny_model_dir)
    common: dict[str, Any] = {
        "spec": spec,
        "steps": 4,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "seed": 3,
        "log": lambda _: None,
        "mini_batch_size": 2,
    }
    whole = train_ppo(lora_policy(tiny_model_dir), tokenizer, PROMPTS, newline_share, **common)

    saved: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    first = lora_policy(tiny_model_dir)

    def keep(step: int, state: dict[str, Any]) -> None:
        adapter = {k: v.clone() for k, v in get_peft_model_state_dict(first).items()}
        saved[step] = (adapter, state)

    stopped = train_ppo(
        first, tokenizer, PROMPTS, newline_share, checkpoint=keep, stop=lambda: True, **common
    )
    assert stopped.stopped_at == 1
    assert list(saved) == [1]
    second = lora_policy(tiny_model_dir)
    adapter, state = saved[1]
    set_peft_model_state_dict(second, adapter)
    resumed = train_ppo(
        second, tokenizer, PROMPTS, newline_share, start_step=1, state=state, **common
    )
    assert [r["step"] for r in resumed.history] == [2.0, 3.0, 4.0]
    for key, value in get_peft_model_state_dict(whole.policy).items():
        torch.testing.assert_close(get_peft_model_state_dict(resumed.policy)[key], value)
    torch.testing.assert_close(resumed.value_head.linear.weight, whole.value_head.linear.weight)
    assert resumed.metrics["kl_coef"] == pytest.approx(whole.metrics["kl_coef"])
