"""Base model, shared field types and cross-field rules for the kubetune API.

Every API object derives from `ApiModel`: camelCase on the wire, unknown fields refused,
attribute docstrings become schema descriptions (and so `kubectl explain` text).

Cross-field rules are declared once as `Rule`s: the CEL expression goes into the CRD as
`x-kubernetes-validations` (so the API server refuses a bad spec at `kubectl apply`), and
the Python mirror runs when pydantic validates, with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

# Numbers that are not integers travel as strings (Kubernetes API conventions: no floats in
# specs). The patterns are checked by the API server; code parses them with `parse_decimal`.
DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
SIGNED_DECIMAL_PATTERN = r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
FRACTION_PATTERN = r"^(0(\.[0-9]+)?|1(\.0+)?|\.[0-9]+)$"
# Kubernetes resource.Quantity, as in the built-in schemas.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
URI_MAX_LENGTH = 2048

Decimal = Annotated[StrictStr, Field(pattern=DECIMAL_PATTERN, max_length=32)]
"""A non-negative decimal number written as a string, e.g. "2e-4" or "0.05"."""

SignedDecimal = Annotated[StrictStr, Field(pattern=SIGNED_DECIMAL_PATTERN, max_length=32)]
"""A decimal number, possibly negative, written as a string."""

Fraction = Annotated[StrictStr, Field(pattern=FRACTION_PATTERN, max_length=32)]
"""A number between 0 and 1 written as a string, e.g. "0.1"."""

Quantity = Annotated[
    StrictInt | StrictStr,
    Field(
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN},
    ),
]
"""A Kubernetes quantity such as "16Gi", "500m" or 4."""

ShortName = Annotated[StrictStr, Field(max_length=253)]
Name63 = Annotated[StrictStr, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]
Uri = Annotated[StrictStr, Field(min_length=1, max_length=URI_MAX_LENGTH)]
Text = Annotated[StrictStr, Field(max_length=65536)]


def parse_decimal(value: str) -> float:
    """Parse a decimal string from the API into a float."""
    return float(value)


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, enforced by the API server (CEL) and by pydantic (Python).

    Attributes:
        cel: standard CEL (no Kubernetes extension functions) evaluated with `self` bound
            to the object the rule is attached to.
        message: what the user sees, the same from the API server and from pydantic.
        check: the Python mirror of `cel`; gets the validated model, returns True if valid.
        field_path: where the API server reports the error, relative to the object
            (e.g. ".lora"); empty for the object itself.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str = ""

    def to_crd(self) -> dict[str, str]:
        rule = {"rule": self.cel, "message": self.message}
        if self.field_path:
            rule["fieldPath"] = self.field_path
        return rule


class ApiModel(BaseModel):
    """Base of every API object."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if "rules" in cls.__dict__ and cls.rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.to_crd() for rule in cls.rules]
        return schema

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise PydanticCustomError("rule", rule.message)
        return self
