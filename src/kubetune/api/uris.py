"""URI schemes accepted by the API (DESIGN §8), as regular expressions.

The same expressions go into CEL `matches()` rules and into the pydantic mirrors, so the
API server and `kubetune validate` agree. They use only syntax shared by RE2 (Kubernetes
CEL) and Python `re`, and no backslashes (CEL string escaping).
"""

from __future__ import annotations

import re

_HF = "hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?(@[A-Za-z0-9._/-]+)?"
_S3 = "s3://[a-z0-9][a-z0-9.-]*[a-z0-9](/[^ ]*)?"
_PVC = "pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^ ]*)?"
_BUILTIN = "builtin://(smollm2-135m-instruct|random/[a-z0-9][a-z0-9.-]*)"
_BUILTIN_DATA = "builtin://[a-z0-9][a-z0-9-]*"
_HTTPS = "https://[^ ]+"
_FILE = "file://[^ ]+"
# A local path: anything without a scheme.
_LOCAL = "[^ :][^:]*"

MODEL_URI = f"^({_HF}|{_S3}|{_PVC}|{_BUILTIN}|{_FILE}|{_LOCAL})$"
DATASET_URI = f"^({_HF}|{_S3}|{_PVC}|{_HTTPS}|{_BUILTIN_DATA}|{_FILE}|{_LOCAL})$"
OUTPUT_URI = f"^({_S3}|{_PVC}|{_FILE}|{_LOCAL})$"
ARTIFACT_URI = f"^({_S3}|{_PVC}|{_FILE}|{_LOCAL})$"
ENDPOINT_URL = "^https?://[^ ]+$"

MODEL_URI_HELP = (
    "hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path, "
    "builtin://smollm2-135m-instruct, builtin://random/<arch>, file://path or a local path"
)
DATASET_URI_HELP = (
    "hf://org/name[@revision], s3://bucket/key, pvc://claim/path, https://host/path, "
    "builtin://<name> (a dataset shipped with kubetune), file://path or a local path "
    "(globs allowed)"
)
OUTPUT_URI_HELP = "s3://bucket/prefix, pvc://claim/path, file://path or a local path"

LOCAL_SCHEMES = ("file",)


def matches(pattern: str, value: str) -> bool:
    """CEL `matches()` semantics: RE2 search, anchored by the pattern itself."""
    return re.search(pattern, value) is not None


def scheme(uri: str) -> str:
    """The scheme of a URI, or "local" for a plain path."""
    head, sep, _ = uri.partition("://")
    return head if sep else "local"


def is_local(uri: str) -> bool:
    """True for URIs only a local run can read (file:// and plain paths)."""
    return scheme(uri) in ("file", "local")
