"""The GitOps examples under deploy/: an Argo CD Application and a Flux HelmRelease that
install this chart. No Argo CD or Flux schemas exist offline, so their structure is checked
here, and the values they carry go through the chart's schema and a real `helm template`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_tools import CHART_DIR, REPO_ROOT, Helm, merged_values, one, schema_errors

DEPLOY = REPO_ROOT / "deploy"
CHART = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


APPLICATION = one(documents(DEPLOY / "argocd" / "application.yaml"), "Application")
FLUX = documents(DEPLOY / "flux" / "helmrelease.yaml")
HELM_RELEASE = one(FLUX, "HelmRelease")
GIT_REPOSITORY = one(FLUX, "GitRepository")


def test_argo_cd_application() -> None:
    assert APPLICATION["apiVersion"] == "argoproj.io/v1alpha1"
    source = APPLICATION["spec"]["source"]
    assert (REPO_ROOT / source["path"] / "Chart.yaml").is_file()
    assert source["targetRevision"] == f"v{CHART['version']}"
    assert "ServerSideApply=true" in APPLICATION["spec"]["syncPolicy"]["syncOptions"]
    assert "CreateNamespace=true" in APPLICATION["spec"]["syncPolicy"]["syncOptions"]
    assert schema_errors(merged_values(source["helm"]["valuesObject"])) == []


def test_flux_helm_release() -> None:
    assert HELM_RELEASE["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    assert GIT_REPOSITORY["apiVersion"] == "source.toolkit.fluxcd.io/v1"
    chart = HELM_RELEASE["spec"]["chart"]["spec"]
    assert (REPO_ROOT / chart["chart"] / "Chart.yaml").is_file()
    assert chart["sourceRef"] == {
        "kind": "GitRepository",
        "name": GIT_REPOSITORY["metadata"]["name"],
        "namespace": GIT_REPOSITORY["metadata"]["namespace"],
    }
    assert GIT_REPOSITORY["spec"]["ref"]["tag"] == f"v{CHART['version']}"
    assert "!/charts/kubetune/" in GIT_REPOSITORY["spec"]["ignore"]
    assert HELM_RELEASE["spec"]["install"]["crds"] == "CreateReplace"
    assert HELM_RELEASE["spec"]["upgrade"]["crds"] == "CreateReplace"
    assert schema_errors(merged_values(HELM_RELEASE["spec"]["values"])) == []


@pytest.mark.tools
@pytest.mark.parametrize(
    "values",
    [APPLICATION["spec"]["source"]["helm"]["valuesObject"], HELM_RELEASE["spec"]["values"]],
    ids=["argocd", "flux"],
)
def test_examples_render(helm: Helm, tmp_path: Path, values: dict[str, Any]) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    done = helm.template_text(str(path))
    assert done.returncode == 0, done.stderr
