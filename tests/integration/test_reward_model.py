"""The RewardModel stage on a tiny random Llama: it learns the synthetic date preferences,
with LoRA and in full, and the saved folder scores pairs as training measured them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.v1alpha1.alignment import RewardModelSpec
from kubetune.api.v1alpha1.methods import LoRASpec
from kubetune.api.v1alpha1.training import Schedule, TrainingSpec
from kubetune.trainer.alignment.reward import (
    RewardScorer,
    pair_metrics,
    split_pairs,
    train_reward_model,
)
from kubetune.trainer.alignment.synthetic import date_preference_rows
from kubetune.trainer.resolve import load_tokenizer

SEED = 11
EVAL_FRACTION = "0.2"


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """The machine is shared: one thread is as fast for a model this small."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("lora", "steps", "learning_rate", "center"),
    [
        pytest.param(None, 60, "1e-3", None, id="full"),
        pytest.param(LoRASpec(rank=8, alpha=16), 80, "2e-3", "0.01", id="lora-centred"),
    ],
)
def test_reward_model_learns_preferences_and_reloads(
    tiny_model_dir: Path,
    tmp_path: Path,
    lora: LoRASpec | None,
    steps: int,
    learning_rate: str,
    center: str | None,
) -> None:
    from transformers import AutoModelForSequenceClassification

    rows = date_preference_rows(200)
    lines: list[str] = []
    result = train_reward_model(
        tiny_model_dir,
        load_tokenizer(tiny_model_dir),
        rows,
        spec=RewardModelSpec(eval_fraction=EVAL_FRACTION, center_rewards_coefficient=center),
        training=TrainingSpec(
            max_steps=steps,
            learning_rate=learning_rate,
            batch_size=8,
            max_seq_length=256,
            warmup_steps=0,
            schedule=Schedule.CONSTANT,
            log_every_steps=10,
        ),
        lora=lora,
        output_dir=tmp_path / "reward",
        seed=SEED,
        log=lines.append,
    )

    assert result.before is not None
    assert result.after is not None
    assert result.after.pairs == result.before.pairs == 40
    assert result.train_pairs == 160
    assert result.steps == steps
    # The prompt decides which form is preferred: an untrained head is near chance.
    assert result.before.accuracy < 0.75
    assert result.after.accuracy >= 0.9
    assert result.after.accuracy > result.before.accuracy
    assert result.after.mean_margin > result.before.mean_margin + 1.0
    assert [r["step"] for r in result.log_records if "loss" in r][-1] == steps
    assert any("held-out accuracy" in line and "after" in line for line in lines)

    folder = result.folder
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    assert not (folder / "adapter_config.json").exists()  # LoRA is merged
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id is not None

    _, held_out = split_pairs(rows, float(EVAL_FRACTION), SEED)
    scorer = RewardScorer(folder)
    prompts = [row["prompt"] for row in held_out]
    chosen = scorer.score(prompts, [row["chosen"][0]["content"] for row in held_out])
    rejected = scorer.score(prompts, [row["rejected"][0]["content"] for row in held_out])
    scored = pair_metrics(chosen, rejected)
    assert scored.accuracy == result.after.accuracy
    assert scored.mean_margin == pytest.approx(result.after.mean_margin, rel=1e-3)


def test_resuming_from_the_final_checkpoint_trains_no_further(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A stage killed after its final checkpoint, before it was marked complete, resumes at
    the last step: it must end there with the same weights, not take one step more."""
    from safetensors.torch import load_file

    from kubetune.api.v1alpha1.training import CheckpointSpec

    training = TrainingSpec(
        max_steps=4,
        learning_rate="1e-3",
        batch_size=8,
        max_seq_length=256,
        warmup_steps=0,
        log_every_steps=1,
        checkpoint=CheckpointSpec(every_steps=2, keep=2),
    )

    def train(name: str, resume_from: Path | None) -> object:
        return train_reward_model(
            tiny_model_dir,
            load_tokenizer(tiny_model_dir),
            date_preference_rows(80),
            spec=RewardModelSpec(eval_fraction=EVAL_FRACTION),
            training=training,
            lora=None,
            output_dir=tmp_path / name,
            checkpoint_dir=tmp_path / "checkpoints",
            seed=SEED,
            log=lambda _: None,
            resume_from=resume_from,
        )

    first = train("first", None)
    final = tmp_path / "checkpoints" / "checkpoint-4"
    assert final.is_dir()
    resumed = train("resumed", final)
    assert resumed.steps == first.steps == 4  # type: ignore[attr-defined]
    ours = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "first" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(bool((ours[k] == theirs[k]).all()) for k in theirs)
