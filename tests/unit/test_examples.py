"""The examples are documentation and fixtures: every one must be valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob, ModelDeployment
from kubetune.api.validation import validate_manifest
from kubetune.cli import main

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
REQUIRED = {
    "quickstart",
    "finetunejob-lora",
    "finetunejob-qlora",
    "finetunejob-full",
    "finetunejob-prefix",
    "finetunejob-prompt",
    "finetunejob-dpo",
    "finetunejob-rlhf",
    "finetunejob-multinode",
    "finetunejob-smoke",
    "modeldeployment-merged",
    "modeldeployment-multilora",
}


def test_every_documented_example_exists() -> None:
    assert {p.stem for p in EXAMPLES} >= REQUIRED


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path: Path) -> None:
    for manifest in yaml.safe_load_all(path.read_text()):
        assert validate_manifest(manifest) == []
        model = FineTuneJob if manifest["kind"] == "FineTuneJob" else ModelDeployment
        parsed = model.model_validate(manifest)
        # Round trip: what we would write back is accepted again, unchanged.
        again = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert model.model_validate(again) == parsed


def test_cli_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    assert f"{len(EXAMPLES)} manifest(s) valid" in capsys.readouterr().out


def test_multinode_example_uses_fsdp_on_two_nodes() -> None:
    job = FineTuneJob.model_validate(
        yaml.safe_load((EXAMPLES[0].parent / "finetunejob-multinode.yaml").read_text())
    )
    assert job.spec.distributed is not None
    assert (job.spec.distributed.nodes, job.spec.distributed.strategy.value) == (2, "FSDP")
