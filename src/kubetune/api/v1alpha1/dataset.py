"""Dataset settings of a FineTuneJob: sources, formats, filters, split (owned by the data stage)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel, Fraction, Rule, Text, Uri
from kubetune.api.meta import SecretRef
from kubetune.api.uris import DATASET_URI, DATASET_URI_HELP, matches

ColumnName = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class DataFormat(str, Enum):
    """Shape of the raw rows; Auto detects it from the columns and prints why."""

    AUTO = "Auto"
    ALPACA = "Alpaca"
    SHARE_GPT = "ShareGPT"
    MESSAGES = "Messages"
    PROMPT_COMPLETION = "PromptCompletion"
    PREFERENCE = "Preference"
    TEXT = "Text"


class DedupMode(str, Enum):
    """How duplicate examples are removed (before the split, so none straddle it)."""

    NONE = "None"
    EXACT = "Exact"
    NEAR = "Near"


class PIIRedaction(str, Enum):
    """Whether e-mail addresses, phone numbers and key-like strings are redacted."""

    NONE = "None"
    REDACT = "Redact"


class InvalidRowPolicy(str, Enum):
    """What happens to a row that cannot be parsed or mapped."""

    SKIP = "Skip"
    FAIL = "Fail"


class ChatTemplatePreset(str, Enum):
    """Which chat template renders conversations."""

    MODEL = "Model"
    CHATML = "ChatML"
    ALPACA = "Alpaca"


class ColumnMapping(ApiModel):
    """Maps the raw columns onto the chosen format's fields; unset means the usual names."""

    instruction: ColumnName | None = None
    """Alpaca instruction column (default "instruction")."""

    input: ColumnName | None = None
    """Alpaca input column (default "input")."""

    output: ColumnName | None = None
    """Alpaca output column (default "output")."""

    prompt: ColumnName | None = None
    """Prompt column for PromptCompletion and Preference (default "prompt")."""

    completion: ColumnName | None = None
    """Completion column for PromptCompletion (default "completion")."""

    messages: ColumnName | None = None
    """Conversation column for Messages / ShareGPT (default "messages" or "conversations")."""

    chosen: ColumnName | None = None
    """Preferred answer column for Preference (default "chosen")."""

    rejected: ColumnName | None = None
    """Rejected answer column for Preference (default "rejected")."""

    text: ColumnName | None = None
    """Raw text column for Text (default "text")."""

    system: ColumnName | None = None
    """Per-row system prompt column, if any."""

    role_key: ColumnName | None = None
    """Key holding the speaker inside each turn (default "role", ShareGPT "from")."""

    content_key: ColumnName | None = None
    """Key holding the text inside each turn (default "content", ShareGPT "value")."""


class ValidationSplit(ApiModel):
    """How the validation set is made: a fraction, a count, or a separate source."""

    rules = (
        Rule(
            cel="(has(self.fraction) ? 1 : 0) + (has(self.count) ? 1 : 0) "
            "+ (has(self.uri) ? 1 : 0) <= 1",
            message="set at most one of fraction, count and uri",
            check=lambda v: sum(x is not None for x in (v.fraction, v.count, v.uri)) <= 1,
        ),
    )

    fraction: Fraction | None = None
    """Fraction of the cleaned rows held out, e.g. "0.05" (the default when nothing is set)."""

    count: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    """Number of cleaned rows held out."""

    uri: Uri | None = None
    """A separate validation source, in the same format as the training data."""

    seed: Annotated[StrictInt, Field(ge=0)] = 42
    """Seed of the deterministic split: the same seed gives byte-identical files."""


class DataFilters(ApiModel):
    """Quality filters, applied in the documented order (docs/data.md); every drop is counted."""

    rules = (
        Rule(
            cel="!has(self.minTokens) || !has(self.maxTokens) || self.minTokens <= self.maxTokens",
            message="minTokens must not exceed maxTokens",
            check=lambda f: (
                f.min_tokens is None or f.max_tokens is None or f.min_tokens <= f.max_tokens
            ),
        ),
    )

    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    """Drop examples with fewer tokens than this."""

    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """Drop examples with more tokens than this (default: training.maxSeqLength)."""

    dedup: DedupMode = DedupMode.EXACT
    """None, Exact (hash of the normalized text) or Near (MinHash over word 5-grams)."""

    near_dedup_threshold: Fraction = "0.85"
    """Jaccard similarity above which two examples are near-duplicates."""

    max_non_printable_ratio: Fraction = "0.1"
    """Drop examples whose share of non-printable characters exceeds this."""

    max_repetition_ratio: Fraction = "0.5"
    """Drop examples whose share of repeated word 3-grams exceeds this."""

    max_turns: Annotated[StrictInt, Field(ge=1)] | None = None
    """Drop conversations with more turns than this."""

    pii_redaction: PIIRedaction = PIIRedaction.NONE
    """Redact e-mail addresses, phone numbers and key-like strings (counted in the report)."""


class ChatTemplate(ApiModel):
    """The chat template used to render conversations into tokens."""

    rules = (
        Rule(
            cel="!has(self.jinja) || self.preset == 'Model'",
            message="set preset or jinja, not both",
            check=lambda c: c.jinja is None or c.preset == ChatTemplatePreset.MODEL,
        ),
    )

    preset: ChatTemplatePreset = ChatTemplatePreset.MODEL
    """Model (the tokenizer's own template; ChatML if it has none), ChatML or Alpaca."""

    jinja: Text | None = None
    """A Jinja chat template, used instead of the preset."""


_URI_RULES: tuple[Rule, ...] = (
    Rule(
        cel="has(self.uri) != has(self.uris)",
        message="set exactly one of uri and uris",
        check=lambda d: (d.uri is None) != (d.uris is None),
    ),
    Rule(
        cel="!has(self.uri) || self.uri.matches('" + DATASET_URI + "')",
        message=f"must be {DATASET_URI_HELP}",
        check=lambda d: d.uri is None or matches(DATASET_URI, d.uri),
        field_path=".uri",
    ),
    Rule(
        cel="!has(self.uris) || self.uris.all(u, u.matches('" + DATASET_URI + "'))",
        message=f"every entry must be {DATASET_URI_HELP}",
        check=lambda d: d.uris is None or all(matches(DATASET_URI, u) for u in d.uris),
        field_path=".uris",
    ),
)


class DatasetSpec(ApiModel):
    """Where the raw data is and how to turn it into training examples."""

    rules = _URI_RULES

    uri: Uri | None = None
    """The raw data: a file, a directory, or a glob (JSONL, JSON, CSV, Parquet, plain text)."""

    uris: Annotated[list[Uri], Field(min_length=1, max_length=32)] | None = None
    """Several raw sources, concatenated in order."""

    revision: Annotated[StrictStr, Field(max_length=256)] | None = None
    """Revision of an hf:// dataset (branch, tag or commit)."""

    credentials_secret_ref: SecretRef | None = None
    """Secret with credentials for the source (AWS_* keys for s3://, HF_TOKEN for hf://)."""

    format: DataFormat = DataFormat.AUTO
    """Shape of the raw rows; Auto detects it and says why."""

    columns: ColumnMapping | None = None
    """Column names, when the raw data does not use the usual ones."""

    system_prompt: Text | None = None
    """A system prompt added to every conversation that has none."""

    validation: ValidationSplit | None = None
    """How the validation set is made (default: 5 % of the cleaned rows, seed 42)."""

    filters: DataFilters | None = None
    """Quality filters and deduplication (default: exact dedup only)."""

    on_invalid: InvalidRowPolicy = InvalidRowPolicy.SKIP
    """Skip (count and report) or Fail on a row that cannot be parsed or mapped."""

    max_invalid_fraction: Fraction = "0.01"
    """With Skip, fail the stage when more than this fraction of rows is invalid."""

    max_examples: Annotated[StrictInt, Field(ge=1)] | None = None
    """Use at most this many cleaned examples (after filters, before the split)."""

    chat_template: ChatTemplate | None = None
    """Chat template override (default: the model's own)."""
