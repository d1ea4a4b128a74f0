"""The chart carries the generated CRDs: charts/kubetune/crds/ is a copy of crds/, and both
are what the API models generate (`make generate` writes them)."""

from __future__ import annotations

import pytest
from chart_tools import CHART_DIR, REPO_ROOT

from kubetune.api.generate import generated_files

GENERATED = {path: text for path, text in generated_files().items() if path.startswith("crds/")}


def test_the_chart_has_every_crd() -> None:
    shipped = sorted(p.name for p in (CHART_DIR / "crds").iterdir())
    assert shipped == sorted(path.removeprefix("crds/") for path in GENERATED)


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_chart_crd_is_current(path: str) -> None:
    chart_copy = CHART_DIR / path
    assert chart_copy.read_text(encoding="utf-8") == GENERATED[path], (
        f"charts/kubetune/{path} is stale: run `make generate` (or cp {path} charts/kubetune/crds/)"
    )
    assert chart_copy.read_text(encoding="utf-8") == (REPO_ROOT / path).read_text(encoding="utf-8")
