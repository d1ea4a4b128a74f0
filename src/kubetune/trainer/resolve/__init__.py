"""Model and tokenizer resolution: `spec.model` → a checked local Hugging Face folder.

    resolved = resolve_model(spec.model, cache_dir=..., allow_builtin_random=...)
    tokenizer = load_tokenizer(resolved.path, trust_remote_code=resolved.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, **resolved.from_pretrained_kwargs())
    # builtin://random/<arch>: model = build_random_model(resolved.path, seed, dtype)

Every failure is a `ModelResolutionError` with the contract `Reason` (and exit code).
torch, transformers and huggingface_hub are imported only inside the functions that need
them, so importing this package is cheap.
"""

from kubetune.trainer.resolve.builtin import BUILTIN_MODEL_URI
from kubetune.trainer.resolve.cache import CACHE_DIR_ENV, MARKER, default_cache_root
from kubetune.trainer.resolve.errors import ModelResolutionError
from kubetune.trainer.resolve.resolver import (
    ResolvedModel,
    build_random_model,
    builtin_tokenizer_dir,
    resolve_model,
)
from kubetune.trainer.resolve.tokenizer import (
    ALPACA_TEMPLATE,
    CHATML_TEMPLATE,
    chat_template_override,
    load_tokenizer,
    uses_fallback_chat_template,
)

__all__ = [
    "ALPACA_TEMPLATE",
    "BUILTIN_MODEL_URI",
    "CACHE_DIR_ENV",
    "CHATML_TEMPLATE",
    "MARKER",
    "ModelResolutionError",
    "ResolvedModel",
    "build_random_model",
    "builtin_tokenizer_dir",
    "chat_template_override",
    "default_cache_root",
    "load_tokenizer",
    "resolve_model",
    "uses_fallback_chat_template",
]
