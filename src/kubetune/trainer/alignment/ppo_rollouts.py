"""Rollouts for PPO: sampling completions and scoring their tokens under a model.

A batch of rollouts is laid out as one tensor per field: the left-padded prompt followed
by the sampled response. Left padding lets every prompt end at the same column, so the
response tokens of all rows line up and `[:, -length:]` selects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Rollouts:
    """A batch of prompts with their sampled completions, ready for forward passes."""

    input_ids: Tensor
    """Left-padded prompt then response, [batch, prompt + response tokens]."""

    attention_mask: Tensor
    """0 on the prompt's left padding."""

    position_ids: Tensor
    """Positions that skip the left padding, as generation used them."""

    response: Tensor
    """The sampled tokens, [batch, response tokens]."""

    mask: Tensor
    """1 on response tokens up to and including the first EOS, 0 after."""

    def select(self, rows: Tensor) -> Rollouts:
        return Rollouts(*(getattr(self, f.name)[rows] for f in fields(self)))


def response_mask(response: Tensor, eos_ids: list[int]) -> Tensor:
    """1 up to and including each row's first EOS, 0 after it."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device)).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """The chat-template text of a conversation, ending where the assistant's turn starts."""
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def eos_token_ids(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS and the model's (chat models often end turns with their own)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(policy.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def sample_rollouts(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
) -> Rollouts:
    """Generate one completion per prompt with sampling (top-k off)."""
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    encoded = tokenizer(
        prompt_texts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,  # the chat template already holds them
    ).to(device)
    # A fresh config: a model's own generation defaults (top_k, repetition penalty, …)
    # would sample from a distribution other than the one PPO computes log-probs for.
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0],
    )
    policy.eval()
    with torch.no_grad():
        output = cast(Any, policy).generate(**encoded, generation_config=config)
    response = output[:, encoded["input_ids"].shape[1] :]
    # Tokens after EOS are attended as generation attended them; they are masked out of
    # every loss, and causal attention keeps them from touching the tokens before them.
    attention = torch.cat([encoded["attention_mask"], torch.ones_like(response)], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Rollouts(output, attention, positions, response, response_mask(response, eos_ids))


def completion_texts(tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts) -> list[str]:
    """Each response up to and including its EOS, decoded without special tokens."""
    return list(
        tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(rollouts.response, rollouts.mask, strict=True)],
            skip_special_tokens=True,
        )
    )


def response_logprobs(
    model: PreTrainedModel,
    rollouts: Rollouts,
    temperature: float,
    value_head: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the response tokens under `model` (and the values, when a
    value head is given), each [batch, response tokens].

    Logits are divided by the sampling temperature: the policy PPO optimizes is the one
    that sampled the rollouts.
    """
    length = rollouts.response.shape[1]
    output = model(
        input_ids=rollouts.input_ids,
        attention_mask=rollouts.attention_mask,
        position_ids=rollouts.position_ids,
        output_hidden_states=value_head is not None,
        use_cache=False,
        logits_to_keep=length + 1,
    )
    # The logits at position i predict token i + 1.
    logits = output.logits[:, -length - 1 : -1].float() / temperature
    chosen = logits.gather(-1, rollouts.response.unsqueeze(-1)).squeeze(-1)
    logprobs = chosen - torch.logsumexp(logits, dim=-1)
    if value_head is None:
        return logprobs, None
    return logprobs, value_head(output.hidden_states[-1][:, -length - 1 : -1])


def reference_logprobs(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    rollouts: Rollouts,
    temperature: float,
    reference_adapter: str | None = None,
) -> Tensor:
    """Log-probabilities under the reference: the separate `reference` model when given;
    else the policy with its frozen `reference_adapter` active (e.g. a copy of the adapter
    as the stage began); else the policy with its PEFT adapter disabled (the base)."""
    with torch.no_grad():
        if reference is not None:
            return response_logprobs(reference, rollouts, temperature)[0]
        peft_model = cast(Any, policy)
        if reference_adapter is None:
            with peft_model.disable_adapter():
                return response_logprobs(policy, rollouts, temperature)[0]
        active = peft_model.active_adapter
        peft_model.set_adapter(reference_adapter)
        try:
            return response_logprobs(policy, rollouts, temperature)[0]
        finally:
            peft_model.set_adapter(active)
