"""The parts of Kubernetes object metadata that kubetune reads."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, StrictStr

from kubetune.api.base import ApiModel

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ObjectMeta(ApiModel):
    """Standard object metadata; fields kubetune does not read are kept as they are."""

    model_config = ConfigDict(extra="allow")

    name: (
        Annotated[StrictStr, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)] | None
    ) = None
    """Name of the object, unique in its namespace."""

    namespace: Annotated[StrictStr, Field(max_length=63)] | None = None
    """Namespace of the object (local runs use "local" when unset)."""

    labels: dict[str, str] | None = None
    """Labels, copied to the children the operator creates."""

    annotations: dict[str, Any] | None = None
    """Annotations."""
