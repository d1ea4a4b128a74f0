"""The operator <-> trainer contract: strict config, a result that fits 4 KiB, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api.contract import (
    EXIT_CODES,
    TERMINATION_MESSAGE_LIMIT,
    FailureClass,
    Reason,
    TrainerConfig,
    TrainerResult,
    classify_exit,
    codes_of,
    exit_code_for,
)

EXAMPLES = Path(__file__).parents[2] / "examples"


def _config(**overrides: object) -> dict[str, object]:
    spec = yaml.safe_load((EXAMPLES / "finetunejob-lora.yaml").read_text())["spec"]
    config: dict[str, object] = {
        "schemaVersion": 1,
        "run": {
            "namespace": "ml-team",
            "jobName": "support-bot-lora",
            "runId": "3f2a9c1d0b7e",
            "outputUri": "s3://ml-artifacts/kubetune",
        },
        "spec": spec,
    }
    config.update(overrides)
    return config


def test_trainer_config_accepts_an_example_spec() -> None:
    config = TrainerConfig.model_validate(_config())
    assert config.spec.method.value == "LoRA"
    assert config.run.run_id == "3f2a9c1d0b7e"


def test_trainer_config_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError, match=r"Extra inputs"):
        TrainerConfig.model_validate(_config(surprise=True))


def test_trainer_config_refuses_unknown_schema_version() -> None:
    with pytest.raises(ValidationError, match="schemaVersion"):
        TrainerConfig.model_validate(_config(schemaVersion=2))


def test_maximal_result_fits_the_termination_message() -> None:
    result = TrainerResult(
        reason=Reason.EVALUATION_GATE_FAILED,
        message="x" * 1024,
        run_uri="s3://" + "b" * 1019,
        manifest_digest="sha256:" + "f" * 64,
        gate_passed=False,
        metrics={f"metric-{i:02d}-" + "k" * 22: "9" * 24 for i in range(16)},
        step=2**62,
        resumed_from_step=2**62,
    )
    text = result.to_termination_message()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert TrainerResult.model_validate_json(text) == result


def test_result_bounds_are_enforced() -> None:
    with pytest.raises(ValidationError):
        TrainerResult(reason=Reason.SUCCEEDED, message="x" * 1025)
    with pytest.raises(ValidationError):
        TrainerResult(reason=Reason.SUCCEEDED, metrics={str(i): "1" for i in range(17)})


def test_exit_codes_are_unique_and_classified() -> None:
    codes = [row.code for row in EXIT_CODES]
    assert len(codes) == len(set(codes))
    assert 0 not in codes
    assert all(0 < c < 128 for c in codes)
    assert codes_of(FailureClass.OUT_OF_MEMORY) == [exit_code_for(Reason.OUT_OF_MEMORY)]
    assert exit_code_for(Reason.INVALID_SPEC) in codes_of(FailureClass.USER)
    assert exit_code_for(Reason.PREEMPTED) in codes_of(FailureClass.INFRASTRUCTURE)


def test_unknown_exit_code_is_retried_as_infrastructure() -> None:
    assert classify_exit(139).failure_class == FailureClass.INFRASTRUCTURE
    assert classify_exit(13).reason == Reason.SOURCE_NOT_FOUND
