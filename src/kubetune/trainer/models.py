"""Loading the base model for training and wrapping it for the chosen method.

The only module that builds `BitsAndBytesConfig` and PEFT configs (HOUSE_STYLE §3): the
API's names (LoRA, QLoRA, PrefixTuning, …) are translated here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import (
    ComputeDtype,
    LoRASpec,
    Method,
    PrefixTuningSpec,
    PromptTuningInit,
    PromptTuningSpec,
    QLoRASpec,
    QuantType,
)
from kubetune.api.v1alpha1.training import Precision, Toggle, TrainingSpec
from kubetune.trainer.resolve import ResolvedModel, build_random_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kubetune.calc.memory import TrainingSetup


class TrainingSetupError(Exception):
    """The method cannot run here (e.g. QLoRA without bitsandbytes); carries a reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Precisions:
    """The dtypes a run uses."""

    load: torch.dtype
    """Dtype of the frozen (or trained, for Full) weights."""

    bf16: bool
    """Mixed precision autocast in bf16."""

    fp16: bool
    """Mixed precision autocast in fp16 (with loss scaling)."""


def choose_precision(
    training: TrainingSpec, method: Method, cuda: bool, bf16_supported: bool
) -> Precisions:
    """BF16 on GPUs that have it, else FP32 (Auto); explicit choices are honoured. Frozen
    weights load in the half precision; full fine-tuning keeps fp32 master weights."""
    import torch

    wanted = training.precision
    if wanted == Precision.AUTO:
        wanted = Precision.BF16 if cuda and bf16_supported else Precision.FP32
    if wanted in (Precision.BF16, Precision.FP16) and not cuda:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            f"training.precision {wanted.value} needs a GPU; this machine has none: use Auto "
            "or FP32",
        )
    if wanted == Precision.BF16 and not bf16_supported:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            "training.precision BF16 needs an Ampere or newer GPU; use FP16 or Auto",
        )
    load = torch.float32
    if method != Method.FULL and wanted == Precision.BF16:
        load = torch.bfloat16
    elif method != Method.FULL and wanted == Precision.FP16:
        load = torch.float16
    return Precisions(load=load, bf16=wanted == Precision.BF16, fp16=wanted == Precision.FP16)


@dataclass(frozen=True)
class Checkpointing:
    """Gradient checkpointing as the trainer applies it."""

    every_n_layers: int = 0
    """0: off; n: decoder layers 0, n, 2n, ... recompute their activations (1: every layer;
    transformers' `every_n_layers`)."""

    reason: str = ""

    offload: bool = False
    """The checkpointed layers' inputs wait in pinned host memory (transformers' `offload`)."""

    offload_reason: str = ""

    @property
    def enabled(self) -> bool:
        return self.every_n_layers > 0

    def trainer_kwargs(self) -> dict[str, Any] | None:
        """The Trainer's `gradient_checkpointing_kwargs`."""
        if not self.enabled:
            return None
        kwargs: dict[str, Any] = {"use_reentrant": False, "every_n_layers": self.every_n_layers}
        if self.offload:
            kwargs["offload"] = True
        return kwargs

    def describe(self) -> str:
        if not self.enabled:
            return f"off ({self.reason})"
        n = self.every_n_layers
        which = "every layer" if n == 1 else f"every {n}{_ordinal_suffix(n)} layer"
        return f"on, {which} ({self.reason})"

    def describe_offload(self) -> str:
        return f"{'on' if self.offload else 'off'} ({self.offload_reason})"


def _ordinal_suffix(n: int) -> str:
    """'st', 'nd', 'rd' or 'th': 2nd, 3rd, 11th, 21st."""
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def gradient_checkpointing(
    spec: FineTuneJobSpec, cuda: bool, planned: TrainingSetup | None = None
) -> Checkpointing:
    """Enabled: every layer; Disabled: off. Auto is what the memory preflight planned
    (`planned`: its TrainingSetup): off when the step fits without it, else the fewest
    checkpointed layers that fit. Without a plan (an architecture the calculator does not
    know, or a CPU whose available memory is unknown) it is every layer on GPUs and off on
    CPUs (speed). Prefix tuning never uses it (PEFT's prefix tuning fails with it).
    Activation offload follows `activation_offload`."""
    plan = _checkpointing(spec, cuda, planned)
    offload, why = activation_offload(spec, cuda, plan, planned)
    return replace(plan, offload=offload, offload_reason=why)


def activation_offload(
    spec: FineTuneJobSpec, cuda: bool, plan: Checkpointing, planned: TrainingSetup | None
) -> tuple[bool, str]:
    """Whether the checkpointed layers' inputs wait in host memory, and why: Enabled and
    Disabled as set, Auto as the memory preflight planned; never without checkpointing or
    a GPU (a CPU run's activations are in host memory already)."""
    toggle = (spec.training or TrainingSpec()).activation_offload
    if not plan.enabled:
        return False, "no layer is checkpointed"
    if not cuda:
        return False, "a CPU run keeps its activations in host memory already"
    if toggle == Toggle.ENABLED:
        return True, "training.activationOffload is Enabled"
    if toggle == Toggle.DISABLED:
        return False, "training.activationOffload is Disabled"
    if planned is not None and planned.offload_activations:
        return True, "Auto: the step fits in GPU memory only with it"
    return False, "Auto: not needed to fit in GPU memory"


def _checkpointing(
    spec: FineTuneJobSpec, cuda: bool, planned: TrainingSetup | None
) -> Checkpointing:
    toggle = (spec.training or TrainingSpec()).gradient_checkpointing
    if spec.method == Method.PREFIX_TUNING:
        return Checkpointing(0, "prefix tuning trains without it")
    if toggle == Toggle.ENABLED:
        return Checkpointing(1, "training.gradientCheckpointing is Enabled")
    if toggle == Toggle.DISABLED:
        return Checkpointing(0, "training.gradientCheckpointing is Disabled")
    if planned is None:
        if not cuda:
            return Checkpointing(0, "Auto on a CPU without a memory estimate")
        return Checkpointing(1, "Auto without a memory estimate")
    memory = "GPU memory" if cuda else "the memory available"
    if not planned.gradient_checkpointing:
        return Checkpointing(0, f"Auto: the step fits in {memory} without it")
    every = max(planned.checkpoint_every, 1)
    if every == 1:
        return Checkpointing(1, f"Auto: the step needs it on every layer to fit in {memory}")
    return Checkpointing(every, f"Auto: the fewest checkpointed layers that fit in {memory}")


def _bnb_config(qlora: QLoRASpec) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            "method QLoRA needs bitsandbytes (pip install 'kubetune[qlora]'); the trainer "
            "image ships it",
        ) from exc
    compute = {
        ComputeDtype.BF16: torch.bfloat16,
        ComputeDtype.FP16: torch.float16,
        ComputeDtype.FP32: torch.float32,
    }[qlora.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4" if qlora.quant_type == QuantType.NF4 else "fp4",
        bnb_4bit_use_double_quant=qlora.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def load_base_model(
    spec: FineTuneJobSpec,
    resolved: ResolvedModel,
    precisions: Precisions,
    seed: int,
    work_dir: Path,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """The base model, quantized to 4 bits for QLoRA, random for builtin://random, with the
    attention implementation `fastpath.choose_attention` picked."""
    import torch
    from transformers import AutoModelForCausalLM

    # On the GPU from the start: the base model is measured before training, and the CPU
    # would take minutes for what the GPU does in seconds.
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    path = resolved.path
    if resolved.random_weights:
        # Created where they will be used: an 8B model takes a minute to initialize on CPUs.
        if spec.method != Method.QLORA:
            model = build_random_model(resolved.path, seed, precisions.load, device=device)
            model.set_attn_implementation(attn_implementation)
            return model
        # bitsandbytes quantizes while loading: write the random weights once, load them 4-bit.
        path = work_dir / "random-weights"
        if not (path / "config.json").is_file():
            random_model = build_random_model(resolved.path, seed, precisions.load, device=device)
            random_model.save_pretrained(str(path), safe_serialization=True)
            del random_model
            if cuda:
                torch.cuda.empty_cache()
    kwargs: dict[str, Any] = resolved.from_pretrained_kwargs()
    if spec.method == Method.QLORA:
        kwargs["quantization_config"] = _bnb_config(spec.qlora or QLoRASpec())
    else:
        kwargs["dtype"] = precisions.load
    if device is not None:
        kwargs["device_map"] = {"": device.index}
    kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def undo_cpu_inference_packing(model: PreTrainedModel) -> int:
    """Give 4-bit weights back their training layout after CPU inference.

    bitsandbytes repacks 4-bit weights for fast CPU inference the first time a Linear4bit
    runs in eval mode without gradients (the base-model evaluation), and never unpacks them
    for training: the backward pass would then go through a kernel without autograd and
    silently drop the gradients of every earlier layer. Returns how many were unpacked.
    """
    try:
        from bitsandbytes.nn.modules import (  # type: ignore[attr-defined]
            Linear4bit,
            _convert_weight_packed_for_cpu_inverse,
        )
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        state: Any = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, Linear4bit) and getattr(state, "packing_format_for_cpu", False):
            weight: Any = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, state
            )
            count += 1
    return count


def _target_modules(lora: LoRASpec) -> str | list[str]:
    return "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)


def peft_config(spec: FineTuneJobSpec, tokenizer_dir: str) -> Any:
    """The PEFT config for the method, or None for full fine-tuning."""
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        TaskType,
    )
    from peft import (
        PromptTuningInit as PeftInit,
    )

    if spec.method in (Method.LORA, Method.QLORA):
        lora = spec.lora or LoRASpec()
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=parse_decimal(lora.dropout),
            target_modules=_target_modules(lora),
            modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            task_type=TaskType.CAUSAL_LM,
        )
    if spec.method == Method.PREFIX_TUNING:
        prefix = spec.prefix_tuning or PrefixTuningSpec()
        return PrefixTuningConfig(
            num_virtual_tokens=prefix.num_virtual_tokens,
            prefix_projection=prefix.prefix_projection,
            task_type=TaskType.CAUSAL_LM,
        )
    if spec.method == Method.PROMPT_TUNING:
        prompt = spec.prompt_tuning or PromptTuningSpec()
        text = prompt.init == PromptTuningInit.TEXT
        return PromptTuningConfig(
            num_virtual_tokens=prompt.num_virtual_tokens,
            prompt_tuning_init=PeftInit.TEXT if text else PeftInit.RANDOM,
            prompt_tuning_init_text=prompt.init_text if text else None,
            tokenizer_name_or_path=tokenizer_dir if text else None,
            task_type=TaskType.CAUSAL_LM,
        )
    return None


def prepare_model(
    spec: FineTuneJobSpec,
    model: PreTrainedModel,
    tokenizer_dir: str,
    *,
    checkpointing: Checkpointing,
) -> PreTrainedModel:
    """Wrap the base model for the method; returns the model to train.

    QLoRA is prepared like PEFT's `prepare_model_for_kbit_training` (frozen base, input
    gradients for checkpointing) without its upcast of every unquantized weight to fp32:
    under autocast the embeddings, norms and LM head compute in bf16 anyway, and on an 8B
    model the fp32 copies would cost 2 GiB.
    """
    from peft import get_peft_model

    if spec.method == Method.QLORA:
        for param in model.parameters():
            param.requires_grad = False
    if checkpointing.enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.method != Method.FULL:
            model.enable_input_require_grads()
    config = peft_config(spec, tokenizer_dir)
    if config is None:
        return model
    return get_peft_model(model, config)


def trainable_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def tokenizer_for(resolved: ResolvedModel, spec: FineTuneJobSpec) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat template the data stage used."""
    from kubetune.trainer.resolve import chat_template_override, load_tokenizer

    return load_tokenizer(
        resolved.path,
        trust_remote_code=resolved.trust_remote_code,
        chat_template=chat_template_override(spec.dataset.chat_template),
    )


def load_trained(
    spec: FineTuneJobSpec,
    resolved: ResolvedModel,
    trained_dir: Path,
    precisions: Precisions,
    seed: int,
    work_dir: Path,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """The trained model read back from its saved folder (the adapter on a fresh base, or
    the full weights), on the GPU when there is one: how rank 0 continues alone after a
    run on several GPUs, whose in-memory model is sharded across processes."""
    import torch

    model: Any
    if spec.method == Method.FULL:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(trained_dir), dtype=precisions.load, attn_implementation=attn_implementation
        )
    else:
        from peft import PeftModel

        base = load_base_model(
            spec, resolved, precisions, seed, work_dir, attn_implementation=attn_implementation
        )
        model = PeftModel.from_pretrained(base, str(trained_dir))
    if torch.cuda.is_available() and spec.method != Method.QLORA:
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    model.eval()
    return model
