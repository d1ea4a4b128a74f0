"""Scoring text with a reward model: the rewards the RewardModel stage measures and the
RLHF stage optimizes.

A conversation is read as the chat template renders it (the way TRL's RewardTrainer
tokenizes conversational pairs), padded on the right; the reward is the model's single
output at the last token that is not padding. Training, held-out evaluation and
`RewardScorer` all go through `encode` and `score_ids`, so the reward the RLHF stage sees
is the reward that was trained and measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.trainer.models import TrainingSetupError
from kubetune.trainer.tokenize import TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PairMetrics:
    """How well rewards rank the held-out pairs."""

    accuracy: float
    """Fraction of pairs with r(chosen) > r(rejected); ties count as wrong."""

    mean_margin: float
    """Mean of r(chosen) − r(rejected)."""

    pairs: int


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> PairMetrics:
    """Pairwise accuracy and mean margin of rewards given to chosen and rejected answers."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(
            f"need the same positive number of chosen and rejected rewards, got {len(chosen)} "
            f"and {len(rejected)}"
        )
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return PairMetrics(
        accuracy=sum(m > 0 for m in margins) / len(margins),
        mean_margin=sum(margins) / len(margins),
        pairs=len(margins),
    )


def encode(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a conversation as the reward model reads it: the chat template's
    rendering, the way TRL's RewardTrainer tokenizes conversational pairs."""
    encoded: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    return [int(token) for token in encoded["input_ids"]]


def _batches(sequences: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of the sequences in batches of similar length (less padding)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def score_ids(
    model: PreTrainedModel,
    sequences: list[list[int]],
    pad_token_id: int,
    batch_size: int,
) -> list[float]:
    """The reward of each token sequence, in order. Padding goes on the right: the model
    reads the reward at the last token that is not padding."""
    import torch

    device = next(model.parameters()).device
    rewards = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in _batches(sequences, max(1, batch_size)):
            longest = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(sequences[index])] = torch.tensor(sequences[index])
                mask[row, : len(sequences[index])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, index in enumerate(batch):
                rewards[index] = float(logits[row, 0].float())
    model.train(was_training)
    return rewards


def answer_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """What the chat template writes between the generation prompt and an assistant answer,
    and after the answer (e.g. ("", "<|im_end|>\\n") for ChatML): a prompt rendered with the
    generation prompt, plus these around the answer, renders the whole conversation."""
    sentinel = "ANSWER-7f3a"
    probe = [{"role": "user", "content": "question"}]
    start = str(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True))
    full = str(
        tokenizer.apply_chat_template(
            [*probe, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    )
    at = full.find(sentinel)
    if at < len(start) or not full.startswith(start):
        raise TemplateError(
            "the chat template renders a conversation's beginning differently from the whole "
            "conversation, so rendered prompts cannot be scored; pass the prompts as messages "
            "or set dataset.chatTemplate to a preset (ChatML or Alpaca)"
        )
    return full[len(start) : at], full[at + len(sentinel) :]


def _completion_text(completion: str | Messages) -> str:
    if isinstance(completion, str):
        return completion
    if len(completion) != 1:
        raise ValueError(
            f"a completion with {len(completion)} turns needs its prompt as messages, not text"
        )
    return completion[0]["content"]


class RewardScorer:
    """A saved reward model as a reward function: scores (prompt, completion) pairs.

    A prompt is either a conversation (a list of messages ending before the assistant's
    turn) or its text as the chat template renders it with the generation prompt (what the
    PPO stage passes; it must be the reward model's template). A completion is the answer's
    text or its messages. The instance is also a TRL reward function
    (`scorer(prompts=…, completions=…)`).
    """

    def __init__(self, folder: Path, device: str = "cpu", *, batch_size: int = 8) -> None:
        from transformers import AutoModelForSequenceClassification

        from kubetune.trainer.resolve import load_tokenizer

        self.__name__ = "reward_model"  # the name TRL logs the rewards under
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder))
        if self.model.config.num_labels != 1:
            raise TrainingSetupError(
                Reason.INVALID_SPEC,
                f"{folder} is not a reward model (it has {self.model.config.num_labels} "
                "outputs, a reward model has one); point the RLHF stage at the RewardModel "
                "stage's output",
            )
        self.model.to(device).eval()
        self.pad_token_id = int(
            self.model.config.pad_token_id
            if self.model.config.pad_token_id is not None
            else self.tokenizer.pad_token_id
        )
        self._frame: tuple[str, str] | None = None

    def encode(self, prompt: str | Messages, completion: str | Messages) -> list[int]:
        """Token ids of prompt + completion, as the model was trained on them."""
        if not isinstance(prompt, str):
            answer = (
                [{"role": "assistant", "content": completion}]
                if isinstance(completion, str)
                else list(completion)
            )
            return encode(self.tokenizer, [*prompt, *answer])
        if self._frame is None:
            self._frame = answer_frame(self.tokenizer)
        before, after = self._frame
        text = prompt + before + _completion_text(completion) + after
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def score(
        self,
        prompts: Sequence[str | Messages],
        completions: Sequence[str | Messages],
        batch_size: int | None = None,
    ) -> list[float]:
        """The reward of each completion to its prompt, in order."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        return score_ids(self.model, sequences, self.pad_token_id, batch_size or self.batch_size)

    def __call__(
        self,
        prompts: Sequence[str | Messages],
        completions: Sequence[str | Messages],
        **_: Any,
    ) -> list[float]:
        return self.score(prompts, completions)
