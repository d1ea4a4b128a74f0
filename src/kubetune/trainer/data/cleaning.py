"""Normalization, structural checks, quality filters and PII redaction of one example.

Pure functions on an example in the data contract; each filter says why it drops.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubetune.trainer.data.rows import RowError

_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Unicode NFC, Unix newlines, no trailing spaces on lines, at most one blank line in a
    row, no leading or trailing whitespace. Text that is not valid Unicode (a lone UTF-16
    surrogate, e.g. from a JSON "\\ud800" escape) is refused: no tokenizer can encode it."""
    if not text.isascii():
        _check_encodable(text)
    text = unicodedata.normalize("NFC", text)
    # Each step only when its pattern can occur (a substring test is much cheaper).
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(
            "invalid-unicode",
            f"lone UTF-16 surrogate {text[exc.start]!r} at character {exc.start}; fix the "
            "encoding of the source (surrogate pairs must be complete)",
        ) from None


def _normalize_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": normalize_text(m["content"])} for m in messages]


def normalize(example: dict[str, Any]) -> dict[str, Any]:
    """The example with every text normalized."""
    if "text" in example:
        return {"text": normalize_text(example["text"])}
    if "chosen" in example:
        return {key: _normalize_messages(example[key]) for key in ("prompt", "chosen", "rejected")}
    return {"messages": _normalize_messages(example["messages"])}


def _check_turns(messages: list[dict[str, str]], what: str) -> None:
    for index, message in enumerate(messages, start=1):
        if not message["content"]:
            raise RowError("empty-message", f"{what}turn {index} ({message['role']}) is empty")


def check_structure(example: dict[str, Any]) -> None:
    """Refuse examples a trainer cannot use (raises RowError with the reason)."""
    if "text" in example:
        if not example["text"]:
            raise RowError("empty-text", "the text is empty")
        return
    if "chosen" in example:
        for key in ("chosen", "rejected"):
            if not example[key]:
                raise RowError("empty-answer", f"{key} is empty")
            _check_turns(example[key], f"{key} ")
            if example[key][-1]["role"] != "assistant":
                raise RowError("no-assistant-answer", f"{key} must end with an assistant turn")
        _check_turns(example["prompt"], "prompt ")
        if example["chosen"] == example["rejected"]:
            raise RowError("identical-pair", "chosen and rejected are identical")
        return
    messages = example["messages"]
    _check_turns(messages, "")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise RowError("no-assistant-turn", "the conversation has no assistant turn")
    if roles[-1] != "assistant":
        raise RowError(
            "no-assistant-answer", "the conversation does not end with an assistant turn"
        )
    if "system" in roles[1:]:
        raise RowError("misplaced-system", "a system message is only allowed as the first turn")


def texts(example: dict[str, Any]) -> Iterator[str]:
    """Every text of an example, in order."""
    if "text" in example:
        yield example["text"]
        return
    for key in ("prompt", "chosen", "rejected", "messages"):
        for message in example.get(key, ()):
            yield message["content"]


def canonical_text(example: dict[str, Any]) -> str:
    """One string that identifies the example's content (for hashing and dedup)."""
    if "text" in example:
        return str(example["text"])
    parts = []
    for key in ("prompt", "chosen", "rejected", "messages"):
        for message in example.get(key, ()):
            parts.append(f"<{key}:{message['role']}>{message['content']}")
    return "\n".join(parts)


def non_printable_ratio(text: str) -> float:
    """Share of characters that are neither printable nor ordinary whitespace."""
    if not text:
        return 0.0
    if text.replace("\n", "").replace("\t", "").isprintable():
        return 0.0  # the common case, without a Python-level loop over the characters
    bad = sum(1 for c in text if not c.isprintable() and c not in "\n\t")
    return bad / len(text)


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for short texts)."""
    words = text.split()
    if len(words) < 4 * n:
        return 0.0
    count = len(words) - n + 1
    return 1.0 - len(set(zip(*(words[i:] for i in range(n)), strict=False))) / count


def turn_count(example: dict[str, Any]) -> int:
    """Number of user and assistant turns."""
    if "text" in example:
        return 1
    messages = example.get("messages") or [*example.get("prompt", []), *example.get("chosen", [])]
    return sum(1 for m in messages if m["role"] != "system")


@dataclass(frozen=True)
class Redaction:
    """What PII redaction replaced in one example."""

    emails: int = 0
    phones: int = 0
    secrets: int = 0

    @property
    def total(self) -> int:
        return self.emails + self.phones + self.secrets


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_PHONE = re.compile(r"(?<![\w+])\+?\d[\d ().-]{7,}\d(?!\w)")
_SECRET = re.compile(
    r"\b(?:AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|"
    r"xox[baprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,})\b"
)


def _digits(match: re.Match[str]) -> int:
    return sum(c.isdigit() for c in match.group())


def redact_text(text: str) -> tuple[str, Redaction]:
    """Replace e-mail addresses, phone numbers and API-key-like strings by placeholders."""
    text, emails = _EMAIL.subn("[EMAIL]", text)
    text, secrets = _SECRET.subn("[SECRET]", text)
    phones = 0

    def phone(match: re.Match[str]) -> str:
        nonlocal phones
        if 9 <= _digits(match) <= 15:
            phones += 1
            return "[PHONE]"
        return match.group()

    text = _PHONE.sub(phone, text)
    return text, Redaction(emails, phones, secrets)


def redact(example: dict[str, Any]) -> tuple[dict[str, Any], Redaction]:
    """The example with PII redacted in every text, and what was replaced."""
    total = Redaction()

    def one(text: str) -> str:
        nonlocal total
        new, found = redact_text(text)
        total = Redaction(
            total.emails + found.emails, total.phones + found.phones, total.secrets + found.secrets
        )
        return new

    if "text" in example:
        return {"text": one(example["text"])}, total
    out = {
        key: [{"role": m["role"], "content": one(m["content"])} for m in value]
        for key, value in example.items()
    }
    return out, total
