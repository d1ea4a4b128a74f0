"""Normalization, structural checks, garbage measures and PII redaction."""

from __future__ import annotations

import pytest

from kubetune.trainer.data import cleaning
from kubetune.trainer.data.rows import RowError


def conv(*turns: tuple[str, str]) -> dict[str, object]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_normalize_text() -> None:
    text = "  Cafe\u0301 \r\nline  \n\n\n\nend\t "
    assert cleaning.normalize_text(text) == "Café\nline\n\nend"


@pytest.mark.parametrize(
    ("example", "reason"),
    [
        (conv(("user", "q")), "no-assistant-turn"),
        (conv(("user", "q"), ("assistant", "a"), ("user", "q2")), "no-assistant-answer"),
        (conv(("user", ""), ("assistant", "a")), "empty-message"),
        (conv(("user", "q"), ("system", "s"), ("assistant", "a")), "misplaced-system"),
        ({"text": ""}, "empty-text"),
        (
            {
                "prompt": [],
                "chosen": [{"role": "assistant", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "x"}],
            },
            "identical-pair",
        ),
    ],
    ids=["no-answer", "ends-with-user", "empty", "late-system", "empty-text", "identical-pair"],
)
def test_structure_checks(example: dict[str, object], reason: str) -> None:
    with pytest.raises(RowError) as info:
        cleaning.check_structure(example)
    assert info.value.reason == reason


def test_valid_conversation_passes() -> None:
    cleaning.check_structure(conv(("system", "s"), ("user", "q"), ("assistant", "a")))


def test_non_printable_ratio() -> None:
    assert cleaning.non_printable_ratio("abcd") == 0
    assert cleaning.non_printable_ratio("ab\x00\x01") == 0.5
    assert cleaning.non_printable_ratio("a\nb\tc") == 0


def test_repetition_ratio() -> None:
    assert (
        cleaning.repetition_ratio("one two three four five six seven eight nine ten eleven twelve")
        == 0
    )
    spam = " ".join(["buy now cheap"] * 10)
    assert cleaning.repetition_ratio(spam) > 0.8
    assert cleaning.repetition_ratio("short text") == 0


def test_turn_count_ignores_system() -> None:
    assert cleaning.turn_count(conv(("system", "s"), ("user", "q"), ("assistant", "a"))) == 2


def test_redaction_counts_each_kind() -> None:
    text = (
        "Mail jane.doe@example.com or call +1 (415) 555-0100. "
        "Key AKIAABCDEFGHIJKLMNOP and sk-abcdefghijklmnopqrstuvwx. Order 2024 has 3 items."
    )
    redacted, found = cleaning.redact_text(text)
    assert found == cleaning.Redaction(emails=1, phones=1, secrets=2)
    assert "[EMAIL]" in redacted
    assert "[PHONE]" in redacted
    assert redacted.count("[SECRET]") == 2
    assert "Order 2024 has 3 items." in redacted


def test_redact_example_keeps_roles() -> None:
    example, found = cleaning.redact(conv(("user", "mail a@b.io"), ("assistant", "ok")))
    assert found.emails == 1
    assert example == conv(("user", "mail [EMAIL]"), ("assistant", "ok"))


def test_canonical_text_separates_roles() -> None:
    a = cleaning.canonical_text(conv(("user", "x"), ("assistant", "y")))
    b = cleaning.canonical_text(conv(("user", "x y"), ("assistant", "")))
    assert a != b


TRICKY_TEXTS = [
    "plain ascii text without anything special",
    "  Cafe\u0301 \r\nline  \n\n\n\nend\t ",
    "a\r\rb\r\n\r\n\r\nc",
    "trailing tab\t\nand space \n \n\n\nblank lines",
    "ctrl \x00\x01\x02 chars\tand\ttabs\nand\u200b zero width \u2028 separators",
    "\n\t\n",
    " ".join(["spam eggs ham"] * 6),
    "",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_fast_paths_agree_with_the_definitions(text: str) -> None:
    # The substring pre-checks in the implementations must not change any result.
    import re
    import unicodedata

    expected = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    expected = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", expected)).strip()
    assert cleaning.normalize_text(text) == expected
    bad = sum(1 for c in text if not c.isprintable() and c not in "\n\t")
    assert cleaning.non_printable_ratio(text) == (bad / len(text) if text else 0.0)
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    repeated = 1.0 - len(set(grams)) / len(grams) if len(words) >= 12 else 0.0
    assert cleaning.repetition_ratio(text) == repeated
