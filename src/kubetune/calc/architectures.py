"""Public decoder-only architectures by name: the calculator's table, and the subset that
`builtin://random/<arch>` builds.

Shapes are copied from the models' published configs; the weights are irrelevant to memory
and speed, so benchmarks and tests build random-weight models from these. Gemma-3 4B/12B/27B
are their language models only: the published totals (4.3B, 12.2B, 27.4B) also count a
417M-parameter SigLIP vision encoder that text fine-tuning does not load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-style decoder (Llama, Qwen2, Mistral, SmolLM2, Gemma 2/3).

    Attributes:
        name: table name (or the model's path when read from a config.json).
        model_type: Hugging Face `model_type` (llama, qwen2, mistral, gemma2, gemma3).
        hidden_size: width h of the residual stream.
        intermediate_size: width of the gated MLP.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than num_heads).
        vocab_size: rows of the embedding (and of the output head).
        max_position_embeddings: longest context the config allows.
        tie_word_embeddings: the output head shares the embedding matrix.
        attention_bias: q/k/v projections have biases (Qwen2).
        explicit_head_dim: head width when it is not hidden_size / num_heads (Gemma).
    """

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
    explicit_head_dim: int | None = None

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        """Output width of q_proj (input width of o_proj)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Output width of k_proj and of v_proj."""
        return self.num_kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        """RMSNorms of width h per layer: Gemma 2/3 also normalize after attention and MLP."""
        return 4 if self.model_type in ("gemma2", "gemma3", "gemma3_text") else 2

    @property
    def has_qk_norm(self) -> bool:
        """Per-head RMSNorm on queries and keys (Gemma 3)."""
        return self.model_type in ("gemma3", "gemma3_text")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """The (in_features, out_features) of each linear module of one decoder layer."""
        h, inter = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }

    def layer_linear_params(self) -> int:
        """Weights of the linear modules of one layer (biases excluded)."""
        return sum(i * o for i, o in self.linear_shapes().values())

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix product per token: every decoder linear plus
        the output head (the embedding lookup is not a product)."""
        return self.num_layers * self.layer_linear_params() + self.vocab_size * self.hidden_size


# fmt: off
_A = Architecture
_TABLE = (
    # h: hidden size, inter: MLP width, L: layers, nh / kv: query / key-value heads
    #  name             type       h     inter  L   nh  kv  vocab   context tied   bias   head_dim
    _A("smollm2-135m",  "llama",   576,  1536,  30, 9,  3,  49152,  8192,   True,  False, None),
    _A("smollm2-360m",  "llama",   960,  2560,  32, 15, 5,  49152,  8192,   True,  False, None),
    _A("llama-3.2-1b",  "llama",   2048, 8192,  16, 32, 8,  128256, 131072, True,  False, None),
    _A("llama-3.2-3b",  "llama",   3072, 8192,  28, 24, 8,  128256, 131072, True,  False, None),
    _A("llama-3.1-8b",  "llama",   4096, 14336, 32, 32, 8,  128256, 131072, False, False, None),
    _A("llama-3.1-70b", "llama",   8192, 28672, 80, 64, 8,  128256, 131072, False, False, None),
    _A("qwen2.5-0.5b",  "qwen2",   896,  4864,  24, 14, 2,  151936, 32768,  True,  True,  None),
    _A("qwen2.5-1.5b",  "qwen2",   1536, 8960,  28, 12, 2,  151936, 32768,  True,  True,  None),
    _A("qwen2.5-3b",    "qwen2",   2048, 11008, 36, 16, 2,  151936, 32768,  True,  True,  None),
    _A("qwen2.5-7b",    "qwen2",   3584, 18944, 28, 28, 4,  152064, 32768,  False, True,  None),
    _A("qwen2.5-14b",   "qwen2",   5120, 13824, 48, 40, 8,  152064, 32768,  False, True,  None),
    _A("qwen2.5-32b",   "qwen2",   5120, 27648, 64, 40, 8,  152064, 32768,  False, True,  None),
    _A("qwen2.5-72b",   "qwen2",   8192, 29568, 80, 64, 8,  152064, 32768,  False, True,  None),
    _A("mistral-7b",    "mistral", 4096, 14336, 32, 32, 8,  32768,  32768,  False, False, None),
    _A("gemma-2-2b",    "gemma2",  2304, 9216,  26, 8,  4,  256000, 8192,   True,  False, 256),
    _A("gemma-2-9b",    "gemma2",  3584, 14336, 42, 16, 8,  256000, 8192,   True,  False, 256),
    _A("gemma-2-27b",   "gemma2",  4608, 36864, 46, 32, 16, 256000, 8192,   True,  False, 128),
    _A("gemma-3-1b",    "gemma3",  1152, 6912,  26, 4,  1,  262144, 32768,  True,  False, 256),
    _A("gemma-3-4b",    "gemma3",  2560, 10240, 34, 8,  4,  262208, 131072, True,  False, 256),
    _A("gemma-3-12b",   "gemma3",  3840, 15360, 48, 16, 8,  262208, 131072, True,  False, 256),
    _A("gemma-3-27b",   "gemma3",  5376, 21504, 62, 32, 16, 262208, 131072, True,  False, 128),
)
# fmt: on

KNOWN_ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _TABLE}
"""Every architecture the calculator knows by name."""

ARCHITECTURES: dict[str, Architecture] = {
    name: KNOWN_ARCHITECTURES[name]
    for name in (
        "smollm2-135m",
        "smollm2-360m",
        "llama-3.2-1b",
        "llama-3.2-3b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-7b",
        "mistral-7b",
    )
}
"""The architectures `builtin://random/<arch>` builds. The CRD's validation rule lists these
names and the trainer has their config classes; the other entries of KNOWN_ARCHITECTURES
(Qwen2.5 3B–72B, Gemma 2 and 3) are known to the calculator only."""


def architecture(name: str) -> Architecture:
    """Look up an architecture of KNOWN_ARCHITECTURES by name, with the known names in the
    error.

    Raises:
        KeyError: the name is not in the table; the message lists the known names.
    """
    try:
        return KNOWN_ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_ARCHITECTURES))
        raise KeyError(f"unknown architecture {name!r}; known: {known}") from None


def parameter_count(arch: Architecture) -> int:
    """Total parameters, embeddings included (tied embeddings counted once)."""
    h = arch.hidden_size
    attention = arch.layer_linear_params() - 3 * h * arch.intermediate_size
    if arch.attention_bias:
        attention += arch.q_dim + 2 * arch.kv_dim
    mlp = 3 * h * arch.intermediate_size
    norms = arch.norms_per_layer * h + (2 * arch.head_dim if arch.has_qk_norm else 0)
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * (attention + mlp + norms) + embeddings + h
