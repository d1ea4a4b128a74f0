"""Where a model folder comes from: the Hugging Face Hub, S3, a PVC or a local path.

Downloads fill an empty folder handed over by the cache (which renames it into place when
complete). Hub and S3 failures become `ModelResolutionError`s with the contract reason:
missing → SourceNotFound, refused credentials → SourceUnauthorized, unreachable →
DownloadFailed (infrastructure: the operator retries).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason
from kubetune.trainer.resolve.checks import PICKLE_SUFFIXES, is_pickle_weights
from kubetune.trainer.resolve.errors import ModelResolutionError

HF_TOKEN_ENV = "HF_TOKEN"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_REVISION = "main"
SAFE_PATTERNS = (
    "*.safetensors",
    "*.json",  # config, generation config, tokenizer files, safetensors index
    "*.jinja",  # chat templates saved on their own
    "*.model",  # sentencepiece tokenizers
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
)
PICKLE_PATTERNS = tuple(f"*{suffix}" for suffix in PICKLE_SUFFIXES)
CODE_PATTERNS = ("*.py",)
"""Downloaded only with trustRemoteCode: the modelling code a config's auto_map names."""


def parse_hf_uri(uri: str, revision: str | None) -> tuple[str, str]:
    """`hf://org/name[@rev]` plus `spec.model.revision` → (repo id, revision or "main").

    Raises:
        ModelResolutionError: InvalidSpec when both revisions are given and differ.
    """
    repo_id, _, uri_revision = uri.removeprefix("hf://").partition("@")
    if uri_revision and revision and uri_revision != revision:
        raise ModelResolutionError(
            Reason.INVALID_SPEC,
            f"spec.model.uri {uri} names revision {uri_revision!r} but spec.model.revision is "
            f"{revision!r}; give the revision once (in the URI or in spec.model.revision)",
            uri=uri,
        )
    return repo_id, uri_revision or revision or DEFAULT_REVISION


def download_hf(
    repo_id: str,
    revision: str,
    dest: Path,
    *,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Download a Hub snapshot, pinned to the commit `revision` names now, into `dest`.

    Only safetensors, JSON and tokenizer files are fetched; pickle weights only with
    `allow_pickle` and only when the repository has no safetensors; `*.py` only with
    `trust_remote_code`. The token comes from `$HF_TOKEN` (the credentials Secret), the
    endpoint from `$HF_ENDPOINT` (a mirror).

    Raises:
        ModelResolutionError: PickleRefused before downloading anything when the repository
            has only pickle weights and `allow_pickle` is false; Hub failures (`hub_error`).
    """
    from huggingface_hub import HfApi, snapshot_download

    token = os.environ.get(HF_TOKEN_ENV) or None
    endpoint = os.environ.get(HF_ENDPOINT_ENV) or None
    name = f"{repo_id}@{revision}"
    patterns = list(SAFE_PATTERNS)
    if trust_remote_code:
        patterns += CODE_PATTERNS
    with _hub_errors(name):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
        files = [sibling.rfilename for sibling in info.siblings or []]
        if not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if is_pickle_weights(f.rsplit("/", 1)[-1])]
            if pickles and not allow_pickle:
                raise ModelResolutionError(
                    Reason.PICKLE_REFUSED,
                    f"hf://{name} has only pickle weights ({', '.join(pickles[:3])}), which "
                    "can run code when loaded: choose a revision with safetensors, or set "
                    "spec.model.allowPickle: true if you trust the source",
                    uri=f"hf://{name}",
                )
            patterns += PICKLE_PATTERNS
        snapshot_download(
            repo_id,
            revision=info.sha,
            local_dir=dest,
            allow_patterns=patterns,
            token=token,
            endpoint=endpoint,
        )
    # snapshot_download's own bookkeeping; not part of the model.
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return {"kind": "hf", "repo_id": repo_id, "commit": info.sha}


@contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """Translate huggingface_hub / httpx failures into ModelResolutionError."""
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (httpx.HTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise hub_error(name, exc) from exc


def hub_error(name: str, exc: BaseException) -> ModelResolutionError:
    """The ModelResolutionError for a failure of the Hugging Face Hub about `name`."""
    from huggingface_hub import is_offline_mode
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    uri = f"hf://{name}"
    if isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, HfHubHTTPError):
        exc = exc.__cause__  # the Hub's answer, wrapped by snapshot_download (nothing cached)
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    if isinstance(exc, RevisionNotFoundError):
        return ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"{name}: the revision does not exist on the Hugging Face Hub; fix "
            "spec.model.revision (a branch, tag or commit of the repository)",
            uri=uri,
        )
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return ModelResolutionError(
            Reason.SOURCE_UNAUTHORIZED,
            f"the Hugging Face Hub refused access to {name} (HTTP {status}): accept the "
            "model's terms on its Hub page, and set spec.model.credentialsSecretRef to a "
            "Secret whose HF_TOKEN can read it",
            uri=uri,
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"{name} does not exist on the Hugging Face Hub: check spec.model.uri (a private "
            "model also needs spec.model.credentialsSecretRef, a Secret with HF_TOKEN)",
            uri=uri,
        )
    if status is not None:
        return ModelResolutionError(
            Reason.DOWNLOAD_FAILED,
            f"the Hugging Face Hub answered HTTP {status} while downloading {name}: retry "
            "later, or mirror the model to s3:// / pvc://",
            uri=uri,
        )
    why = "HF_HUB_OFFLINE is set" if is_offline_mode() else f"{type(exc).__name__}"
    return ModelResolutionError(
        Reason.DOWNLOAD_FAILED,
        f"cannot reach the Hugging Face Hub to download {name}: set HF_HUB_OFFLINE=0 and "
        f"network access, or mirror it to s3:// / pvc:// ({why})",
        uri=uri,
    )


def download_s3(uri: str, dest: Path) -> dict[str, Any]:
    """Copy every object under `s3://bucket/prefix/` into `dest`, keeping relative keys.

    Credentials and endpoint come from the environment (`AWS_*`, the credentials Secret).
    """
    from kubetune.storage import open_store
    from kubetune.storage.errors import StorageError

    try:
        store = open_store(uri)
        objects = store.list("")
        if not objects:
            raise ModelResolutionError(
                Reason.SOURCE_NOT_FOUND,
                f"{uri} holds no objects: upload the model folder (config.json, "
                "*.safetensors, tokenizer files) under that prefix, or fix spec.model.uri",
                uri=uri,
            )
        for info in objects:
            target = dest / info.key
            target.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(info.key, target)
    except StorageError as err:
        raise ModelResolutionError(err.reason, f"model {uri}: {err.message}", uri=uri) from err
    return {"kind": "s3", "objects": len(objects)}


def pvc_path(uri: str) -> Path:
    """`pvc://claim/path` → `$KUBETUNE_PVC_ROOT/claim/path` (default /mnt/kubetune/pvc).

    Raises:
        ModelResolutionError: InvalidSpec for a path with `..` (no escaping the claim).
    """
    from kubetune.storage.store import pvc_root

    claim, _, sub = uri.removeprefix("pvc://").strip("/").partition("/")
    parts = [p for p in sub.split("/") if p]
    if not claim or ".." in parts or claim == "..":
        raise ModelResolutionError(
            Reason.INVALID_SPEC,
            f"spec.model.uri {uri}: expected pvc://<claim>/<path> without '..' segments",
            uri=uri,
        )
    return pvc_root().joinpath(claim, *parts)


def local_path(uri: str) -> Path:
    """`file:///path`, `file://relative` or a plain path → a local path (`~` expanded)."""
    return Path(uri.removeprefix("file://")).expanduser()
