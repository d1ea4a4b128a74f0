"""The export stage: merged weights and quantized variants, each measured.

Merged weights come from the adapter and the unquantized base (Full fine-tuning already
produced them). Each `export.quantize` scheme is made from the merged weights with
llm-compressor, reloaded, and measured on the evaluation examples: perplexity and its
delta against the unquantized model, size, time. A scheme this machine cannot produce is
recorded as not produced, with the reason, in metrics.json and the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1.evaluation import ExportSpec, QuantScheme
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import ADAPTER_METHODS, Method
from kubetune.api.v1alpha1.training import TrainingSpec
from kubetune.storage import RunLayout
from kubetune.trainer import export, faults
from kubetune.trainer.resolve import ResolvedModel

Log = Callable[[str], None]


@dataclass
class ExportResult:
    """Folders to publish (local folder, run-relative prefix) and the `quantized`
    section of metrics.json."""

    folders: list[tuple[Path, str]] = field(default_factory=list)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    merged: dict[str, Any] | None = None
    """Size and perplexity of the unquantized merged model (the variants' reference)."""


def wants_merged_weights(spec: FineTuneJobSpec) -> bool:
    """Merged weights are needed for export.merge and for every quantized variant."""
    exported = spec.export or ExportSpec()
    return spec.method in ADAPTER_METHODS and (exported.merge or bool(exported.quantize))


def run_export(
    spec: FineTuneJobSpec,
    resolved: ResolvedModel,
    trained_dir: Path,
    tokenizer: Any,
    *,
    work_dir: Path,
    dtype_name: str,
    calibration: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    adapter_perplexity: float | None,
    log: Log,
) -> ExportResult:
    """Merge (when asked or needed) and quantize; returns what to publish."""
    exported = spec.export or ExportSpec()
    training = spec.training or TrainingSpec()
    result = ExportResult()
    merged_dir: Path | None = trained_dir if spec.method == Method.FULL else None
    if wants_merged_weights(spec):
        log("Merging the adapter into the base weights")
        merged_dir = export.merge_adapter(
            resolved, trained_dir, tokenizer, work_dir / "merged", dtype_name, training.seed
        )
        if exported.merge:
            result.folders.append((merged_dir, RunLayout.MERGED))
        faults.reach("export", 0)
    if not exported.quantize or merged_dir is None:
        return result
    from kubetune.trainer import quantize

    # The reference is the merged model itself, measured like the variants (merging in
    # bf16 rounds the weights: the adapter-on-base perplexity is not the same number).
    reference_perplexity = _perplexity(merged_dir, tokenizer, examples, training.batch_size)
    result.merged = {
        "sizeBytes": quantize.safetensors_bytes(merged_dir),
        "perplexity": reference_perplexity,
    }
    log(f"Merged model: perplexity {reference_perplexity:.4f} (the quantized variants' reference)")
    drift = merge_drift(reference_perplexity, adapter_perplexity)
    if drift is not None:
        result.merged["adapterPerplexity"] = adapter_perplexity
        log(drift)
    for index, scheme in enumerate(exported.quantize, start=1):
        try:
            variant = quantize.quantize(
                merged_dir,
                scheme,
                calibration,
                merged_dir,
                work_dir / "quantized" / scheme.value,
                calibration_samples=exported.calibration_samples,
                group_size=exported.group_size,
                max_seq_length=training.max_seq_length,
                log=log,
            )
            measured = quantize.evaluate_variant(
                variant.folder, examples, tokenizer, training.batch_size, log=log
            )
        except quantize.SchemeUnavailable as exc:
            log(f"{scheme.value} not produced: {exc.why}")
            result.quantized[scheme.value] = {"scheme": scheme.value, "skipped": exc.why}
            continue
        result.quantized[scheme.value] = _variant_summary(
            scheme, variant.summary(), measured, reference_perplexity
        )
        log(f"{scheme.value}: {_describe(result.quantized[scheme.value])}")
        result.folders.append((variant.folder, f"{RunLayout.QUANTIZED}{scheme.value}/"))
        faults.reach("export", index)
    return result


MERGE_TOLERANCE = 0.02
"""Relative perplexity difference between the merged model and base + adapter above which
the run warns."""


def merge_drift(merged: float, adapter: float | None) -> str | None:
    """A warning when the merged model does not score what base + adapter scored."""
    if adapter is None or abs(merged - adapter) <= MERGE_TOLERANCE * adapter:
        return None
    return (
        f"Warning: the merged model's perplexity ({merged:.4f}) differs from base + adapter's "
        f"({adapter:.4f}) by {100 * (merged - adapter) / adapter:+.1f} %: storing the merged "
        "weights in bf16 rounds away part of the adapter's updates (typical after very few "
        "steps or a low learning rate). adapter/ is exact: serve it as a LoRA adapter, or "
        "train longer before merging"
    )


def _variant_summary(
    scheme: QuantScheme,
    made: dict[str, Any],
    measured: dict[str, Any],
    reference: float,
) -> dict[str, Any]:
    perplexity = float(measured["Perplexity"])
    return {
        **made,
        "perplexity": perplexity,
        "referencePerplexity": reference,
        "perplexityDelta": perplexity - reference,
        "sample": str(measured.get("Sample", ""))[:200],
    }


def _describe(summary: dict[str, Any]) -> str:
    return (
        f"{summary['sizeBytes'] / 1e6:.0f} MB, perplexity {summary['perplexity']:.3f} "
        f"({summary['perplexityDelta']:+.3f} against the unquantized model)"
    )


def _perplexity(
    folder: Path, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int
) -> float:
    """Perplexity of the unquantized merged model (when evaluation did not measure it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.evaluate import eval_loss

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    if torch.cuda.is_available():
        model.to("cuda")  # type: ignore[arg-type]
    return math.exp(min(eval_loss(model, tokenizer, examples, batch_size), 50.0))
