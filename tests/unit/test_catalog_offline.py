"""Every bad manifest in the catalog is refused offline, at its field, with its message."""

from __future__ import annotations

import re

import pytest

from catalog import Case, load_catalog
from kubetune.api.crd import KINDS
from kubetune.api.validation import model_errors, validate_manifest

CASES = load_catalog()
RULE_MESSAGE = re.compile(r'^Invalid value: (?P<rule>[^"0-9-].+)$')


def test_catalog_is_large_enough() -> None:
    assert len(CASES) >= 30
    kinds = {case.manifest["kind"] for case in CASES}
    assert kinds == {"FineTuneJob", "ModelDeployment"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_refused_offline_with_the_expected_message(case: Case) -> None:
    errors = [(e.path, e.detail) for e in validate_manifest(case.manifest)]
    assert (case.path, case.message) in errors, f"{case.why}: got {errors}"


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if RULE_MESSAGE.match(c.message)],
    ids=lambda c: c.name,
)
def test_pydantic_mirror_says_the_same(case: Case) -> None:
    """Cross-field rules are enforced by pydantic too, with the CEL rule's message."""
    match = RULE_MESSAGE.match(case.message)
    assert match is not None
    kind = next(k for k in KINDS if k.kind == case.manifest["kind"])
    messages = [e.detail for e in model_errors(case.manifest, kind.model)]
    assert match["rule"] in messages, messages
