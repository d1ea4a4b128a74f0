"""Token counts of examples, as the trainer will see them.

Conversations are rendered with the model's chat template (ChatML when it has none) and
tokenized without adding special tokens again; raw text gets the end-of-sequence token the
trainer appends.
"""

from __future__ import annotations

from typing import Any


class TokenCounter:
    """Counts tokens with one tokenizer (loaded once per process)."""

    def __init__(self, tokenizer_dir: str, chat_template: str | None = None) -> None:
        from kubetune.trainer.resolve import load_tokenizer

        self.tokenizer_dir = tokenizer_dir
        self.chat_template = chat_template
        self.tokenizer = load_tokenizer(tokenizer_dir, chat_template=chat_template)

    def _render(self, messages: list[dict[str, str]]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return str(text)

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        """Tokens of a rendered conversation."""
        return self._length(self._render(messages))

    def count(self, example: dict[str, Any]) -> int:
        """Tokens of an example; for preference pairs, the longer of the two sequences."""
        if "text" in example:
            eos = 1 if self.tokenizer.eos_token_id is not None else 0
            return self._length(example["text"]) + eos
        if "chosen" in example:
            return self.details(example)["tokens"]
        return self.count_messages(example["messages"])

    def details(self, example: dict[str, Any]) -> dict[str, int]:
        """Token counts stored with a preference pair."""
        chosen = self.count_messages([*example["prompt"], *example["chosen"]])
        rejected = self.count_messages([*example["prompt"], *example["rejected"]])
        return {"tokens": max(chosen, rejected), "chosenTokens": chosen, "rejectedTokens": rejected}
