"""Public decoder-only architectures, by the names `builtin://random/<arch>` accepts.

Shapes are copied from the models' published configs; the weights are irrelevant to memory
and speed, so benchmarks and tests build random-weight models from these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-style decoder (Llama, Qwen2, Mistral, SmolLM2)."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, 8192, True),
        Architecture("smollm2-360m", "llama", 960, 2560, 32, 15, 5, 49152, 8192, True),
        Architecture("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, 131072, True),
        Architecture("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, 131072, True),
        Architecture("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, 131072, False),
        Architecture("llama-3.1-70b", "llama", 8192, 28672, 80, 64, 8, 128256, 131072, False),
        Architecture("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, 32768, True, True),
        Architecture("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, 32768, True, True),
        Architecture("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064, 32768, False, True),
        Architecture("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32768, 32768, False),
    )
}


def architecture(name: str) -> Architecture:
    """Look up an architecture by name, with the known names in the error."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {name!r}; known: {known}") from None


def parameter_count(arch: Architecture) -> int:
    """Total parameters, embeddings included (tied embeddings counted once)."""
    h, kv = arch.hidden_size, arch.num_kv_heads * arch.head_dim
    attention = h * h * 2 + h * kv * 2
    if arch.attention_bias:
        attention += h + 2 * kv
    mlp = 3 * h * arch.intermediate_size
    norms = 2 * h
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * (attention + mlp + norms) + embeddings + h
