"""The Grafana dashboard the chart ships: valid JSON, and every query reads metrics the
operator and the trainer export, with the labels the chart's monitors attach."""

from __future__ import annotations

import json
import re
from typing import Any

from chart_tools import CHART_DIR

DASHBOARD = json.loads((CHART_DIR / "files" / "grafana-dashboard.json").read_text())
PROPOSED_METRICS = {"kubetune_operator_modeldeployments"}
"""To be exported by the ModelDeployment controller (ModelDeployments by Ready condition)."""


def exported_metric_names() -> set[str]:
    from kubetune.operator.metrics import OperatorMetrics
    from kubetune.trainer.progress import Metrics

    names = set()
    for registry in (OperatorMetrics().registry, Metrics(port=0).registry):
        for family in registry.collect():
            names |= {
                family.name,
                *(family.name + s for s in ("_total", "_bucket", "_sum", "_count")),
            }
    return names


def targets() -> list[dict[str, Any]]:
    return [t for panel in DASHBOARD["panels"] for t in panel.get("targets", [])]


def test_dashboard_identity() -> None:
    assert DASHBOARD["uid"] == "kubetune-overview"
    assert DASHBOARD["title"] == "kubetune"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_query_reads_exported_metrics() -> None:
    exported = exported_metric_names() | PROPOSED_METRICS
    assert targets()
    for target in targets():
        used = set(re.findall(r"\bkubetune_[a-z_]+", target["expr"]))
        assert used, target["expr"]
        assert used <= exported, (target["expr"], used - exported)
        assert target["datasource"]["uid"] == "${datasource}"


def test_training_panels_filter_on_the_pod_monitors_labels() -> None:
    """finetunejob comes from the PodMonitor's relabeling of the pods' kubetune.io/finetunejob."""
    for target in targets():
        if "kubetune_trainer_" in target["expr"]:
            assert 'finetunejob=~"$finetunejob"' in target["expr"]
            assert 'namespace=~"$namespace"' in target["expr"]
