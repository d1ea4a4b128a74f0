"""Architectures from Hugging Face `config.json` files, and from the model names people type.

`load_architecture` accepts a table name, `builtin://random/<arch>`,
`builtin://smollm2-135m-instruct`, a folder holding config.json (or the file itself), and
`hf://org/name` when that model is in the local Hugging Face cache. Nothing is downloaded
(the operator has no Hub credentials); other models are matched to the table by name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kubetune.calc.architectures import (
    ARCHITECTURES,
    KNOWN_ARCHITECTURES,
    Architecture,
    architecture,
)

BUILTIN_MODEL = "builtin://smollm2-135m-instruct"
BUILTIN_MODEL_ARCH = "smollm2-135m"
RANDOM_PREFIX = "builtin://random/"

# transformers' defaults for keys a config.json may leave out, per model_type.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 32768, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "tie_word_embeddings": False},
    "gemma2": {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
}
_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


class ArchitectureError(ValueError):
    """A model reference the calculator cannot turn into an architecture; the message says
    what to pass instead."""


def architecture_from_config(config: dict[str, Any], name: str | None = None) -> Architecture:
    """The architecture of a Hugging Face config.json (llama, qwen2, mistral, gemma2, gemma3).

    A multimodal Gemma 3 config contributes its `text_config` (the language model). Keys the
    file leaves out take transformers' defaults for the model type.

    Args:
        config: the parsed config.json.
        name: what to call it (default: the config's `_name_or_path`, else its model type).

    Raises:
        ArchitectureError: a required dimension is missing; the message names it.
    """
    outer_type = str(config.get("model_type", "llama"))
    text = config.get("text_config")
    if isinstance(text, dict):
        outer = config
        config = {**text, "model_type": text.get("model_type", f"{outer_type}_text")}
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in outer:
            config["tie_word_embeddings"] = outer["tie_word_embeddings"]
    model_type = str(config.get("model_type", outer_type))
    merged = {**_DEFAULTS.get(model_type, {}), **{k: v for k, v in config.items() if v is not None}}
    missing = [key for key in _REQUIRED if key not in merged]
    if missing:
        raise ArchitectureError(
            f"config.json (model_type {model_type}) lacks {', '.join(missing)}; pass --arch "
            f"with one of: {', '.join(sorted(KNOWN_ARCHITECTURES))}"
        )
    heads = int(merged["num_attention_heads"])
    hidden = int(merged["hidden_size"])
    head_dim = merged.get("head_dim")
    explicit = int(head_dim) if head_dim is not None and int(head_dim) != hidden // heads else None
    return Architecture(
        name=name or str(config.get("_name_or_path") or model_type),
        model_type="gemma3" if model_type == "gemma3_text" else model_type,
        hidden_size=hidden,
        intermediate_size=int(merged["intermediate_size"]),
        num_layers=int(merged["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(merged.get("num_key_value_heads") or heads),
        vocab_size=int(merged["vocab_size"]),
        max_position_embeddings=int(merged.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(merged.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(merged.get("attention_bias", False)),
        explicit_head_dim=explicit,
    )


def load_architecture(model: str) -> Architecture:
    """An architecture from a table name, a model URI or a local config.json.

    Args:
        model: `llama-3.1-8b`, `builtin://random/<arch>`, `builtin://smollm2-135m-instruct`,
            a folder with config.json, a config.json path (`file://` allowed), or
            `hf://org/name[@revision]` from the local Hugging Face cache. A model whose
            config cannot be read here (an uncached Hub model, s3://, pvc://) is matched to
            the table by its name (`match_known_name`).

    Raises:
        ArchitectureError: unknown name, unreadable file, a model not cached, or a scheme
            the calculator cannot read locally (s3://, pvc://); the message says what to do.
    """
    if model in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[model]
    if model == BUILTIN_MODEL:
        return KNOWN_ARCHITECTURES[BUILTIN_MODEL_ARCH]
    if model.startswith(RANDOM_PREFIX):
        name = model.removeprefix(RANDOM_PREFIX)
        if name not in ARCHITECTURES:
            raise ArchitectureError(
                f"builtin://random/ builds {', '.join(sorted(ARCHITECTURES))}, not {name!r}"
                + (f"; pass --arch {name} to the calculator" if name in KNOWN_ARCHITECTURES else "")
            )
        return ARCHITECTURES[name]
    if model.startswith("hf://"):
        return _from_hf_cache(model.removeprefix("hf://"))
    if model.startswith(("s3://", "pvc://", "https://", "http://")):
        known_name = match_known_name(model)
        if known_name:
            return KNOWN_ARCHITECTURES[known_name]
        known = ", ".join(sorted(KNOWN_ARCHITECTURES))
        raise ArchitectureError(
            f"cannot read {model} here: pass --arch NAME (one of {known}) or a local folder "
            "with the model's config.json"
        )
    path = Path(model.removeprefix("file://")).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return _from_file(path, name=model)
    if "/" in model or os.sep in model or model.endswith(".json"):
        raise ArchitectureError(f"{model}: no such folder or config.json")
    return _table(model)


_SUFFIXES = ("-instruct", "-it", "-chat", "-base", "-hf", "-pt")
_VERSION = re.compile(r"-v\d+(\.\d+)*$")


def match_known_name(model: str) -> str | None:
    """The table architecture a model's name announces, e.g. `hf://meta-llama/Llama-3.1-8B-Instruct`
    → `llama-3.1-8b`, `s3://models/qwen2.5-7b-instruct` → `qwen2.5-7b`; None if none does.

    Used when the model's config.json cannot be read here (an uncached Hub model, s3://,
    pvc://): fine-tuned variants share their base model's shape.
    """
    name = model.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower().removeprefix("meta-")
    previous = None
    while previous != name:
        previous = name
        name = _VERSION.sub("", name)
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
    return name if name in KNOWN_ARCHITECTURES else None


def _table(name: str) -> Architecture:
    try:
        return architecture(name)
    except KeyError as exc:
        raise ArchitectureError(str(exc.args[0])) from None


def _from_file(path: Path, name: str) -> Architecture:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchitectureError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ArchitectureError(f"{path} does not hold a JSON object")
    return architecture_from_config(config, name=name)


def hf_cache_dirs() -> list[Path]:
    """Where the Hugging Face hub cache may be, most specific first."""
    dirs = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        dirs.append(str(Path(os.environ["HF_HOME"]) / "hub"))
    dirs.append(str(Path("~/.cache/huggingface/hub").expanduser()))
    return [Path(d) for d in dirs if d]


def _from_hf_cache(ref: str) -> Architecture:
    repo, _, revision = ref.partition("@")
    folder_name = "models--" + repo.replace("/", "--")
    for cache in hf_cache_dirs():
        snapshots = cache / folder_name / "snapshots"
        if not snapshots.is_dir():
            continue
        if revision:
            ref_file = cache / folder_name / "refs" / revision
            commit = ref_file.read_text().strip() if ref_file.is_file() else revision
            candidates = [snapshots / commit / "config.json"]
        else:
            candidates = sorted(
                snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True
            )
        for candidate in candidates:
            if candidate.is_file():
                return _from_file(candidate, name=f"hf://{ref}")
    known_name = match_known_name(repo)
    if known_name:
        return KNOWN_ARCHITECTURES[known_name]
    searched = ", ".join(map(str, hf_cache_dirs()))
    raise ArchitectureError(
        f"hf://{ref} is not in the local Hugging Face cache ({searched}); download its "
        "config.json and pass the folder, or pass --arch NAME"
    )
