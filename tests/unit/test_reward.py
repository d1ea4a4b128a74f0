"""Reward-model pieces that need no training: the held-out split, the pairwise metrics,
the TRL settings, the synthetic preference set and batched scoring."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1.alignment import RewardModelSpec
from kubetune.api.v1alpha1.training import Toggle, TrainingSpec
from kubetune.trainer.alignment.reward import (
    RewardScorer,
    held_out_count,
    pair_metrics,
    planned_steps,
    reward_config,
    split_pairs,
)
from kubetune.trainer.alignment.synthetic import date_preference_rows


def rows(count: int, with_ids: bool = True) -> list[dict[str, Any]]:
    made = []
    for i in range(count):
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
        }
        if with_ids:
            row["id"] = f"row-{i}"
        made.append(row)
    return made


@pytest.mark.parametrize(
    ("total", "fraction", "expected"),
    [
        pytest.param(100, 0.1, 10, id="tenth"),
        pytest.param(30, 0.1, 3, id="float-noise"),
        pytest.param(25, 0.1, 3, id="half-rounds-up"),
        pytest.param(10, 0.01, 1, id="at-least-one"),
        pytest.param(10, 0.0, 0, id="zero"),
        pytest.param(1, 0.5, 0, id="single-pair-trains"),
        pytest.param(4, 0.99, 3, id="one-left-to-train"),
    ],
)
def test_held_out_count(total: int, fraction: float, expected: int) -> None:
    assert held_out_count(total, fraction) == expected


@pytest.mark.parametrize("with_ids", [True, False], ids=["by-id", "by-content"])
def test_split_is_disjoint_complete_sized_and_order_independent(with_ids: bool) -> None:
    data = rows(200, with_ids)
    train, held = split_pairs(data, 0.1, seed=7)
    assert len(held) == 20
    assert len(train) == 180
    key = repr
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert sorted(map(key, train + held)) == sorted(map(key, data))
    # Both parts keep the input order.
    assert [data.index(r) for r in held] == sorted(data.index(r) for r in held)

    shuffled = list(data)
    random.Random(1).shuffle(shuffled)
    _, held_again = split_pairs(shuffled, 0.1, seed=7)
    assert sorted(map(key, held_again)) == sorted(map(key, held))


def test_split_depends_on_seed_and_keeps_rows_held_out_as_data_grows() -> None:
    data = rows(200)
    held = {r["id"] for r in split_pairs(data, 0.1, seed=7)[1]}
    other_seed = {r["id"] for r in split_pairs(data, 0.1, seed=8)[1]}
    assert held != other_seed
    # A row's rank depends on its own id only: when the data grows, an old row that is
    # held out now was held out before.
    grown = {r["id"] for r in split_pairs(rows(400), 0.05, seed=7)[1]}
    assert len(grown) == 20
    assert grown & {r["id"] for r in data} <= held


def test_pair_metrics_on_hand_made_rewards() -> None:
    result = pair_metrics([1.0, 2.0, 3.0, 0.5], [0.0, 3.0, 1.0, 0.5])
    # margins 1, -1, 2, 0: the tie counts as wrong
    assert result.accuracy == pytest.approx(0.5)
    assert result.mean_margin == pytest.approx(0.5)
    assert result.pairs == 4
    assert pair_metrics([2.0], [-1.0]).accuracy == 1.0


@pytest.mark.parametrize(
    ("chosen", "rejected"), [([], []), ([1.0], [])], ids=["empty", "mismatched"]
)
def test_pair_metrics_refuses_bad_input(chosen: list[float], rejected: list[float]) -> None:
    with pytest.raises(ValueError, match="same positive number"):
        pair_metrics(chosen, rejected)


@pytest.mark.parametrize(
    ("training", "pairs", "expected"),
    [
        pytest.param(TrainingSpec(max_steps=7), 1000, 7, id="max-steps"),
        pytest.param(TrainingSpec(batch_size=4), 10, 3, id="one-epoch-partial-batch"),
        pytest.param(
            TrainingSpec(batch_size=4, gradient_accumulation_steps=2, epochs=3), 20, 9, id="accum"
        ),
    ],
)
def test_planned_steps(training: TrainingSpec, pairs: int, expected: int) -> None:
    assert planned_steps(pairs, training) == expected


def test_reward_config_carries_the_settings(tmp_path: Path) -> None:
    import torch

    from kubetune.trainer.models import Precisions

    training = TrainingSpec(
        max_steps=12,
        learning_rate="5e-5",
        batch_size=2,
        max_seq_length=256,
        warmup_steps=1,
        gradient_checkpointing=Toggle.AUTO,
        eval_every_steps=5,
        seed=3,
    )
    args = reward_config(
        training,
        RewardModelSpec(center_rewards_coefficient="0.01"),
        tmp_path,
        Precisions(load=torch.float32, bf16=False, fp16=False),
        seed=3,
        cuda=False,
        has_eval=True,
    )
    assert args.max_steps == 12
    assert args.learning_rate == pytest.approx(5e-5)
    assert args.per_device_train_batch_size == 2
    assert args.max_length == 256
    assert args.center_rewards_coefficient == pytest.approx(0.01)
    assert args.seed == 3
    assert args.bf16 is False  # RewardConfig would default to bf16
    assert args.gradient_checkpointing is False  # Auto is off on a CPU
    assert args.eval_strategy == "steps"
    assert args.optim == "adamw_torch"


def test_synthetic_rows_are_deterministic_contract_rows_with_both_requests() -> None:
    first = date_preference_rows(100, seed=5)
    assert first == date_preference_rows(100, seed=5)
    assert first != date_preference_rows(100, seed=6)
    assert len({r["id"] for r in first}) == 100
    for row in first:
        assert set(row) == {"id", "prompt", "chosen", "rejected"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert row["chosen"] != row["rejected"]
    iso_chosen = sum(len(r["chosen"][0]["content"]) == 10 for r in first)
    assert 30 <= iso_chosen <= 70  # both requests occur, so the prompt matters


@pytest.fixture(scope="module")
def random_reward_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with an untrained score head, saved as a reward model."""
    import torch

    from kubetune.trainer.alignment.reward import load_reward_model, save_reward_model
    from kubetune.trainer.resolve import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_reward_model(tiny_model_dir, tokenizer, torch.float32, seed=1)
    return save_reward_model(model, tokenizer, tmp_path_factory.mktemp("reward"))


def test_scorer_batches_score_like_one_at_a_time(random_reward_model: Path) -> None:
    scorer = RewardScorer(random_reward_model)
    data = date_preference_rows(7, seed=3)
    prompts = [r["prompt"] for r in data] * 2
    completions = [r["chosen"][0]["content"] for r in data] + [
        r["rejected"][0]["content"] for r in data
    ]
    batched = scorer.score(prompts, completions, batch_size=4)
    single = [
        scorer.score([p], [c], batch_size=1)[0] for p, c in zip(prompts, completions, strict=True)
    ]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(batched)) > 1  # different texts, different rewards
    as_messages = [[{"role": "assistant", "content": c}] for c in completions]
    assert scorer(prompts=prompts, completions=as_messages) == pytest.approx(batched, abs=1e-6)


def test_scorer_reads_what_training_reads(random_reward_model: Path) -> None:
    from kubetune.trainer.alignment.reward_scoring import encode

    scorer = RewardScorer(random_reward_model)
    row = date_preference_rows(1)[0]
    expected = encode(scorer.tokenizer, [*row["prompt"], *row["chosen"]])
    answer = row["chosen"][0]["content"]
    assert scorer.encode(row["prompt"], answer) == expected
    assert scorer.encode(row["prompt"], row["chosen"]) == expected
    rendered = str(
        scorer.tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
    )
    assert scorer.encode(rendered, answer) == expected  # how the PPO stage passes prompts


@pytest.mark.parametrize("template", ["model", "ChatML", "Alpaca"])
def test_answer_frame_completes_a_rendered_prompt(
    builtin_tokenizer_dir: Path, template: str
) -> None:
    from kubetune.trainer.alignment.reward_scoring import answer_frame
    from kubetune.trainer.resolve import load_tokenizer
    from kubetune.trainer.resolve.tokenizer import ALPACA_TEMPLATE, CHATML_TEMPLATE

    jinja = {"model": None, "ChatML": CHATML_TEMPLATE, "Alpaca": ALPACA_TEMPLATE}[template]
    tokenizer = load_tokenizer(builtin_tokenizer_dir, chat_template=jinja)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    before, after = answer_frame(tokenizer)
    start = str(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "Hello."}], tokenize=False
    )
    assert start + before + "Hello." + after == full


@pytest.mark.parametrize(
    ("row", "max_seq_length", "reason"),
    [
        pytest.param(
            {"id": "x", "messages": [{"role": "user", "content": "hi"}]},
            2048,
            "DatasetInvalid",
            id="not-a-pair",
        ),
        pytest.param(date_preference_rows(1)[0], 16, "DatasetEmpty", id="all-too-long"),
    ],
)
def test_unusable_rows_are_refused_before_loading_the_model(
    builtin_tokenizer_dir: Path,
    tmp_path: Path,
    row: dict[str, Any],
    max_seq_length: int,
    reason: str,
) -> None:
    from kubetune.trainer.alignment.reward import train_reward_model
    from kubetune.trainer.models import TrainingSetupError
    from kubetune.trainer.resolve import load_tokenizer

    with pytest.raises(TrainingSetupError) as caught:
        train_reward_model(
            tmp_path / "no-model-needed",
            load_tokenizer(builtin_tokenizer_dir),
            [row, row],
            spec=RewardModelSpec(),
            training=TrainingSpec(max_seq_length=max_seq_length),
            lora=None,
            output_dir=tmp_path / "out",
            seed=0,
            log=lambda _: None,
        )
    assert caught.value.reason.value == reason
