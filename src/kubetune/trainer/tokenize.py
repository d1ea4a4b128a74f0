"""Prepared examples → token ids and labels, with assistant-only loss masks.

The mask is computed from the chat template itself, by rendering the conversation
incrementally: for each assistant turn i, the text of `messages[:i]` with the generation
prompt ends where the answer starts, and the text of `messages[:i + 1]` ends where it
stops. Tokens whose characters fall inside those spans are trained (the answer and the
template's end-of-turn marker); everything else — system prompt, user turns, role headers
— gets label -100. This works for any template whose renders of a conversation's prefixes
are prefixes of the whole render, which the function checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render a conversation's prefixes as prefixes of the whole."""


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool
) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:index], generation_prompt=True)
        end_text = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise TemplateError(
                "the chat template renders a conversation's beginning differently from the "
                "whole conversation, so answer tokens cannot be located; set "
                "dataset.chatTemplate to a preset (ChatML or Alpaca)"
            )
        spans.append((len(start_text), len(end_text.rstrip("\n"))))
    return full, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> dict[str, list[int]]:
    """input_ids and labels (-100 outside assistant answers) of one conversation."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        inside = any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return {"input_ids": list(encoded["input_ids"]), "labels": labels}


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> dict[str, list[int]]:
    """input_ids and labels of raw text (every token trained), ending with EOS."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]
) -> dict[str, list[int]]:
    """One prepared example (data contract) for causal-LM training."""
    if "text" in example:
        return tokenize_text(tokenizer, example["text"])
    if "messages" in example:
        return tokenize_conversation(tokenizer, example["messages"])
    raise ValueError("preference pairs are trained by the preference stages, not SFT")


def tokenize_all(
    tokenizer: PreTrainedTokenizerBase, examples: Iterable[dict[str, Any]]
) -> Iterator[dict[str, list[int]]]:
    """Tokenize examples lazily, skipping none: every example has at least one label."""
    for example in examples:
        tokens = tokenize_example(tokenizer, example)
        if all(label == IGNORE_INDEX for label in tokens["labels"]):
            raise ValueError(f"example {example.get('id')} has no trained token")
        yield tokens
