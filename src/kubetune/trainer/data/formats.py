"""Raw row shapes → the data contract (DESIGN §8).

Conversational rows become `{"messages": [{"role", "content"}, …]}`, preference rows
`{"prompt": [...], "chosen": [...], "rejected": [...]}` (lists of messages), raw text
`{"text": ...}`. Detection looks at the columns of the first rows and says why it chose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1.dataset import ColumnMapping, DataFormat
from kubetune.trainer.data.rows import RawRow, RowError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
Messages = list[dict[str, str]]

PREFERENCE = "preference"
CONVERSATION = "conversation"
TEXT = "text"


def family(fmt: DataFormat) -> str:
    """What a format becomes: conversation, preference or text."""
    if fmt == DataFormat.PREFERENCE:
        return PREFERENCE
    if fmt == DataFormat.TEXT:
        return TEXT
    return CONVERSATION


@dataclass(frozen=True)
class Columns:
    """Resolved column names (the user's mapping over the usual defaults)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str | None = None
    chosen: str = "chosen"
    rejected: str = "rejected"
    text: str = "text"
    system: str | None = "system"
    role_key: str | None = None
    content_key: str | None = None

    @classmethod
    def from_spec(cls, mapping: ColumnMapping | None) -> Columns:
        if mapping is None:
            return cls()
        given = {k: v for k, v in mapping.model_dump().items() if v is not None}
        return cls(**given)


def detect(rows: Iterable[RawRow], columns: Columns) -> tuple[DataFormat, str]:
    """Guess the format from the first rows; returns it and the reason shown to the user."""
    keys: set[str] = set()
    texts = 0
    sample = 0
    for row in rows:
        sample += 1
        if isinstance(row.data, str):
            texts += 1
        elif isinstance(row.data, Mapping):
            keys |= set(row.data)
    if sample and texts == sample:
        return DataFormat.TEXT, "plain text file (one example per blank-line-separated block)"
    conv_key = columns.messages or next(
        (k for k in ("messages", "conversations", "conversation") if k in keys), None
    )
    if columns.chosen in keys and columns.rejected in keys:
        return DataFormat.PREFERENCE, f"columns {columns.chosen!r} and {columns.rejected!r}"
    if conv_key and conv_key in keys:
        if conv_key == "conversations" or columns.role_key == "from":
            return DataFormat.SHARE_GPT, f"column {conv_key!r} holds a conversation"
        return DataFormat.MESSAGES, f"column {conv_key!r} holds a conversation"
    if columns.instruction in keys and columns.output in keys:
        return DataFormat.ALPACA, f"columns {columns.instruction!r} and {columns.output!r}"
    if columns.prompt in keys and columns.completion in keys:
        return (
            DataFormat.PROMPT_COMPLETION,
            f"columns {columns.prompt!r} and {columns.completion!r}",
        )
    if columns.text in keys:
        return DataFormat.TEXT, f"column {columns.text!r}"
    found = ", ".join(sorted(keys)[:12]) or "none"
    raise RowError(
        "undetectable-format",
        f"cannot tell the format from the columns ({found}); set dataset.format and, if the "
        "names differ from the usual ones, dataset.columns",
    )


def _field(data: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    if key not in data or data[key] is None:
        if required:
            raise RowError("missing-column", f"missing column {key!r}")
        return ""
    value = data[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RowError("wrong-type", f"column {key!r} must be text, got {type(value).__name__}")
    return value


def _turns(value: Any, role_key: str | None, content_key: str | None, sharegpt: bool) -> Messages:
    if not isinstance(value, list):
        raise RowError("wrong-type", "a conversation must be a list of turns")
    role_key = role_key or ("from" if sharegpt else "role")
    content_key = content_key or ("value" if sharegpt else "content")
    messages: Messages = []
    for index, turn in enumerate(value, start=1):
        if not isinstance(turn, Mapping):
            raise RowError("wrong-type", f"turn {index} is not an object")
        if role_key not in turn and sharegpt is False and "from" in turn:
            role_key, content_key = "from", "value"
        role = turn.get(role_key)
        content = turn.get(content_key)
        if not isinstance(role, str):
            raise RowError("missing-role", f"turn {index} has no {role_key!r}")
        mapped = SHAREGPT_ROLES.get(role.lower()) if sharegpt or role not in ROLES else role
        if mapped not in ROLES:
            raise RowError("unknown-role", f"turn {index} has unknown role {role!r}")
        if not isinstance(content, str):
            raise RowError("wrong-type", f"turn {index} has no text {content_key!r}")
        messages.append({"role": mapped, "content": content})
    return messages


def _as_messages(value: Any, default_role: str, columns: Columns) -> Messages:
    """A preference field: plain text (one turn) or a list of turns."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return _turns(value, columns.role_key, columns.content_key, sharegpt=False)


def convert(
    row: RawRow, fmt: DataFormat, columns: Columns, system_prompt: str | None
) -> dict[str, Any]:
    """One raw row in the data contract (without id and token counts)."""
    data = row.data
    if fmt == DataFormat.TEXT:
        if isinstance(data, str):
            return {"text": data}
        if not isinstance(data, Mapping):
            raise RowError("not-an-object", "row is not an object")
        return {"text": _field(data, columns.text)}
    if not isinstance(data, Mapping):
        raise RowError("not-an-object", "row is not an object")
    system = _field(data, columns.system, required=False) if columns.system else ""
    system = system or (system_prompt or "")
    if fmt == DataFormat.PREFERENCE:
        prompt_value = data.get(columns.prompt, "")
        prompt = _as_messages(prompt_value, "user", columns) if prompt_value else []
        for key in (columns.chosen, columns.rejected):
            if data.get(key) is None:
                raise RowError("missing-column", f"missing column {key!r} of a preference pair")
        chosen = _as_messages(data[columns.chosen], "assistant", columns)
        rejected = _as_messages(data[columns.rejected], "assistant", columns)
        if system and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}, *prompt]
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == DataFormat.ALPACA:
        instruction = _field(data, columns.instruction)
        extra = _field(data, columns.input, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _field(data, columns.output)},
        ]
    elif fmt == DataFormat.PROMPT_COMPLETION:
        messages = [
            {"role": "user", "content": _field(data, columns.prompt)},
            {"role": "assistant", "content": _field(data, columns.completion)},
        ]
    else:
        key = columns.messages or next(
            (k for k in ("messages", "conversations", "conversation") if k in data), "messages"
        )
        if key not in data:
            raise RowError("missing-column", f"missing column {key!r}")
        messages = _turns(
            data[key],
            columns.role_key,
            columns.content_key,
            sharegpt=fmt == DataFormat.SHARE_GPT,
        )
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return {"messages": messages}
