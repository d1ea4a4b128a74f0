"""Token counts of examples, as the trainer will see them.

Conversations are rendered with the chosen chat template and tokenized without adding
special tokens again; raw text gets the end-of-sequence token the trainer appends. Counts
are computed a chunk at a time: one chat-template call and one batched call into the Rust
tokenizer per chunk.
"""

from __future__ import annotations

from typing import Any


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast tokenizer when calling it directly gives
    the same ids as `tokenizer(texts, add_special_tokens=False)`, else None.

    transformers' `TokenizersBackend` turns off the backend's truncation and padding and
    sets its `encode_special_tokens` before each call, then calls `encode_batch`; doing the
    same once and calling `encode_batch_fast` (no character offsets) skips the Python-side
    conversion of every encoding. Tokenizer classes that override the call path keep it.
    """
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or cls.__call__ is not PreTrainedTokenizerBase.__call__
        or cls._encode_plus is not TokenizersBackend._encode_plus
        or hasattr(tokenizer, "_switch_to_input_mode")
    ):
        return None
    backend = tokenizer.backend_tokenizer
    if not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return backend


class TokenCounter:
    """Counts tokens with one tokenizer (loaded once per process)."""

    def __init__(self, tokenizer_dir: str, chat_template: str | None = None) -> None:
        from kubetune.trainer.resolve import load_tokenizer

        self.tokenizer_dir = tokenizer_dir
        self.chat_template = chat_template
        self.tokenizer = load_tokenizer(tokenizer_dir, chat_template=chat_template)
        self._eos = 1 if self.tokenizer.eos_token_id is not None else 0
        self._rust = _rust_tokenizer(self.tokenizer)

    def _render_many(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        if not conversations:
            return []
        return [str(t) for t in self.tokenizer.apply_chat_template(conversations, tokenize=False)]

    def _lengths(self, texts: list[str]) -> list[int]:
        if self._rust is not None:
            return [len(e) for e in self._rust.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count_many(self, examples: list[dict[str, Any]]) -> list[dict[str, int]]:
        """Token counts for each example: {"tokens": n}, and for preference pairs also
        "chosenTokens" / "rejectedTokens" ("tokens" is the longer of the two)."""
        texts: list[str | None] = []
        conversations: list[list[dict[str, str]]] = []
        for example in examples:
            if "text" in example:
                texts.append(example["text"])
            elif "chosen" in example:
                conversations.append([*example["prompt"], *example["chosen"]])
                conversations.append([*example["prompt"], *example["rejected"]])
                texts.extend((None, None))
            else:
                conversations.append(example["messages"])
                texts.append(None)
        if not texts:
            return []
        rendered = iter(self._render_many(conversations))
        lengths = iter(self._lengths([t if t is not None else next(rendered) for t in texts]))
        counts = []
        for example in examples:
            if "text" in example:
                counts.append({"tokens": next(lengths) + self._eos})
            elif "chosen" in example:
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
