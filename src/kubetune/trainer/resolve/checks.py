"""Safety checks on a resolved model folder, before any weight is loaded (DESIGN §7).

- It must be a Hugging Face model folder (a config.json) with weights.
- Pickle weights (`*.bin`, `*.pt`, `*.pth`) can run code when loaded: a folder with only
  those is refused unless `spec.model.allowPickle` is true (PickleRefused).
- A config or tokenizer config with `auto_map` needs Python code shipped with the model:
  refused unless `spec.model.trustRemoteCode` is true (ModelNeedsRemoteCode).
- `training.maxSeqLength` must fit the model's context length (SequenceTooLong).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason
from kubetune.trainer.resolve.errors import ModelResolutionError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"})
"""Pickles the Trainer saves next to a checkpoint: not weights, never loaded by us."""


def check_model_folder(
    path: Path,
    uri: str,
    *,
    allow_pickle: bool,
    trust_remote_code: bool,
    expect_weights: bool = True,
) -> dict[str, Any]:
    """Check a model folder; return its config.json.

    Args:
        path: the resolved folder.
        uri: the URI it came from (for messages).
        allow_pickle: `spec.model.allowPickle`.
        trust_remote_code: `spec.model.trustRemoteCode`.
        expect_weights: False for config-only folders (builtin://random/<arch>).

    Raises:
        ModelResolutionError: SourceNotFound, PickleRefused or ModelNeedsRemoteCode.
    """
    if not path.is_dir():
        raise ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"model {uri}: {path} does not exist or is not a folder; fix spec.model.uri",
            uri=uri,
        )
    config = _read_json(path / "config.json", uri)
    if config is None:
        raise ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"model {uri}: {path} is not a Hugging Face model folder (no config.json); point "
            "spec.model.uri at the folder holding config.json, *.safetensors and the tokenizer",
            uri=uri,
        )
    if expect_weights:
        _check_weights(path, uri, allow_pickle=allow_pickle)
    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            data = config if name == "config.json" else _read_json(path / name, uri)
            if data and data.get("auto_map"):
                raise ModelResolutionError(
                    Reason.MODEL_NEEDS_REMOTE_CODE,
                    f"model {uri} needs Python code shipped with it ({name} has auto_map: "
                    f"{', '.join(sorted(data['auto_map']))}); review that code, then set "
                    "spec.model.trustRemoteCode: true, or choose a model transformers "
                    "supports natively",
                    uri=uri,
                )
    return config


def _check_weights(path: Path, uri: str, *, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if is_pickle_weights(name))
    if pickles and not allow_pickle:
        raise ModelResolutionError(
            Reason.PICKLE_REFUSED,
            f"model {uri} has only pickle weights ({', '.join(pickles[:3])}), which can run "
            "code when loaded: convert them to safetensors (e.g. load and save_pretrained "
            "with safe_serialization) or set spec.model.allowPickle: true if you trust the "
            "source",
            uri=uri,
        )
    if not pickles:
        raise ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"model {uri}: {path} has a config.json but no weights (*.safetensors); upload "
            "the weights next to it or fix spec.model.uri",
            uri=uri,
        )


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""config.json keys that hold a model's context length, by architecture family."""


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's positions allow, or None when the config does not
    say (the text model's config of a multimodal model counts)."""
    for scope in (config, config.get("text_config")):
        if not isinstance(scope, dict):
            continue
        for key in CONTEXT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_sequence_length(config: dict[str, Any], max_seq_length: int, uri: str) -> None:
    """Refuse a `training.maxSeqLength` over the model's context length.

    Raises:
        ModelResolutionError: SequenceTooLong, naming both lengths and what to change.
    """
    limit = context_length(config)
    if limit is not None and max_seq_length > limit:
        raise ModelResolutionError(
            Reason.SEQUENCE_TOO_LONG,
            f"training.maxSeqLength ({max_seq_length}) exceeds the context length of model "
            f"{uri} ({limit}, from its config.json); lower training.maxSeqLength to {limit} or "
            "less, or choose a model with a longer context",
            uri=uri,
        )


def is_pickle_weights(name: str) -> bool:
    """Whether a file name is pickle weights (not the Trainer's pickled state)."""
    return name.endswith(PICKLE_SUFFIXES) and name not in NOT_WEIGHTS


def _read_json(path: Path, uri: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"model {uri}: {path.name} is not valid JSON ({err}); re-upload the model folder",
            uri=uri,
        ) from err
    return data if isinstance(data, dict) else None
