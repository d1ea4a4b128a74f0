"""Trainable-parameter counts of every tuning method, exactly as PEFT builds them.

- LoRA on a `Linear(in, out)` with rank r adds A (r x in) and B (out x r): r * (in + out).
  On an `Embedding(vocab, h)` it adds r * (vocab + h).
- DoRA adds a magnitude vector of `out` values per adapted layer.
- `modules_to_save` (embed_tokens, lm_head) trains a full copy of the module; PEFT keeps the
  original too, so the model holds both.
- `all-linear` is PEFT's shorthand: every `nn.Linear` of the decoder layers, not the output
  head (lm_head).
- Prefix tuning (PEFT, grouped-query attention aware): num_virtual_tokens x num_layers x 2 x
  (num_kv_heads x head_dim); with `prefix_projection`, an embedding of num_virtual_tokens x d
  plus the MLP d -> d -> num_layers x 2 x d (with biases), d = num_kv_heads x head_dim.
- Prompt tuning: num_virtual_tokens x hidden_size.
- Full fine-tuning: every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.v1alpha1.methods import Method
from kubetune.calc.architectures import Architecture, parameter_count

ALL_LINEAR = "all-linear"
LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear modules of a decoder layer, in order (what `all-linear` adapts)."""
MODEL_MODULES = ("embed_tokens", "lm_head")
"""Modules outside the layers that LoRA may adapt or `modules_to_save` may train in full."""


@dataclass(frozen=True)
class AdapterSettings:
    """What a parameter-efficient method trains.

    Attributes:
        rank: LoRA rank r.
        target_modules: module names LoRA adapts, or ("all-linear",).
        use_dora: weight-decomposed LoRA (adds a magnitude vector per adapted layer).
        modules_to_save: modules trained in full next to the adapter (embed_tokens, lm_head).
        dropout: LoRA dropout is above zero (each adapted input then keeps a mask and a copy
            for the backward pass; see memory.py).
        num_virtual_tokens: virtual tokens of prefix or prompt tuning.
        prefix_projection: prefix tuning through a two-layer MLP.
    """

    rank: int = 16
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    dropout: bool = True
    num_virtual_tokens: int = 20
    prefix_projection: bool = False


@dataclass(frozen=True)
class TrainableParams:
    """Trainable parameters of a method on an architecture, as PEFT counts them.

    Attributes:
        method: the tuning method.
        trainable: parameters that receive gradients.
        total: every parameter of the tuned model (base + adapter + saved-module copies), the
            denominator of PEFT's `print_trainable_parameters`.
        by_module: trainable parameters per module name, summed over layers.
    """

    method: Method
    trainable: int
    total: int
    by_module: tuple[tuple[str, int], ...] = ()

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0


def resolve_target_modules(target_modules: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Module names LoRA adapts: `all-linear` expands to every layer linear, in layer order.

    Raises:
        ValueError: an unknown module name; the message lists the known ones.
    """
    names: list[str] = []
    for name in target_modules:
        expanded = LAYER_MODULES if name.lower() == ALL_LINEAR else (name,)
        for module in expanded:
            if module not in LAYER_MODULES + MODEL_MODULES:
                known = ", ".join((ALL_LINEAR, *LAYER_MODULES, *MODEL_MODULES))
                raise ValueError(f"unknown target module {module!r}; known: {known}")
            if module not in names:
                names.append(module)
    order = LAYER_MODULES + MODEL_MODULES
    return tuple(sorted(names, key=order.index))


def _module_shape(arch: Architecture, module: str) -> tuple[int, int, int]:
    """(in, out, count in the model) of a module LoRA can adapt."""
    if module == "embed_tokens":
        return arch.vocab_size, arch.hidden_size, 1
    if module == "lm_head":
        return arch.hidden_size, arch.vocab_size, 1
    fan_in, fan_out = arch.linear_shapes()[module]
    return fan_in, fan_out, arch.num_layers


def saved_module_params(arch: Architecture, modules: tuple[str, ...]) -> int:
    """Parameters of the full copies that `modules_to_save` trains."""
    for module in modules:
        if module not in MODEL_MODULES:
            raise ValueError(f"modules_to_save supports {', '.join(MODEL_MODULES)}, not {module!r}")
    return len(set(modules)) * arch.vocab_size * arch.hidden_size


def lora_params_by_module(arch: Architecture, settings: AdapterSettings) -> dict[str, int]:
    """LoRA (and DoRA) parameters per adapted module name, summed over layers."""
    counts: dict[str, int] = {}
    for module in resolve_target_modules(settings.target_modules):
        fan_in, fan_out, count = _module_shape(arch, module)
        per_layer = settings.rank * (fan_in + fan_out)
        if settings.use_dora:
            per_layer += fan_out
        counts[module] = per_layer * count
    return counts


def prefix_params(arch: Architecture, num_virtual_tokens: int, *, projection: bool = False) -> int:
    """Prefix-tuning parameters, with PEFT's key/value width for grouped-query attention."""
    d = arch.kv_dim
    out = arch.num_layers * 2 * d
    if not projection:
        return num_virtual_tokens * out
    return num_virtual_tokens * d + (d * d + d) + (d * out + out)


def prompt_params(arch: Architecture, num_virtual_tokens: int) -> int:
    """Prompt-tuning parameters: one embedding per virtual token."""
    return num_virtual_tokens * arch.hidden_size


def trainable_params(
    arch: Architecture, method: Method, settings: AdapterSettings | None = None
) -> TrainableParams:
    """Trainable and total parameters of `method` on `arch`.

    Args:
        arch: the model.
        method: LoRA, QLoRA, Full, PrefixTuning or PromptTuning.
        settings: adapter settings (defaults: rank 16, all-linear, 20 virtual tokens).
    """
    settings = settings or AdapterSettings()
    base = parameter_count(arch)
    if method == Method.FULL:
        return TrainableParams(method, base, base, (("all", base),))
    if method in (Method.LORA, Method.QLORA):
        by_module = lora_params_by_module(arch, settings)
        saved_module_params(arch, settings.modules_to_save)  # validates the names
        for module in dict.fromkeys(settings.modules_to_save):
            by_module[f"{module} (saved)"] = arch.vocab_size * arch.hidden_size
        adapter = sum(by_module.values())
        return TrainableParams(method, adapter, base + adapter, tuple(by_module.items()))
    if method == Method.PREFIX_TUNING:
        n = prefix_params(arch, settings.num_virtual_tokens, projection=settings.prefix_projection)
        return TrainableParams(method, n, base + n, (("prefix_encoder", n),))
    n = prompt_params(arch, settings.num_virtual_tokens)
    return TrainableParams(method, n, base + n, (("prompt_encoder", n),))
