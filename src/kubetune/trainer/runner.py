"""Running the pipeline as a process: config in, result and exit code out.

Every failure is mapped to the contract's reason and exit code (user errors fail fast,
out-of-memory fails with advice, infrastructure errors are retried by the operator), and
the TrainerResult is written on success and on failure.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune.api.contract import Reason, TrainerConfig, TrainerResult, exit_code_for

Log = Callable[[str], None]
logger = logging.getLogger("kubetune.trainer")


def load_config(path: Path) -> TrainerConfig:
    """A TrainerConfig from YAML or JSON (validated; unknown keys refused)."""
    return TrainerConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def write_result(result: TrainerResult, path: Path | None) -> None:
    """The result as the termination message (skipped when the file cannot be written)."""
    if path is None:
        return
    try:
        path.write_text(result.to_termination_message(), encoding="utf-8")
    except OSError as exc:
        logger.warning("Could not write the result to %s: %s", path, exc)


def _failure(reason: Reason, message: str) -> TrainerResult:
    """A failed result; credentials quoted by a library or server are scrubbed first."""
    from kubetune.storage.errors import redact

    return TrainerResult(reason=reason, message=redact(message)[:1024])


def _field(location: tuple[int | str, ...]) -> str:
    """A pydantic error location as the API names fields: `spec.evaluation.gate[0].metric`
    (pydantic's own validator parts left out)."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith("function-"):
            path += f".{part}" if path else str(part)
    return path


def _quiet_library_progress() -> None:
    """No per-file progress bars from transformers (loading and writing shards flood the
    log); model downloads from the Hub keep theirs. bitsandbytes' notice that its optional
    CPU kernels package is missing (it falls back to its own code) is not shown."""
    from huggingface_hub.utils import enable_progress_bars  # type: ignore[attr-defined]
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    enable_progress_bars()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def execute(config: TrainerConfig, work_dir: Path, log: Log, metrics_port: int) -> TrainerResult:
    """Run the pipeline; every known failure becomes a result with its reason."""
    import torch

    from kubetune.trainer.pipeline import run_pipeline

    _quiet_library_progress()
    try:
        return run_pipeline(config, work_dir=work_dir, log=log, metrics_port=metrics_port)
    except torch.OutOfMemoryError as exc:
        return _failure(
            Reason.OUT_OF_MEMORY,
            f"out of GPU memory ({exc}); lower training.batchSize or training.maxSeqLength, "
            "enable training.gradientCheckpointing, use method QLoRA, or more GPUs "
            "(kubetune calc shows the estimate)",
        )
    except MemoryError:
        return _failure(
            Reason.OUT_OF_MEMORY,
            "out of host memory; raise resources.memory or lower training.batchSize",
        )
    except Exception as exc:
        reason = getattr(exc, "reason", None)
        if isinstance(reason, Reason):
            return _failure(reason, str(exc))
        from kubetune.storage.errors import redact

        log(redact(traceback.format_exc()))
        return _failure(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


def exit_code(result: TrainerResult) -> int:
    """0 when the pipeline ran to the end (gate failed or not), else the table's code."""
    if result.reason in (Reason.SUCCEEDED, Reason.EVALUATION_GATE_FAILED):
        return 0
    return exit_code_for(result.reason)


def _reports(result: TrainerResult) -> bool:
    """Whether this process writes the pod's result: the only process, the first one of a
    pod running several (torchrun), or any that failed (its reason is the one to see)."""
    from kubetune.trainer.distributed import topology

    return topology().local_rank == 0 or exit_code(result) != 0


class RedactingFilter(logging.Filter):
    """Scrubs credential values (`kubetune.storage.errors.SECRET_ENV_VARS`) from every log
    record, whoever logs it: a library may quote a URL or a header with a token in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kubetune.storage.errors import redact

        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def run_from_file(config_path: Path, result_path: Path, work_dir: Path) -> int:
    """The pod's main: validate the config before importing torch, run, report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    try:
        config = load_config(config_path)
    except ValidationError as exc:
        problems = "; ".join(f"{_field(error['loc'])}: {error['msg']}" for error in exc.errors())
        result = _failure(Reason.INVALID_SPEC, f"{config_path}: {problems}")
        write_result(result, result_path)
        print(result.message, file=sys.stderr)
        return exit_code(result)
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        result = _failure(
            Reason.INVALID_SPEC,
            f"{config_path}: not a valid YAML or JSON TrainerConfig (the operator and "
            f"`kubetune run` render it): regenerate it, or fix its syntax ({detail})",
        )
        write_result(result, result_path)
        print(result.message, file=sys.stderr)
        return exit_code(result)
    result = execute(config, work_dir, lambda line: logger.info("%s", line), config.metrics_port)
    if _reports(result):
        write_result(result, result_path)
    (logger.info if exit_code(result) == 0 else logger.error)(
        "%s: %s", result.reason.value, result.message
    )
    return exit_code(result)
