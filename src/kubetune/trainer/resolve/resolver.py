"""`spec.model` → a checked local Hugging Face model folder, for every URI scheme.

| URI                              | Folder                                                  |
| -------------------------------- | ------------------------------------------------------- |
| builtin://smollm2-135m-instruct  | packaged GGUF, dequantized once into the cache          |
| builtin://random/<arch>          | config + built-in tokenizer, no weights (cache)         |
| hf://org/name[@revision]         | Hub snapshot pinned to the revision's commit (cache)    |
| s3://bucket/prefix               | every object under the prefix (cache)                   |
| pvc://claim/path                 | $KUBETUNE_PVC_ROOT/claim/path, as is                    |
| file://path, a plain path        | the folder, as is                                       |

Cache entries are keyed by (URI, revision) and reused across retries (see `cache`). A Hub
branch or tag is pinned to its commit at the first download and that snapshot is reused
afterwards: pin a commit for reproducible runs, delete the entry to follow a branch. The
folder is checked (`checks`) before any weight is loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kubetune.api.contract import Reason
from kubetune.api.uris import scheme
from kubetune.calc.architectures import ARCHITECTURES
from kubetune.trainer.resolve import builtin, sources
from kubetune.trainer.resolve.cache import default_cache_root, materialize, read_marker
from kubetune.trainer.resolve.checks import check_model_folder
from kubetune.trainer.resolve.errors import ModelResolutionError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from kubetune.api.v1alpha1.finetunejob import ModelSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A local model folder that passed the safety checks.

    Attributes:
        uri: `spec.model.uri`.
        path: the folder (config.json, weights unless `random_weights`, tokenizer files).
        revision: the revision it was resolved at (the Hub commit for hf://, the packaged
            version for builtin://), or None.
        random_weights: True for builtin://random/<arch>: the folder has no weights; build
            the model with `build_random_model`.
        cache_hit: True when the folder came from the cache without any download or
            conversion.
        trust_remote_code: `spec.model.trustRemoteCode`, to pass to every `from_pretrained`.
        allow_pickle: `spec.model.allowPickle`.
        config: the folder's config.json.
        source: the cache marker (where it came from, checksums, versions); empty for
            pvc:// and local folders.
    """

    uri: str
    path: Path
    revision: str | None = None
    random_weights: bool = False
    cache_hit: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every `from_pretrained` on this folder must get."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if not self.allow_pickle:
            kwargs["use_safetensors"] = True
        return kwargs


def resolve_model(
    source: ModelSource,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_builtin_random: bool = False,
) -> ResolvedModel:
    """Resolve `spec.model` into a checked local model folder.

    Args:
        source: `spec.model`.
        cache_dir: the cache root; default `$KUBETUNE_CACHE_DIR` or
            `~/.cache/kubetune/models`.
        allow_builtin_random: accept builtin://random/<arch> (DESIGN §8: refused in-cluster
            unless the operator's settings allow it; `TrainerConfig.allow_builtin_random`).

    Raises:
        ModelResolutionError: with the contract reason and what to change.
    """
    uri = source.uri
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    kind = scheme(uri)
    if source.revision and kind != "hf":
        raise ModelResolutionError(
            Reason.INVALID_SPEC,
            f"spec.model.revision ({source.revision!r}) applies to hf:// models only, and "
            f"spec.model.uri is {uri}; remove spec.model.revision",
            uri=uri,
        )
    revision: str | None = None
    random_weights, hit = False, False
    if kind == "builtin":
        path, hit, revision, random_weights = _resolve_builtin(uri, root, allow_builtin_random)
    elif kind == "hf":
        repo_id, revision = sources.parse_hf_uri(uri, source.revision)
        fetch = partial(
            sources.download_hf,
            repo_id,
            revision,
            allow_pickle=source.allow_pickle,
            trust_remote_code=source.trust_remote_code,
        )
        variant = _variant(source.allow_pickle, source.trust_remote_code)
        path, hit = materialize(root, f"hf://{repo_id}", revision + variant, fetch)
    elif kind == "s3":
        path, hit = materialize(root, uri, None, partial(sources.download_s3, uri))
    elif kind == "pvc":
        path = sources.pvc_path(uri)
    elif kind in ("file", "local"):
        path = sources.local_path(uri)
    else:  # the API's URI pattern refuses these; a hand-written TrainerConfig might not
        raise ModelResolutionError(
            Reason.INVALID_SPEC,
            f"spec.model.uri {uri}: unsupported scheme {kind}://; use hf://, s3://, pvc://, "
            "builtin:// or a local path",
            uri=uri,
        )
    config = check_model_folder(
        path,
        uri,
        allow_pickle=source.allow_pickle,
        trust_remote_code=source.trust_remote_code,
        expect_weights=not random_weights,
    )
    marker = read_marker(path) or {}
    logger.info("Model %s resolved to %s%s", uri, path, " (cached)" if hit else "")
    return ResolvedModel(
        uri=uri,
        path=path,
        revision=marker.get("commit") or revision,
        random_weights=random_weights,
        cache_hit=hit,
        trust_remote_code=source.trust_remote_code,
        allow_pickle=source.allow_pickle,
        config=config,
        source=marker,
    )


def build_random_model(
    config_dir: str | os.PathLike[str],
    seed: int,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM with random weights from a config folder (builtin://random/<arch>).

    Seeds torch's global generator with `seed` (as training does anyway), so the same seed
    gives the same weights. `device` (e.g. "cuda" or "meta") creates the weights there
    directly: a large architecture never has to fit in host memory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return cast("PreTrainedModel", model)


def _resolve_builtin(
    uri: str, root: Path, allow_builtin_random: bool
) -> tuple[Path, bool, str, bool]:
    """(folder, cache hit, revision, random weights) for a builtin:// URI."""
    if uri == builtin.BUILTIN_MODEL_URI:
        revision = builtin.gguf_revision()
        tokenizer_dir = _builtin_tokenizer(root, revision)
        build = partial(builtin.build_builtin_model, tokenizer_dir=tokenizer_dir)
        path, hit = materialize(root, uri, revision, build)
        return path, hit, revision, False
    arch = uri.removeprefix(builtin.RANDOM_PREFIX)
    if not uri.startswith(builtin.RANDOM_PREFIX) or arch not in ARCHITECTURES:
        raise ModelResolutionError(
            Reason.INVALID_SPEC,
            f"spec.model.uri {uri}: unknown built-in model; use "
            f"{builtin.BUILTIN_MODEL_URI} or builtin://random/<arch> with <arch> one of "
            f"{', '.join(sorted(ARCHITECTURES))}",
            uri=uri,
        )
    if not allow_builtin_random:
        raise ModelResolutionError(
            Reason.INVALID_SPEC,
            f"spec.model.uri {uri} has random weights, for benchmarks and tests only, and "
            "random models are not allowed here: use a real model, or allow them "
            "(allowBuiltinRandom in the trainer config; the operator sets it only where its "
            "settings allow random models)",
            uri=uri,
        )
    revision = _builtin_revision(root)
    tokenizer_dir = _builtin_tokenizer(root, revision)
    build = partial(builtin.build_random_folder, arch, tokenizer_dir=tokenizer_dir)
    path, hit = materialize(root, uri, revision, build)
    return path, hit, revision, True


def _builtin_revision(root: Path) -> str:
    """The built-in package's revision; without the package (a machine that only has the
    cache, e.g. a GPU node that received it), the revision of the cached tokenizer."""
    try:
        return builtin.gguf_revision()
    except ModelResolutionError:
        for folder in sorted(root.glob("*")):
            marker = read_marker(folder) or {}
            if marker.get("uri") == builtin.TOKENIZER_KEY and marker.get("revision"):
                return str(marker["revision"])
        raise


def builtin_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """The built-in model's tokenizer folder (from the package, or from the cache alone on
    a machine without the package)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    return _builtin_tokenizer(root, _builtin_revision(root))


def _builtin_tokenizer(root: Path, revision: str) -> Path:
    path, _ = materialize(root, builtin.TOKENIZER_KEY, revision, builtin.build_builtin_tokenizer)
    return path


def _variant(allow_pickle: bool, trust_remote_code: bool) -> str:
    """Download options that change which files a Hub snapshot holds (part of the key)."""
    return ("+pickle" if allow_pickle else "") + ("+code" if trust_remote_code else "")
