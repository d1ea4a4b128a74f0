"""Import contracts: the layers stay apart (HOUSE_STYLE §5)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
KUBE = ("kopf", "kubernetes")


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return {name.split(".")[0] for name in out.split()} | set(out.split())


@pytest.mark.parametrize(
    "module",
    [
        "kubetune.api.v1alpha1",
        "kubetune.api.crd",
        "kubetune.api.validation",
        "kubetune.api.contract",
        "kubetune.calc",
        "kubetune.cli",
        "kubetune.storage.layout",
        "kubetune.report",
    ],
)
def test_light_modules_never_import_ml_or_kubernetes_libraries(module: str) -> None:
    loaded = imported_after(module)
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert not loaded & set(KUBE), loaded & set(KUBE)


def test_api_imports_neither_operator_nor_trainer() -> None:
    loaded = imported_after("kubetune.api.crd")
    assert "kubetune.operator" not in loaded
    assert "kubetune.trainer" not in loaded


def test_no_top_level_operator_module_shadows_the_standard_library() -> None:
    import operator

    assert operator.__file__ is None or "kubetune" not in operator.__file__
