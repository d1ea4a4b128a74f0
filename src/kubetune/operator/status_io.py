"""Reading a custom resource's status from the object and writing it back as a merge patch,
for both kinds (FineTuneJob, ModelDeployment): keys the status model does not know (another
controller's) are never read or touched, and nothing is written when nothing changed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

StatusT = TypeVar("StatusT", bound=BaseModel)


def status_keys(model: type[BaseModel]) -> frozenset[str]:
    """The wire names of a status model's fields."""
    return frozenset(info.alias or name for name, info in model.model_fields.items())


def load(model: type[StatusT], raw: Mapping[str, Any] | None) -> StatusT | None:
    """The status as stored on the object (unknown keys ignored); None when empty or
    unreadable."""
    if not raw:
        return None
    keys = status_keys(model)
    try:
        return model.model_validate({k: v for k, v in raw.items() if k in keys})
    except ValidationError:
        return None


def dump(status: BaseModel) -> dict[str, Any]:
    """The status as written to the API (camelCase, no nulls)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_diff(before, value)
        else:
            patch[key] = value
    return patch


def patch_for(
    previous: Mapping[str, Any] | None,
    new: BaseModel,
    ignore: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda status: status,
) -> dict[str, Any] | None:
    """The merge patch from the stored status to `new`, or None when they agree once
    `ignore` has removed what must not cause a write on its own."""
    keys = status_keys(type(new))
    before = {k: v for k, v in (previous or {}).items() if k in keys}
    after = dump(new)
    if ignore(before) == ignore(after):
        return None
    return merge_diff(before, after)
