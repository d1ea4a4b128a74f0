"""`kubetune serve`: one variant of a run, served by vLLM on this machine (a GPU
workstation), under the job's name.

The variant is fetched first (`kubetune.storage.fetch`, into a cache keyed by the manifest
digest), then this process becomes `vllm serve` (exec), so signals and the exit status are
vLLM's own. Merged and quantized variants are folders vLLM loads as they are; an Adapter is
served as a LoRA module on the base model named in the run's lineage.

vLLM is an optional extra (`kubetune[serve]`): it is looked for on PATH, never imported.
The command line is built by pure functions (`vllm_argv`, `base_model_arg`,
`max_lora_rank`, `lora_problem`) that the tests and the ModelDeployment builders share.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.modeldeployment import Variant

if TYPE_CHECKING:
    from kubetune.storage.fetch import FetchResult

DEFAULT_PORT = 8000
DEFAULT_CACHE_ROOT = Path("~/.cache/kubetune/runs")
"""Where `kubetune serve` keeps fetched variants: `<root>/<manifest sha256>/<variant>`."""
CACHE_ROOT_ENV = "KUBETUNE_RUNS_CACHE_DIR"
VLLM = "vllm"
INSTALL_HINT = (
    "vLLM is not installed (no `vllm` on PATH): install it with "
    "pip install 'kubetune[serve]' on a Linux machine with an NVIDIA GPU"
)
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""
ADAPTER_CONFIG = "adapter_config.json"


class ServeError(Exception):
    """Serving cannot start; the message says what to do.

    Attributes:
        reason: the contract reason (and so the exit code).
    """

    def __init__(self, message: str, reason: Reason = Reason.INVALID_SPEC) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BaseModelArg:
    """The base model as vLLM's positional MODEL argument.

    Attributes:
        model: a Hugging Face repo id or a local folder.
        revision: the Hub revision to load (`--revision`), for repo ids.
    """

    model: str
    revision: str | None = None


def default_cache_root() -> Path:
    """`$KUBETUNE_RUNS_CACHE_DIR`, else `~/.cache/kubetune/runs`."""
    return Path(os.environ.get(CACHE_ROOT_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def vllm_executable() -> str | None:
    """The `vllm` command on PATH, or None when vLLM is not installed."""
    return shutil.which(VLLM)


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of `rank`.

    Raises:
        ServeError: the rank is above what vLLM serves.
    """
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ServeError(
        f"the adapter's LoRA rank {rank} is above the {LORA_RANKS[-1]} vLLM serves: serve "
        "the Merged variant instead"
    )


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest LoRA rank of an adapter_config.json (`r` and any `rank_pattern`)."""
    ranks = [config.get("r") or 8]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks.extend(v for v in pattern.values() if isinstance(v, int))
    return max(int(r) for r in ranks)


def lora_problem(config: Mapping[str, Any]) -> str | None:
    """Why vLLM cannot serve an adapter as a LoRA module (DESIGN §8), or None when it can."""
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        return f"vLLM serves LoRA adapters only, and this adapter is {kind}"
    if config.get("use_dora"):
        return "vLLM does not serve DoRA adapters: serve the Merged variant"
    if config.get("modules_to_save"):
        return (
            "vLLM does not serve adapters with modules_to_save "
            f"({', '.join(map(str, config['modules_to_save']))}): serve the Merged variant"
        )
    return None


def base_model_arg(uri: str, revision: str | None = None) -> BaseModelArg | None:
    """The base model of a run's lineage as vLLM's MODEL argument, when vLLM can load it
    by itself: `hf://org/name[@rev]` → the repo id (the lineage's revision first: the
    commit training used), `file://` and local paths → the folder. None for builtin://,
    s3:// and pvc:// models, which must be made local first."""
    if uri.startswith("hf://"):
        repo, _, uri_revision = uri.removeprefix("hf://").partition("@")
        return BaseModelArg(repo, revision or uri_revision or None)
    if uri.startswith("file://"):
        return BaseModelArg(uri.removeprefix("file://").removeprefix("localhost"))
    if "://" not in uri:
        return BaseModelArg(uri)
    return None


def vllm_argv(
    model_dir: str | os.PathLike[str],
    *,
    variant: Variant,
    served_name: str,
    port: int = DEFAULT_PORT,
    host: str | None = None,
    base: BaseModelArg | None = None,
    lora_rank: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `vllm serve …` command line for a fetched variant.

    Merged and quantized variants: `vllm serve DIR --served-model-name NAME` (a quantized
    folder's config.json tells vLLM its scheme). Adapter: `vllm serve BASE --enable-lora
    --lora-modules NAME=DIR --max-lora-rank R`, so clients ask for NAME and get the adapter.
    `extra` goes last, so it can override anything before it.

    Raises:
        ServeError: an Adapter without a base model.
    """
    folder = os.fspath(model_dir)
    if variant == Variant.ADAPTER:
        if base is None:
            raise ServeError("serving an Adapter needs its base model")
        argv = [VLLM, "serve", base.model]
        if base.revision:
            argv += ["--revision", base.revision]
        argv += ["--enable-lora", "--lora-modules", f"{served_name}={folder}"]
        argv += ["--max-lora-rank", str(max_lora_rank(lora_rank or 8))]
    else:
        argv = [VLLM, "serve", folder, "--served-model-name", served_name]
    if host:
        argv += ["--host", host]
    argv += ["--port", str(port)]
    return argv + list(extra)


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The adapter_config.json of a fetched Adapter variant.

    Raises:
        ServeError: it is missing or not JSON.
    """
    path = directory / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ServeError(f"cannot read {path}: {exc}", Reason.SOURCE_NOT_FOUND) from exc
    if not isinstance(data, dict):
        raise ServeError(f"{path} is not a JSON object", Reason.SOURCE_NOT_FOUND)
    return data


def resolve_base_model(lineage_model: Mapping[str, Any], override: str | None) -> BaseModelArg:
    """The base model to serve an Adapter on: `override` (`--base-model`) if given, else
    the lineage's model; builtin://, s3:// and pvc:// models go through the trainer's model
    resolver (the `trainer` extra), which makes them a local folder.

    Raises:
        ServeError: no base model is known, or it cannot be made local.
    """
    uri = override or lineage_model.get("uri")
    revision = None if override else lineage_model.get("revision")
    if not isinstance(uri, str) or not uri:
        raise ServeError(
            "the run's manifest names no base model (lineage.model.uri): pass --base-model "
            "(an hf:// repo or a local folder), or serve the Merged variant"
        )
    direct = base_model_arg(uri, revision if isinstance(revision, str) else None)
    if direct:
        return direct
    try:
        from kubetune.api.v1alpha1.finetunejob import ModelSource
        from kubetune.trainer.resolve import ModelResolutionError, resolve_model
    except ImportError as exc:
        raise ServeError(
            f"the base model {uri} must be made local first, which needs the trainer extra "
            f"(pip install 'kubetune[trainer]'; {exc.name} is missing); or pass --base-model "
            "with an hf:// repo or a local folder, or serve the Merged variant"
        ) from exc
    try:
        resolved = resolve_model(ModelSource(uri=uri))
    except ModelResolutionError as exc:
        raise ServeError(f"cannot resolve the base model {uri}: {exc}", exc.reason) from exc
    return BaseModelArg(str(resolved.path))


def command_for(
    fetched: FetchResult,
    *,
    port: int = DEFAULT_PORT,
    host: str | None = None,
    base_model: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The vLLM command line for a fetched variant; for an Adapter, checks that vLLM can
    serve it and finds its base model (`base_model` overrides the lineage's).

    Raises:
        ServeError: the adapter is not servable as LoRA, or its base model is unknown.
    """
    base, rank = None, None
    if fetched.variant == Variant.ADAPTER:
        config = read_adapter_config(fetched.directory)
        problem = lora_problem(config)
        if problem:
            raise ServeError(f"{fetched.run_uri}: {problem}")
        base = resolve_base_model(fetched.base_model, base_model)
        rank = adapter_rank(config)
    return vllm_argv(
        fetched.directory,
        variant=fetched.variant,
        served_name=fetched.job_name,
        port=port,
        host=host,
        base=base,
        lora_rank=rank,
        extra=extra,
    )
