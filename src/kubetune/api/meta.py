"""Types shared by every kubetune kind: references, conditions, scheduling."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import Field, StrictInt, StrictStr

from kubetune.api.base import ApiModel, Quantity, ShortName


class SecretRef(ApiModel):
    """A Secret in the same namespace, read by the pod that needs it.

    The operator never copies its contents: the pod gets it as environment variables.
    """

    name: Annotated[StrictStr, Field(min_length=1, max_length=253)]
    """Name of the Secret."""


class SecretKeyRef(ApiModel):
    """One key of a Secret in the same namespace."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=253)]
    """Name of the Secret."""

    key: Annotated[StrictStr, Field(min_length=1, max_length=253)]
    """Key inside the Secret."""


class LocalObjectRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=253)]
    """Name of the object."""


class ConditionStatus(str, Enum):
    """Status of a condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """An observation of one aspect of the object's state (Kubernetes API conventions)."""

    type: Annotated[StrictStr, Field(max_length=316)]
    """Condition type, e.g. Succeeded, Trained, GatePassed, Ready."""

    status: ConditionStatus
    """True, False or Unknown."""

    observed_generation: Annotated[StrictInt, Field(ge=0)] | None = None
    """The metadata.generation the condition was computed from."""

    last_transition_time: Annotated[StrictStr, Field(max_length=64)]
    """When the status last changed (RFC 3339)."""

    reason: Annotated[
        StrictStr, Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    ]
    """CamelCase reason for the last transition, from the catalog in docs/api.md."""

    message: Annotated[StrictStr, Field(max_length=32768)] = ""
    """Human-readable details, including what to change when something failed."""


class TolerationOperator(str, Enum):
    """How a toleration matches a taint."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(str, Enum):
    """The taint effect a toleration matches."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A Kubernetes toleration, copied to the pods."""

    key: Annotated[StrictStr, Field(max_length=316)] | None = None
    """Taint key to match; empty with operator Exists matches every taint."""

    operator: TolerationOperator = TolerationOperator.EQUAL
    """Exists or Equal."""

    value: Annotated[StrictStr, Field(max_length=63)] | None = None
    """Taint value to match when the operator is Equal."""

    effect: TaintEffect | None = None
    """Taint effect to match; empty matches all effects."""

    toleration_seconds: StrictInt | None = None
    """How long a NoExecute taint is tolerated before eviction."""


NodeSelector = Annotated[
    dict[ShortName, Annotated[StrictStr, Field(max_length=63)]], Field(max_length=32)
]
Affinity = Annotated[
    dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
]


class StorageKind(str, Enum):
    """Where a pod's scratch or cache volume lives."""

    EMPTY_DIR = "EmptyDir"
    PVC = "PVC"


class VolumeSpec(ApiModel):
    """A scratch or cache volume: an emptyDir, a new PVC, or an existing claim."""

    type: StorageKind = StorageKind.EMPTY_DIR
    """EmptyDir (node-local, lost with the pod) or PVC (survives the pod)."""

    size: Quantity | None = None
    """Size limit of the emptyDir, or requested size of the PVC, e.g. "200Gi"."""

    storage_class_name: Annotated[StrictStr, Field(max_length=253)] | None = None
    """StorageClass of a PVC the operator creates."""

    claim_name: Annotated[StrictStr, Field(max_length=253)] | None = None
    """Use this existing PersistentVolumeClaim instead of creating one."""
