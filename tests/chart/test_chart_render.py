"""The Helm chart rendered by a real helm under several values files: lint, Kubernetes
schemas (1.30 and 1.36, strict), the prometheus-operator schemas, and what the operator and
the platform team rely on (settings file, probes, security context, RBAC modes, monitoring
selectors that match the pods the operator really creates)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_tools import (
    CHART_DIR,
    MONITORING_KINDS,
    REPO_ROOT,
    Helm,
    find,
    monitoring_problems,
    one,
)

from kubetune import __version__
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import names
from kubetune.operator.children import build_children
from kubetune.operator.pod import METRICS_PORT_NAME
from kubetune.operator.settings import (
    DEFAULT_TRAINER_IMAGE,
    SETTINGS_ENV,
    OperatorSettings,
    load_settings,
)
from kubetune.storage.layout import run_id_for

pytestmark = pytest.mark.tools

SCENARIOS: dict[str, tuple[str, ...]] = {
    "default": (),
    "namespaced": ("namespaced.yaml",),
    "monitoring": ("monitoring.yaml",),
    "gpu-classes": ("gpu-classes.yaml",),
    "everything": ("namespaced.yaml", "monitoring.yaml", "gpu-classes.yaml"),
}
K8S_VERSIONS = ("1.30.0", "1.36.0")
FULLNAME = "kubetune"  # release "kubetune": the chart name is not appended twice


def scenario_params() -> list[Any]:
    return [pytest.param(values, id=name) for name, values in SCENARIOS.items()]


def settings_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-settings")
    data: dict[str, Any] = yaml.safe_load(config_map["data"]["settings.yaml"])
    return data


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment", FULLNAME)
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def smoke_trainer_pod() -> dict[str, Any]:
    """The pod template of the Job the operator creates for examples/finetunejob-smoke.yaml."""
    data = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-smoke.yaml").read_text())
    data["metadata"].update(namespace="ml-team", uid="0d6f1a52-6f1c-4c1e-9a7e-3f1f3c2b9a10")
    ftj = FineTuneJob.model_validate(data)
    children = build_children(ftj, OperatorSettings(), run_id_for(ftj.spec))
    template: dict[str, Any] = children.job["spec"]["template"]
    return template


# --- helm lint and schemas --------------------------------------------------------------


@pytest.mark.parametrize("values", scenario_params())
def test_lint_strict(helm: Helm, values: tuple[str, ...]) -> None:
    args: list[str] = ["lint", "--strict", str(CHART_DIR)]
    for name in values:
        args += ["-f", str(Path(__file__).with_name("values") / name)]
    done = helm.run(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout, done.stdout
    assert "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", scenario_params())
def test_builtin_manifests_are_valid_kubernetes(
    helm: Helm, values: tuple[str, ...], version: str
) -> None:
    docs = helm.template(*values)
    builtin = [d for d in docs if d["kind"] not in MONITORING_KINDS]
    assert builtin, "nothing rendered"
    problems = []
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_monitoring_objects_match_prometheus_operator_schemas(
    helm: Helm, node_modules: Path, tmp_path: Path
) -> None:
    docs = helm.template("monitoring.yaml")
    objects = [d for d in docs if d["kind"] in MONITORING_KINDS]
    assert sorted(o["kind"] for o in objects) == sorted(MONITORING_KINDS)
    assert monitoring_problems(objects, node_modules, tmp_path) == []


def test_monitoring_schema_check_catches_typos_and_bad_values(
    helm: Helm, node_modules: Path, tmp_path: Path
) -> None:
    docs = helm.template("monitoring.yaml")
    monitor = one(docs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    pod_monitor = one(docs, "PodMonitor")
    pod_monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    rule = one(docs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = 10
    problems = "\n".join(monitoring_problems([monitor, pod_monitor, rule], node_modules, tmp_path))
    assert "'\"intervall\"' does not exist in type 'IEndpoint'" in problems
    assert "interval must match pattern" in problems
    assert "for must be string" in problems


def test_crds_ship_with_the_chart(helm: Helm) -> None:
    done = helm.template_text(extra=["--include-crds"])
    assert done.returncode == 0, done.stderr
    crds = [
        d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "CustomResourceDefinition"
    ]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "finetunejobs.kubetune.io",
        "modeldeployments.kubetune.io",
    ]


# --- the settings file ------------------------------------------------------------------


@pytest.mark.parametrize("values", scenario_params())
def test_settings_file_is_accepted_by_the_operator(
    helm: Helm, values: tuple[str, ...], tmp_path: Path
) -> None:
    docs = helm.template(*values)
    path = tmp_path / "settings.yaml"
    path.write_text(one(docs, "ConfigMap", f"{FULLNAME}-settings")["data"]["settings.yaml"])
    loaded = load_settings({SETTINGS_ENV: str(path)})  # refuses unknown keys, bad values
    rendered = yaml.safe_load(path.read_text())
    dumped = loaded.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    assert {k: v for k, v in dumped.items() if k != "gpuClasses"}.items() <= rendered.items()
    assert [c.name for c in loaded.gpu_classes] == [c["name"] for c in rendered["gpuClasses"]]


def test_default_settings_are_the_operators_own(helm: Helm) -> None:
    rendered = settings_of(helm.template())
    defaults = OperatorSettings().model_dump(mode="json", by_alias=True, exclude_none=True)
    assert rendered == defaults
    assert rendered["trainerImage"] == DEFAULT_TRAINER_IMAGE


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


def test_settings_from_values(helm: Helm) -> None:
    settings = settings_of(helm.template("namespaced.yaml", "gpu-classes.yaml"))
    assert settings["watchNamespaces"] == ["ml-team", "ml-research"]
    assert settings["defaultOutputCredentialsSecret"] == "s3-credentials"
    assert [c["name"] for c in settings["gpuClasses"]] == ["l4-24gb", "h100-80gb"]
    assert settings["trainerImage"] == "registry.example.com/ml/kubetune-trainer:0.1.0-cu128"
    assert settings["prometheusUrl"] == "http://prometheus-operated.monitoring.svc:9090"
    unset = settings_of(helm.template())
    assert "defaultOutputCredentialsSecret" not in unset
    assert "prometheusUrl" not in unset


def test_settings_change_rolls_the_operator(helm: Helm) -> None:
    def checksum(docs: list[dict[str, Any]]) -> str:
        template = one(docs, "Deployment", FULLNAME)["spec"]["template"]
        value: str = template["metadata"]["annotations"]["checksum/settings"]
        return value

    assert checksum(helm.template()) == checksum(helm.template())
    assert checksum(helm.template()) != checksum(helm.template("gpu-classes.yaml"))


# --- the operator Deployment ------------------------------------------------------------


def test_operator_deployment(helm: Helm) -> None:
    docs = helm.template()
    deployment = one(docs, "Deployment", FULLNAME)
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    container = operator_container(docs)
    assert container["image"] == f"ghcr.io/kubetune/kubetune-operator:{__version__}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_OPERATOR_METRICS_PORT"] == str(ports["metrics"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    settings_dir = str(Path(env[SETTINGS_ENV]).parent)
    assert mounts[settings_dir]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[settings_dir]["name"]]["configMap"]["name"] == f"{FULLNAME}-settings"
    assert Path(env[SETTINGS_ENV]).name in one(docs, "ConfigMap", f"{FULLNAME}-settings")["data"]
    # Read-only root: the only writable mount is the /tmp emptyDir.
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable == ["/tmp"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]


def test_operator_pod_meets_the_restricted_pod_security_standard(helm: Helm) -> None:
    docs = helm.template()
    pod = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_probes_and_metrics_ports_are_the_operators() -> None:
    """The chart's fixed ports are the ones the operator's code serves."""
    import inspect

    from kubetune.operator import __main__ as operator_main
    from kubetune.operator import handlers

    assert 'liveness_endpoint="http://0.0.0.0:8081/healthz"' in inspect.getsource(operator_main)
    assert handlers.DEFAULT_METRICS_PORT == 8080
    assert handlers.METRICS_PORT_ENV == "KUBETUNE_OPERATOR_METRICS_PORT"
    assert handlers.WORKERS_ENV == "KUBETUNE_OPERATOR_WORKERS"


def test_image_digest_pins_the_image(helm: Helm) -> None:
    container = operator_container(helm.template("gpu-classes.yaml"))
    assert container["image"] == (
        "ghcr.io/kubetune/kubetune-operator@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )


# --- RBAC modes ---------------------------------------------------------------------------


def test_cluster_wide_mode(helm: Helm) -> None:
    docs = helm.template()
    assert not find(docs, "Role")
    assert not find(docs, "RoleBinding")
    role = one(docs, "ClusterRole", FULLNAME)
    binding = one(docs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"]["name"] == FULLNAME
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": "kubetune"}
    ]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "customresourcedefinitions" in resources
    assert "namespaces" not in resources  # kopf lists namespaces only in namespaced mode


def test_namespaced_mode(helm: Helm) -> None:
    docs = helm.template("namespaced.yaml")
    roles = find(docs, "Role")
    bindings = find(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-research", "ml-team"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-research", "ml-team"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
        assert binding["subjects"][0]["namespace"] == "kubetune"
    assert not find(docs, "ClusterRole", FULLNAME)
    observer = one(docs, "ClusterRole", f"{FULLNAME}-observer")
    assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in observer["rules"]} == {
        (("customresourcedefinitions",), ("list", "watch")),
        (("namespaces",), ("list", "watch")),
    }
    assert one(docs, "ClusterRoleBinding", f"{FULLNAME}-observer")


def test_rbac_can_be_left_to_the_platform_team(helm: Helm) -> None:
    docs = helm.template(
        "namespaced.yaml",
        set_json={
            "rbac.create": False,
            "rbac.aggregateToDefaultRoles": False,
            "serviceAccount.create": False,
            "serviceAccount.name": "kubetune-operator",
        },
    )
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"):
        assert not find(docs, kind), kind
    pod = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubetune-operator"


def test_aggregated_roles_let_namespace_editors_use_kubetune(helm: Helm) -> None:
    docs = helm.template()
    edit = one(docs, "ClusterRole", f"{FULLNAME}-aggregate-edit")
    view = one(docs, "ClusterRole", f"{FULLNAME}-aggregate-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert set(edit["rules"][0]["verbs"]) >= {"create", "update", "patch", "delete"}
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert {"finetunejobs", "modeldeployments"} <= set(view["rules"][0]["resources"])


# --- network policy and monitoring --------------------------------------------------------


def test_network_policy(helm: Helm) -> None:
    docs = helm.template("monitoring.yaml")
    policy = one(docs, "NetworkPolicy")["spec"]
    pod_labels = one(docs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["ingress"] == [
        {
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        }
    ]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {53, 443, 6443} <= egress_ports
    children = next(r for r in policy["egress"] if "podSelector" in r.get("to", [{}])[0])
    assert [p["port"] for p in children["ports"]] == [OperatorSettings().metrics_port]
    selector = children["to"][0]["podSelector"]["matchLabels"]
    assert selector == {
        names.LABEL_MANAGED_BY: names.MANAGER,
        names.LABEL_COMPONENT: names.COMPONENT_TRAINER,
    }
    trainer_labels = smoke_trainer_pod()["metadata"]["labels"]
    assert selector.items() <= trainer_labels.items()


def test_network_policy_namespaced(helm: Helm) -> None:
    docs = helm.template("namespaced.yaml", "monitoring.yaml")
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    peer = next(r for r in egress if "podSelector" in r.get("to", [{}])[0])["to"][0]
    assert peer["namespaceSelector"]["matchExpressions"][0]["values"] == ["ml-team", "ml-research"]


def test_service_monitor_scrapes_the_operator(helm: Helm) -> None:
    docs = helm.template("monitoring.yaml")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", f"{FULLNAME}-metrics")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod_labels = one(docs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_pod_monitor_selects_the_trainer_pods_the_operator_creates(helm: Helm) -> None:
    monitor = one(helm.template("monitoring.yaml"), "PodMonitor")
    pod = smoke_trainer_pod()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == METRICS_PORT_NAME
    ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert METRICS_PORT_NAME in ports
    sources = {r["targetLabel"]: r["sourceLabels"][0] for r in endpoint["relabelings"]}

    def meta_label(key: str) -> str:
        return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in key)

    assert sources == {
        "finetunejob": meta_label(names.LABEL_FINETUNEJOB),
        "run_id": meta_label(names.LABEL_RUN_ID),
    }
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = one(helm.template("namespaced.yaml", "monitoring.yaml"), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["ml-team", "ml-research"]}


def test_grafana_dashboard_config_map(helm: Helm) -> None:
    config_map = one(helm.template("monitoring.yaml"), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "kubetune"}
    shipped = (CHART_DIR / "files" / "grafana-dashboard.json").read_text()
    assert config_map["data"]["kubetune.json"] == shipped.rstrip("\n")


def test_optional_objects_are_off_by_default(helm: Helm) -> None:
    kinds = {d["kind"] for d in helm.template()}
    assert kinds.isdisjoint({"NetworkPolicy", *MONITORING_KINDS})
    assert not find(helm.template(), "ConfigMap", f"{FULLNAME}-dashboard")


# --- NOTES.txt ----------------------------------------------------------------------------


def test_notes(helm: Helm, tmp_path: Path) -> None:
    """NOTES.txt rendered (helm renders it only on install, so a copy of the chart renders
    it inside a ConfigMap)."""
    chart = tmp_path / "kubetune"
    shutil.copytree(CHART_DIR, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_under_test.tpl").write_text(
        '{{- define "kubetune.notesUnderTest" -}}\n' + notes + "{{- end }}\n"
    )
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  NOTES.txt: |\n"
        '    {{- include "kubetune.notesUnderTest" . | nindent 4 }}\n'
    )

    def render(*values: str) -> str:
        done = helm.template_text(
            *values, chart=chart, extra=["--show-only", "templates/notes-under-test.yaml"]
        )
        assert done.returncode == 0, done.stderr
        text: str = yaml.safe_load(done.stdout)["data"]["NOTES.txt"]
        return text

    default = render()
    assert "watches every namespace" in default
    assert f"Trainer image: {DEFAULT_TRAINER_IMAGE}" in default
    assert "No GPU classes are set" in default
    assert "kubectl apply --server-side --force-conflicts -f charts/kubetune/crds/" in default
    fleet = render("namespaced.yaml", "gpu-classes.yaml")
    assert "watches namespaces ml-team, ml-research" in fleet
    assert "No GPU classes" not in fleet
