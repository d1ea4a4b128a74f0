"""Token counts of examples, as the trainer will see them.

Conversations are rendered with the chosen chat template and tokenized without adding
special tokens again; raw text gets the end-of-sequence token the trainer appends. Counts
are computed a chunk at a time: one batched call into the Rust tokenizer per chunk.
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
        self._eos = 1 if self.tokenizer.eos_token_id is not None else 0

    def _render(self, messages: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False))

    def _texts(self, example: dict[str, Any]) -> list[str]:
        if "text" in example:
            return [example["text"]]
        if "chosen" in example:
            return [
                self._render([*example["prompt"], *example["chosen"]]),
                self._render([*example["prompt"], *example["rejected"]]),
            ]
        return [self._render(example["messages"])]

    def count_many(self, examples: list[dict[str, Any]]) -> list[dict[str, int]]:
        """Token counts for each example: {"tokens": n}, and for preference pairs also
        "chosenTokens" / "rejectedTokens" ("tokens" is the longer of the two)."""
        texts: list[str] = []
        spans: list[int] = []
        for example in examples:
            parts = self._texts(example)
            texts.extend(parts)
            spans.append(len(parts))
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = iter(len(ids) for ids in encoded)
        counts = []
        for example, span in zip(examples, spans, strict=True):
            if "text" in example:
                counts.append({"tokens": next(lengths) + self._eos})
            elif span == 2:
                chosen, rejected = next(lengths), next(lengths)
                counts.append(
                    {
                        "tokens": max(chosen, rejected),
                        "chosenTokens": chosen,
                        "rejectedTokens": rejected,
                    }
                )
            else:
                counts.append({"tokens": next(lengths)})
        return counts

    def count(self, example: dict[str, Any]) -> int:
        """Tokens of one example (for preference pairs, the longer sequence)."""
        return self.count_many([example])[0]["tokens"]
