"""Run identity and the layout of a run's artifacts (DESIGN §5 and §8).

A run lives at `<output root>/<namespace>/<job name>/<run id>/`; that folder (or S3 prefix)
is the RUN_URI that `kubetune report`, `kubetune fetch` and ModelDeployments use. The run
id is the first 12 hex characters of the sha256 of the canonical training-relevant spec, so
the same spec resumes the same run and a changed hyperparameter starts a new one.

Imported by the operator: no boto3, no torch, no Kubernetes client.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import types
import typing
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from kubetune.storage.errors import InvalidKey
from kubetune.storage.store import validate_key

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RUN_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SCHEME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RUN_ID_LENGTH = 12
STEP_DIGITS = 6
CHECKPOINT_RE = re.compile(r"^step-([0-9]{6,})$")

TRAINING_FIELDS = (
    "model",
    "dataset",
    "method",
    "lora",
    "qlora",
    "prefixTuning",
    "promptTuning",
    "stages",
    "alignment",
    "training",
    "distributed",
    "evaluation",
    "export",
)
"""Spec fields (wire names) whose values shape the artifacts; the others (output,
resources, tracking, suspend, queueName, activeDeadlineSeconds, backoffLimit,
ttlSecondsAfterFinished) change how or where a run executes, not what it produces."""

OPERATIONAL_KEYS = frozenset({"credentialsSecretRef", "apiKeySecretRef"})
"""Keys dropped wherever they appear: rotating a Secret must not retrain."""

OPERATIONAL_PATHS = (
    ("training", "checkpoint"),
    ("training", "logEverySteps"),
    ("evaluation", "judge", "maxRetries"),
    ("evaluation", "judge", "timeoutSeconds"),
    ("evaluation", "judge", "maxConcurrency"),
)
"""Fields inside training-relevant sections that change cadence, retention or retries but
not a single weight or score."""

_CANONICAL_VERSION = "kubetune.run-id/v1"
"""Salt of the hash: bump it when the canonical form changes meaning."""


def _check(pattern: re.Pattern[str], value: str, what: str, max_length: int) -> str:
    if not isinstance(value, str) or len(value) > max_length or not pattern.match(value):
        allowed = "'-' and '.'" if pattern is DNS_SUBDOMAIN else "'-'"
        raise InvalidKey(
            f"invalid {what} {value!r}: use at most {max_length} lowercase letters, digits "
            f"and {allowed}, starting and ending with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class RunLayout:
    """Where one run's artifacts live.

    Keys returned by the helpers are relative to the run root (`data/train.jsonl`);
    `key()` turns them into keys of a store opened at `output_uri`
    (`open_store(layout.output_uri)`).

    Attributes:
        output_uri: the artifact store root (`spec.output.uri` or `--output`).
        namespace: the FineTuneJob's namespace (`local` for local runs); a DNS label.
        job_name: the FineTuneJob's name; a DNS subdomain.
        run_id: the run id (`run_id_for(spec)`, or `new_run_id()` for `--new-run`).
    """

    output_uri: str
    namespace: str
    job_name: str
    run_id: str
    checkpoints_dir: str = "checkpoints/"
    """Run-relative folder of the checkpoints; later stages of a chain use
    `checkpoints/<stage>/` (see `for_stage`)."""

    DATA_TRAIN = "data/train.jsonl"
    DATA_VAL = "data/val.jsonl"
    DATA_REPORT = "data/report.json"
    CHECKPOINTS = "checkpoints/"
    ADAPTER = "adapter/"
    MERGED = "merged/"
    QUANTIZED = "quantized/"
    EVAL_METRICS = "eval/metrics.json"
    EVAL_SAMPLES = "eval/samples.jsonl"
    EVAL_REPORT = "eval/report.html"
    MANIFEST = "manifest.json"

    def __post_init__(self) -> None:
        if not self.output_uri:
            raise InvalidKey("the output URI is empty: set spec.output.uri or --output")
        _check(DNS_LABEL, self.namespace, "namespace", 63)
        _check(DNS_SUBDOMAIN, self.job_name, "job name", 253)
        _check(RUN_ID, self.run_id, "run id", 63)
        if not self.checkpoints_dir.startswith(
            self.CHECKPOINTS
        ) or not self.checkpoints_dir.endswith("/"):
            raise InvalidKey(
                f"checkpoints_dir must be a folder under checkpoints/: {self.checkpoints_dir!r}"
            )

    @property
    def prefix(self) -> str:
        """The run root as a folder key of the output store: `<ns>/<job>/<run-id>/`."""
        return f"{self.namespace}/{self.job_name}/{self.run_id}/"

    @property
    def run_uri(self) -> str:
        """`<output root>/<namespace>/<job>/<run-id>` (the RUN_URI)."""
        return f"{self.output_uri.rstrip('/')}/{self.prefix.rstrip('/')}"

    def key(self, relative: str) -> str:
        """The output-store key of a run-relative key (a trailing "/" is kept)."""
        validate_key(relative[:-1] if relative.endswith("/") else relative)
        return self.prefix + relative

    def relative(self, key: str) -> str:
        """The run-relative form of an output-store key under this run."""
        if not key.startswith(self.prefix):
            raise InvalidKey(f"{key!r} is not inside the run {self.run_uri}")
        return key[len(self.prefix) :]

    def uri_for(self, relative: str) -> str:
        """The URI of a run-relative key."""
        return f"{self.run_uri}/{relative}"

    def checkpoint(self, step: int) -> str:
        """`checkpoints/step-000200/`: the folder of the checkpoint after `step` steps."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidKey(f"invalid checkpoint step {step!r}: a non-negative integer")
        return f"{self.checkpoints_dir}step-{step:0{STEP_DIGITS}d}/"

    def for_stage(self, index: int, name: str) -> RunLayout:
        """The layout whose checkpoints belong to stage `index` of the chain: the first
        stage uses `checkpoints/`, later ones `checkpoints/<index>-<name>/`."""
        if index == 0:
            return self
        folder = f"{self.CHECKPOINTS}{index}-{name.lower()}/"
        validate_key(folder.rstrip("/"))
        return replace(self, checkpoints_dir=folder)

    def quantized(self, scheme: str) -> str:
        """`quantized/<scheme>/`, e.g. `quantized/W4A16/`."""
        if not isinstance(scheme, str) or not SCHEME_NAME.match(scheme) or len(scheme) > 32:
            raise InvalidKey(f"invalid quantization scheme {scheme!r}")
        return f"{self.QUANTIZED}{scheme}/"


def checkpoint_step(folder: str) -> int | None:
    """The step of a checkpoint folder name (`step-000200` or `.../step-000200/`), or None."""
    match = CHECKPOINT_RE.match(folder.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def parse_run_uri(uri: str) -> RunLayout:
    """The layout of a RUN_URI (the inverse of `RunLayout.run_uri`).

    Raises:
        InvalidKey: the URI does not end with `<namespace>/<job>/<run-id>` under a root.
    """
    scheme, sep, rest = uri.partition("://")
    parts = rest.rstrip("/").rsplit("/", 3) if sep else uri.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or (sep and scheme != "file" and not parts[0]):
        raise InvalidKey(
            f"{uri!r} is not a run URI: expected <output root>/<namespace>/<job>/<run-id>, "
            "as printed by `kubetune run`"
        )
    root = parts[0]
    if sep:
        root = f"{scheme}://{root}" if root else f"{scheme}:///"
    elif not root and uri.startswith("/"):
        root = "/"
    return RunLayout(output_uri=root, namespace=parts[1], job_name=parts[2], run_id=parts[3])


def new_run_id(base_id: str) -> str:
    """A fresh run id for `--new-run`: `<base>-<8 random hex chars>`."""
    _check(RUN_ID, base_id, "run id", 63 - 9)
    return f"{base_id}-{secrets.token_hex(4)}"


def run_id_for(spec: FineTuneJobSpec) -> str:
    """The run id of a spec: 12 hex chars of the sha256 of its canonical training fields.

    Canonical form: the training-relevant sections (`TRAINING_FIELDS`), each optional
    sub-object that is absent replaced by its all-defaults form (so `lora: {}`, `lora:
    {rank: 16}` and no `lora` agree), defaults written out, None values dropped, the
    operational fields (`OPERATIONAL_KEYS`, `OPERATIONAL_PATHS`) removed, then JSON with
    sorted keys. Because defaults are written out, changing a default in a later kubetune
    changes the ids of specs relying on it: a new run, never a resume with different
    settings.
    """
    return spec_hash(spec)[:RUN_ID_LENGTH]


def spec_hash(spec: FineTuneJobSpec) -> str:
    """The full sha256 (hex) of the canonical training fields; recorded in the lineage."""
    text = json.dumps(
        [_CANONICAL_VERSION, canonical_spec(spec)],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_spec(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The canonical training-relevant form hashed by `run_id_for` (for debugging ids)."""
    wire = _fill_defaults(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
    canonical: dict[str, Any] = _strip_operational(
        {k: wire[k] for k in TRAINING_FIELDS if k in wire}
    )
    for path in OPERATIONAL_PATHS:
        _drop_path(canonical, path)
    return canonical


def _fill_defaults(model: BaseModel) -> BaseModel:
    """A copy of `model` where every absent optional sub-object whose type can be built
    from defaults alone is set to that default, recursively (lists included)."""
    updates: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None:
            default_type = _optional_model_type(field.annotation)
            if default_type is not None:
                value = _default_instance(default_type)
        if isinstance(value, BaseModel):
            updates[name] = _fill_defaults(value)
        elif isinstance(value, list):
            updates[name] = [_fill_defaults(v) if isinstance(v, BaseModel) else v for v in value]
        else:
            updates[name] = value
    return model.model_copy(update=updates)


def _optional_model_type(annotation: Any) -> type[BaseModel] | None:
    """`X` for an annotation `X | None` where X is a pydantic model, else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


@cache
def _default_instance(model_type: type[BaseModel]) -> BaseModel | None:
    """The all-defaults instance of a model, or None when it has required fields or its
    defaults break its own rules (e.g. a DatasetSpec needs a uri)."""
    try:
        return model_type()
    except ValidationError:
        return None


def _strip_operational(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_operational(v) for k, v in value.items() if k not in OPERATIONAL_KEYS}
    if isinstance(value, list):
        return [_strip_operational(v) for v in value]
    return value


def _drop_path(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)
