"""Quantized variants of the merged model: compressed-tensors checkpoints that vLLM loads.

The only module that calls llm-compressor (HOUSE_STYLE §3); `quant_schemes` says what each
scheme's recipe is. W4A16 and W8A8 calibrate on the first `export.calibrationSamples`
training examples, rendered with the chat template; FP8 needs no data. The merged folder is
only read: quantizing works on an in-memory copy and writes `out_dir`. `evaluate_variant`
reloads a variant with transformers and measures it like the tuned model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import ExportSpec, QuantScheme
from kubetune.trainer.export import ExportError
from kubetune.trainer.quant_schemes import (
    GROUP_SIZES,
    UNQUANTIZED,
    Recipe,
    calibration_text,
    check_checkpoint,
    resolve_group_size,
    scheme_of,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Log = Callable[[str], None]


class SchemeUnavailable(Exception):
    """A scheme that cannot be produced or checked on this machine; the pipeline records
    the variant as not produced, with `why`, instead of failing the run."""

    def __init__(self, scheme: QuantScheme, why: str) -> None:
        super().__init__(f"{scheme.value} not produced: {why}")
        self.scheme = scheme
        self.why = why


@dataclass(frozen=True)
class QuantizedVariant:
    """One quantized checkpoint and how it was made."""

    scheme: QuantScheme
    folder: Path
    size_bytes: int
    """Bytes of the safetensors files."""
    seconds: float
    """Wall time of loading, calibrating, quantizing and saving."""
    recipe: str
    """`Recipe.describe()`."""
    format: str
    """compressed-tensors format from config.json, e.g. pack-quantized."""
    group_size: int | None
    calibration_samples: int
    """Examples actually used (0 for FP8)."""

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields for the manifest and the report."""
        return {
            "scheme": self.scheme.value,
            "sizeBytes": self.size_bytes,
            "seconds": round(self.seconds, 1),
            "recipe": self.recipe,
            "format": self.format,
            "groupSize": self.group_size,
            "calibrationSamples": self.calibration_samples,
        }


def linear_in_features(model: torch.nn.Module) -> dict[str, int]:
    """Input dimension of every Linear layer a scheme quantizes (all but `UNQUANTIZED`)."""
    import torch

    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in UNQUANTIZED
    }


def model_in_features(model_dir: Path) -> dict[str, int]:
    """`linear_in_features` of a saved model, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_in_features(model)


def check_quantize_spec(export: ExportSpec, model_dir: Path) -> None:
    """Refuse, before training, an export.quantize this trainer or model cannot produce."""
    if not export.quantize:
        return
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is None:
        raise ExportError(
            Reason.INVALID_SPEC,
            "export.quantize needs llm-compressor, which this trainer image lacks; use an "
            "image built with the quant extra (pip install 'kubetune[quant]') or remove it",
        )
    if QuantScheme.W4A16 in export.quantize:
        resolve_group_size(export.group_size, model_in_features(model_dir))


# Calibration data.


def calibration_dataset(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    count: int,
    max_seq_length: int,
) -> Any:
    """The first `count` examples, tokenized and truncated, as a local `datasets.Dataset`."""
    from datasets import Dataset

    encoded = [
        tokenizer(
            calibration_text(tokenizer, e),
            add_special_tokens=False,
            truncation=True,
            max_length=max_seq_length,
        )
        for e in examples[:count]
    ]
    return Dataset.from_dict(
        {
            "input_ids": [list(e["input_ids"]) for e in encoded],
            "attention_mask": [list(e["attention_mask"]) for e in encoded],
        }
    )


# Hardware.


def unavailable_reason(scheme: QuantScheme, device: str) -> str | None:
    """Why `scheme`'s tensors cannot be handled on `device`, or None when they can.

    FP8 checkpoints need torch's float8_e4m3fn dtype and casts to and from it on the
    device (quantizing casts, and transformers dequantizes to evaluate); the integer
    schemes need only integer tensors, which every device has.
    """
    if scheme != QuantScheme.FP8:
        return None
    import torch

    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        return f"torch {torch.__version__} has no float8_e4m3fn dtype"
    try:
        probe = torch.linspace(-2.0, 2.0, 16, device=device).to(dtype).to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return f"fp8 casts fail on {device}: {exc}"
    if not bool(torch.isfinite(probe).all()):
        return f"fp8 casts on {device} give non-finite values"
    return None


# llm-compressor.


_LOG_DISABLED = "LLM_COMPRESSOR_LOG_DISABLED"
_NOISE = (
    "No accelerator available",
    "Disabling tokenizer parallelism",
    "Running oneshot without calibration data",
    # The sequential pipeline marks layers as offloaded to the CPU, where they already are.
    "Attempting to save a model with offloaded modules",
)
"""Library warnings that say nothing the job's own log lines do not."""


def _import_llmcompressor() -> None:
    """Import llm-compressor without its import-time output: on import it replaces every
    loguru handler with one printing INFO to stdout and warns that no GPU is present."""
    if "llmcompressor" in sys.modules:
        return
    saved = os.environ.get(_LOG_DISABLED)
    os.environ[_LOG_DISABLED] = "true"
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import llmcompressor.modifiers.quantization
            import llmcompressor.modifiers.transform  # noqa: F401
    finally:
        if saved is None:
            del os.environ[_LOG_DISABLED]
        else:
            os.environ[_LOG_DISABLED] = saved


@contextlib.contextmanager
def _library_output(log: Log) -> Iterator[None]:
    """Warnings and errors of llm-compressor, compressed-tensors and Python's warnings
    module go to `log`, each once; INFO lines, per-layer GPTQ metrics and progress bars
    are dropped. The LLM_COMPRESSOR_LOG_* environment variables still apply."""
    _import_llmcompressor()
    from llmcompressor import LoggerConfig, configure_logger
    from loguru import logger

    configure_logger(LoggerConfig(console_log_level=None))
    seen: set[str] = set()

    def report(level: str, message: str) -> None:
        text = " ".join(message.split())
        if text and text not in seen and not text.startswith(_NOISE):
            seen.add(text)
            log(f"llm-compressor {level}: {text}")

    def keep(record: Any) -> bool:
        name = record["name"] or ""
        return record["level"].name != "METRIC" and name.startswith(
            ("llmcompressor", "compressed_tensors")
        )

    def sink(message: Any) -> None:
        report(message.record["level"].name.lower(), str(message.record["message"]))

    handler = logger.add(sink, level="WARNING", filter=keep, format="{message}")
    # llm-compressor traces each decoder layer with torch.fx, which warns about an API of
    # its own that kubetune does not use.
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    fx_level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    caught: list[warnings.WarningMessage] = []
    try:
        with (
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            yield
    finally:
        logger.remove(handler)
        fx_log.setLevel(fx_level)
        for warning in caught:
            report("warning", str(warning.message))


def build_modifiers(recipe: Recipe) -> list[Any]:
    """The llm-compressor modifier objects of a recipe."""
    _import_llmcompressor()
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant.base import SmoothQuantModifier

    built: list[Any] = []
    for kind, args in recipe.modifiers():
        if kind == "SmoothQuantModifier":
            built.append(SmoothQuantModifier(smoothing_strength=args["smoothing_strength"]))
        elif kind == "GPTQModifier" and "group_size" in args:
            scheme = preset_name_to_scheme(args["preset"], ["Linear"])
            assert scheme.weights is not None
            scheme.weights = scheme.weights.model_copy(update={"group_size": args["group_size"]})
            built.append(GPTQModifier(config_groups={"group_0": scheme}, ignore=args["ignore"]))
        elif kind == "GPTQModifier":
            built.append(
                GPTQModifier(targets="Linear", scheme=args["preset"], ignore=args["ignore"])
            )
        else:
            built.append(
                QuantizationModifier(targets="Linear", scheme=args["preset"], ignore=args["ignore"])
            )
    return built


def safetensors_bytes(folder: Path) -> int:
    """Total size of a folder's safetensors files."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def quantize(
    merged_dir: Path,
    scheme: QuantScheme,
    calibration: list[dict[str, Any]],
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    calibration_samples: int,
    group_size: int | None,
    max_seq_length: int,
    log: Log,
) -> QuantizedVariant:
    """Quantize the merged model with `scheme` into `out_dir` (compressed-tensors, with the
    tokenizer and generation config); `merged_dir` is left untouched.

    Raises:
        SchemeUnavailable: this machine cannot handle the scheme's tensors.
        ExportError: export.groupSize does not fit the model, calibration examples are
            missing, or the saved checkpoint is not a compressed-tensors one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    why = unavailable_reason(scheme, device)
    if why:
        raise SchemeUnavailable(scheme, why)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with _library_output(log):
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
    recipe = Recipe(
        scheme,
        resolve_group_size(group_size, linear_in_features(model))
        if scheme == QuantScheme.W4A16
        else None,
    )
    if recipe.group_size is not None and recipe.group_size not in GROUP_SIZES:
        log(
            f"Note: vLLM's 4-bit GPU kernel (Marlin) supports group sizes "
            f"{', '.join(map(str, GROUP_SIZES))}; with {recipe.group_size} vLLM may refuse "
            "the W4A16 checkpoint or fall back to a slower kernel"
        )
    dataset_args: dict[str, Any] = {}
    used = 0
    if recipe.calibrated:
        used = min(calibration_samples, len(calibration))
        if used == 0:
            raise ExportError(
                Reason.DATASET_EMPTY,
                f"export.quantize {scheme.value} calibrates on training examples, but there "
                "are none",
            )
        dataset_args = {
            "dataset": calibration_dataset(tokenizer, calibration, used, max_seq_length),
            "num_calibration_samples": used,
            "max_seq_length": max_seq_length,
            "shuffle_calibration_samples": False,
        }
    calibrated = f" on {used} calibration examples" if used else ""
    log(f"Quantizing to {scheme.value} ({recipe.describe()}){calibrated} on {device}")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    modifiers = build_modifiers(recipe)
    from llmcompressor.entrypoints.oneshot import oneshot

    try:
        with _library_output(log):
            oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **dataset_args)
            model.save_pretrained(str(partial), save_compressed=True)
        tokenizer.save_pretrained(str(partial))
        fmt = check_checkpoint(partial, recipe)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    variant = QuantizedVariant(
        scheme=scheme,
        folder=out_dir,
        size_bytes=safetensors_bytes(out_dir),
        seconds=time.monotonic() - started,
        recipe=recipe.describe(),
        format=fmt,
        group_size=recipe.group_size,
        calibration_samples=used,
    )
    log(
        f"Quantized {scheme.value} in {variant.seconds:.0f} s: "
        f"{variant.size_bytes / 1e6:.0f} MB (merged: {safetensors_bytes(merged_dir) / 1e6:.0f} MB)"
    )
    return variant


def smoke_prompt(tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]]) -> str:
    """A prompt for the generation check: the first conversation's question."""
    for example in examples:
        if "messages" in example and len(example["messages"]) > 1:
            return str(
                tokenizer.apply_chat_template(
                    example["messages"][:-1], tokenize=False, add_generation_prompt=True
                )
            )
    return "The capital of France is"


def evaluate_variant(
    out_dir: Path,
    examples: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    device: str | None = None,
    new_tokens: int = 8,
    log: Log | None = None,
) -> dict[str, Any]:
    """Reload a quantized variant with transformers and measure it on `examples`.

    transformers keeps the weights compressed and compressed-tensors decompresses them on
    the first forward pass; activations are quantized as the scheme says (per token,
    dynamically), so the numbers include the activation rounding of W8A8 and FP8.

    Returns:
        Perplexity, EvalLoss (as in evaluation), Sample (a few greedy tokens) and
        Seconds (load and measure).

    Raises:
        SchemeUnavailable: this machine cannot run the variant.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.evaluate import eval_loss

    started = time.monotonic()
    scheme = scheme_of(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    why = unavailable_reason(scheme, device)
    if why:
        raise SchemeUnavailable(scheme, why)
    with _library_output(log or (lambda _: None)):
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(out_dir))
        model.to(device)  # type: ignore[arg-type]
        loss = eval_loss(model, tokenizer, examples, batch_size)
        inputs = tokenizer(
            smoke_prompt(tokenizer, examples), return_tensors="pt", add_special_tokens=False
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            output = model.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
    new = output[0, inputs["input_ids"].shape[1] :]
    if len(new) == 0:
        raise ExportError(Reason.INTERNAL_ERROR, f"the {scheme.value} variant generated no token")
    return {
        "Perplexity": math.exp(min(loss, 50.0)),
        "EvalLoss": loss,
        "Sample": tokenizer.decode(new, skip_special_tokens=True),
        "Seconds": time.monotonic() - started,
    }
