"""Log-likelihood of multiple-choice answers, batched.

Each choice is placed as the assistant's answer after the prompt, rendered with the chat
template (`tokenize.assistant_spans`, as in training), and scored by the sum of the
log-probabilities of its tokens, including the template's end-of-turn marker. The prompt
shared by an item's choices is computed once: its key/value cache is reused for every
choice, which makes a suite of four short choices per question about three times cheaper
than scoring each prompt-plus-choice sequence whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kubetune.api.contract import Reason
from kubetune.trainer.evaluate import EvaluationError, is_prompt_learning
from kubetune.trainer.scoring.suite_rows import ChoiceItem, Messages
from kubetune.trainer.tokenize import TemplateError, assistant_spans

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Encoded = tuple[list[int], int]
"""Token ids of a prompt plus one choice, and the index of the choice's first token."""


def _choice_sequence(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, choice: str
) -> Encoded:
    """Token ids of the prompt plus one choice as the answer, and where the answer starts
    (ids end with the answer's last token: the template's end-of-turn marker)."""
    text, spans = assistant_spans(tokenizer, [*messages, {"role": "assistant", "content": choice}])
    start, end = spans[-1]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    return list(encoded["input_ids"][: inside[-1] + 1]), inside[0]


def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[ChoiceItem],
    batch_size: int,
) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens as the answer, per item and choice.

    The prompt an item's choices share is run once and its key/value cache reused for all
    of them. Items are grouped (by prompt length) so that a group has at most `batch_size`
    choices (a group holds at least one item): one pass runs the group's prompts, padded on
    the left with explicit positions, a second its choices, padded on the right. Prompt and
    prefix tuning bring their own virtual tokens or cache: for them every prompt-plus-choice
    sequence is scored whole (longest first, right-padded, `batch_size` at a time).
    """
    try:
        encoded = [
            [_choice_sequence(tokenizer, item.messages, c) for c in item.choices] for item in items
        ]
    except TemplateError as err:
        raise EvaluationError(Reason.INVALID_SPEC, f"suite: {err}") from err
    model.eval()
    pad = tokenizer.pad_token_id or 0
    if is_prompt_learning(model):
        return _whole_sequence_logprobs(model, encoded, batch_size, pad)
    shared = [_shared_length(sequences) for sequences in encoded]
    scores: list[list[float]] = [[] for _ in encoded]
    alone = [i for i, length in enumerate(shared) if length < 1]  # nothing shared: whole
    whole = _whole_sequence_logprobs(model, [encoded[i] for i in alone], batch_size, pad)
    for i, item_sums in zip(alone, whole, strict=True):
        scores[i] = item_sums
    order = sorted((i for i, length in enumerate(shared) if length >= 1), key=shared.__getitem__)
    for group in _groups(order, [len(e) for e in encoded], batch_size):
        group_sums = _shared_prompt_group(
            model, [encoded[i] for i in group], [shared[i] for i in group], pad
        )
        for i, item_sums in zip(group, group_sums, strict=True):
            scores[i] = item_sums
    return scores


def _shared_length(sequences: list[Encoded]) -> int:
    """How many leading tokens all choices of an item share before the first scored one."""
    shared = min(first for _, first in sequences)
    for position in range(shared):
        if len({ids[position] for ids, _ in sequences}) > 1:
            return position
    return shared


def _groups(order: list[int], sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive items of `order` with at most `batch_size` choices per group (or one item)."""
    groups: list[list[int]] = []
    current: list[int] = []
    count = 0
    for index in order:
        if current and count + sizes[index] > batch_size:
            groups.append(current)
            current, count = [], 0
        current.append(index)
        count += sizes[index]
    if current:
        groups.append(current)
    return groups


def _scored_sums(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(targets[b, t]) under logits[b, t] where scored[b, t]."""
    import torch

    picked = logits[scored].float().log_softmax(dim=-1)
    token_lp = picked.gather(1, targets[scored].unsqueeze(1)).squeeze(1)
    rows = torch.arange(len(logits), device=logits.device).unsqueeze(1).expand_as(scored)[scored]
    return torch.zeros(len(logits), device=logits.device).index_add_(0, rows, token_lp)


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to the longest row, and the attention mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _shared_prompt_group(
    model: PreTrainedModel, items: list[list[Encoded]], shared: list[int], pad: int
) -> list[list[float]]:
    """Choice sums of a few items: their shared prompts in one pass, all choices in another."""
    import torch

    device = next(model.parameters()).device
    prompts = [sequences[0][0][:length] for sequences, length in zip(items, shared, strict=True)]
    width = max(shared)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
    owner = torch.tensor([i for i, seqs in enumerate(items) for _ in seqs], device=device)
    flat = [
        (seq, first, length)
        for seqs, length in zip(items, shared, strict=True)
        for seq, first in seqs
    ]
    rest, rest_mask = _right_padded([seq[length:] for seq, _, length in flat], pad)
    rest, rest_mask = rest.to(device), rest_mask.to(device)
    cache = out.past_key_values
    cache.batch_select_indices(owner)  # one copy of an item's prompt cache per choice
    steps = torch.arange(rest.shape[1], device=device)
    with torch.no_grad():
        logits = model(
            input_ids=rest,
            attention_mask=torch.cat([mask[owner], rest_mask], dim=1),
            position_ids=torch.tensor(shared, device=device)[owner].unsqueeze(1) + steps,
            past_key_values=cache,
        ).logits
    # The prompt's last logits predict each choice's first token after the shared part.
    sources = torch.cat([out.logits[owner, -1:], logits[:, :-1]], dim=1)
    scored = torch.tensor(
        [
            [length + j >= first and j < len(seq) - length for j in range(rest.shape[1])]
            for seq, first, length in flat
        ],
        device=device,
    )
    sums = iter(_scored_sums(sources, rest, scored).tolist())
    return [[next(sums) for _ in seqs] for seqs in items]


def _whole_sequence_logprobs(
    model: PreTrainedModel, encoded: list[list[Encoded]], batch_size: int, pad: int
) -> list[list[float]]:
    """Every prompt-plus-choice sequence scored whole, longest first, right-padded."""
    import torch

    device = next(model.parameters()).device
    flat = [(i, c, *seq) for i, seqs in enumerate(encoded) for c, seq in enumerate(seqs)]
    flat.sort(key=lambda s: len(s[2]), reverse=True)
    scores = [[0.0] * len(seqs) for seqs in encoded]
    for offset in range(0, len(flat), batch_size):
        batch = flat[offset : offset + batch_size]
        ids, mask = _right_padded([s[2] for s in batch], pad)
        scored = torch.tensor(
            [[s[3] <= t < len(s[2]) for t in range(ids.shape[1])] for s in batch], device=device
        )
        ids = ids.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.to(device)).logits
        logits = logits[:, logits.shape[1] - ids.shape[1] :]  # drop prompt-tuning virtual tokens
        sums = _scored_sums(logits[:, :-1], ids[:, 1:], scored[:, 1:])
        for (item, choice, *_), value in zip(batch, sums.tolist(), strict=True):
            scores[item][choice] = value
    return scores
