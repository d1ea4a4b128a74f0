"""The chart's Prometheus alerts: valid rules (`promtool check rules`), unit-tested with
`promtool test rules` (tests/chart/alerts_test.yaml), each alert tested firing, and built on
metrics the operator and the trainer really export."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_tools import Helm, one, rules_file, run

pytestmark = pytest.mark.tools

UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
PROPOSED_METRICS = {"kubetune_operator_modeldeployments"}
"""Metrics the alerts read that the ModelDeployment controller is to export (ModelDeployments
by their Ready condition, label `ready`)."""


@pytest.fixture(scope="module")
def rules(helm: Helm) -> dict[str, Any]:
    rule: dict[str, Any] = one(helm.template("monitoring.yaml"), "PrometheusRule")
    return rule


def exported_metric_names() -> set[str]:
    """Sample names the operator's and the trainer's registries expose."""
    from kubetune.operator.metrics import OperatorMetrics
    from kubetune.trainer.progress import Metrics

    names = set()
    for registry in (OperatorMetrics().registry, Metrics(port=0).registry):
        for family in registry.collect():
            names.add(family.name)
            names |= {
                f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count")
            }
    return names


def alert_names(rules: dict[str, Any]) -> list[str]:
    return [r["alert"] for group in rules["spec"]["groups"] for r in group["rules"]]


def test_promtool_checks_the_rules(rules: dict[str, Any], promtool: Path, tmp_path: Path) -> None:
    done = run([promtool, "check", "rules", rules_file(rules, tmp_path / "rules.yaml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names(rules))} rules found" in done.stdout


def test_promtool_unit_tests_pass(rules: dict[str, Any], promtool: Path, tmp_path: Path) -> None:
    rules_file(rules, tmp_path / "rules.yaml")
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    done = run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_unit_tests_catch_a_broken_rule(
    rules: dict[str, Any], promtool: Path, tmp_path: Path
) -> None:
    """Without its `step < total steps` clause the stuck alert fires for a finished stage,
    and the unit tests say so."""
    broken = yaml.safe_load(yaml.safe_dump(rules))
    for group in broken["spec"]["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "KubetuneFineTuneJobStuck":
                rule["expr"] = rule["expr"].replace(
                    "kubetune_trainer_step < kubetune_trainer_total_steps", "kubetune_trainer_step"
                )
    rules_file(broken, tmp_path / "rules.yaml")
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    done = run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path)
    assert done.returncode != 0
    assert "dpo-bot" in done.stdout + done.stderr


def test_every_alert_is_tested_firing(rules: dict[str, Any]) -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alert_names(rules)) == fired


def test_alerts_read_exported_metrics(rules: dict[str, Any]) -> None:
    exported = exported_metric_names() | PROPOSED_METRICS | {"up"}
    used = {
        name
        for group in rules["spec"]["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\b([a-z_]+)(?=\{|\[| offset|\))", rule["expr"])
        if name.startswith(("kubetune_", "up"))
    }
    assert used, "no metric found in the rules"
    assert used <= exported, used - exported


def test_alerts_carry_severity_and_help(rules: dict[str, Any]) -> None:
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["labels"]["team"] == "ml-platform"  # monitoring.yaml's alertLabels
            assert rule["annotations"]["summary"]
            assert "kubectl" in rule["annotations"]["description"] or rule["alert"].endswith(
                "ReconcileErrors"
            )


def test_operator_down_needs_the_service_monitor(helm: Helm) -> None:
    docs = helm.template("monitoring.yaml", set_json={"monitoring.serviceMonitor.enabled": False})
    assert "KubetuneOperatorDown" not in alert_names(one(docs, "PrometheusRule"))
