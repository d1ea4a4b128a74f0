"""The chart tests' tools: a real helm, promtool and the Node.js schema checks.

They come from the cache scripts/fetch-tools.sh fills (~/.cache/kubetune/tools, or
$KUBETUNE_TOOLS_CACHE); nothing here downloads anything. A missing tool raises with the
command that fetches it, so a test that needs one fails instead of being skipped (like the
`apiserver` tests).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "kubetune"
VALUES_DIR = Path(__file__).resolve().parent / "values"
TOOLS_CACHE_ENV = "KUBETUNE_TOOLS_CACHE"
FETCH_HINT = "run scripts/fetch-tools.sh (make tools) to fetch it"
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")

Doc = dict[str, Any]


def tools_cache() -> Path:
    """Where scripts/fetch-tools.sh puts the tools."""
    configured = os.environ.get(TOOLS_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "kubetune" / "tools"


def find_tool(name: str) -> Path:
    """bin/<name> in the tools cache.

    Raises:
        RuntimeError: the tool is not there, naming the command that fetches it.
    """
    path = tools_cache() / "bin" / name
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found at {path}: {FETCH_HINT}")
    return path


def find_node_modules() -> Path:
    """The node_modules of the monitoring schema checks.

    Raises:
        RuntimeError: they are not there, naming the command that fetches them.
    """
    path = tools_cache() / "node" / "node_modules"
    if not (path / "@kubernetes-models" / "prometheus-operator").is_dir():
        raise RuntimeError(f"the Node.js schema packages are not in {path}: {FETCH_HINT}")
    return path


def run(args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a tool; stdout and stderr captured as text, never raising on exit codes."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=120, **kwargs
    )


@dataclass
class Helm:
    """A helm binary with its own config, cache and data folders (no repositories, no
    cluster: lint and template only)."""

    binary: Path
    home: Path
    _cache: dict[tuple[Any, ...], list[Doc]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "KUBECONFIG": os.devnull,
        }

    def run(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return run([self.binary, *args], env=self.env)

    def template_text(
        self,
        *values: str,
        set_json: Mapping[str, Any] | None = None,
        release: str = "kubetune",
        namespace: str = "kubetune",
        chart: Path = CHART_DIR,
        extra: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """`helm template` with values files (names in tests/chart/values, or paths) and
        --set-json pairs; the completed process, whatever its exit code."""
        args: list[str | os.PathLike[str]] = ["template", release, chart, "-n", namespace]
        for name in values:
            path = Path(name) if Path(name).is_absolute() else VALUES_DIR / name
            args += ["-f", path]
        for key, value in (set_json or {}).items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        return self.run(*args, *extra)

    def template(
        self,
        *values: str,
        set_json: Mapping[str, Any] | None = None,
        release: str = "kubetune",
        namespace: str = "kubetune",
    ) -> list[Doc]:
        """The rendered manifests (cached per arguments).

        Raises:
            AssertionError: helm refused the chart or the values.
        """
        key = (values, json.dumps(set_json, sort_keys=True), release, namespace)
        if key not in self._cache:
            done = self.template_text(
                *values, set_json=set_json, release=release, namespace=namespace
            )
            assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
            self._cache[key] = [d for d in yaml.safe_load_all(done.stdout) if d]
        return self._cache[key]


def find(docs: Iterable[Doc], kind: str, name: str | None = None) -> list[Doc]:
    """The documents of `kind` (and `name`)."""
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    """The only document of `kind` (and `name`)."""
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def monitoring_problems(objects: Sequence[Doc], node_modules: Path, workdir: Path) -> list[str]:
    """Schema problems of prometheus-operator objects, two ways:

    - the validators of @kubernetes-models/prometheus-operator (generated from the upstream
      CRDs' OpenAPI schemas): types, enums, patterns, required fields;
    - the TypeScript compiler on the same objects typed with that package's interfaces,
      which refuses unknown fields (as `kubectl apply` with strict field validation does).
    """
    problems: list[str] = []
    objects_file = workdir / "objects.json"
    objects_file.write_text(json.dumps(list(objects)))
    script = Path(__file__).with_name("monitoring_check.mjs")
    done = run(["node", script, node_modules, objects_file])
    if done.returncode != 0:
        return [f"node {script.name} failed: {done.stderr}"]
    for line in done.stdout.splitlines():
        result = json.loads(line)
        problems += [f"{result['kind']} {result['name']}: {e}" for e in result["errors"]]

    link = workdir / "node_modules"
    if not link.exists():
        link.symlink_to(node_modules, target_is_directory=True)
    lines = []
    for kind in sorted({o["kind"] for o in objects}):
        module = f"@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/{kind}"
        lines.append(f'import type {{ I{kind} }} from "{module}";')
    for index, obj in enumerate(objects):
        lines.append(f"export const object{index}: I{obj['kind']} = {json.dumps(obj)};")
    source = workdir / "check.mts"
    source.write_text("\n".join(lines) + "\n")
    tsc = node_modules / "typescript" / "bin" / "tsc"
    done = run(
        [
            "node",
            tsc,
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            source.name,
        ],
        cwd=workdir,
    )
    if done.returncode != 0:
        problems += [line for line in done.stdout.splitlines() if "error TS" in line]
        if not any("error TS" in line for line in done.stdout.splitlines()):
            problems.append(f"tsc failed: {done.stdout}{done.stderr}")
    return problems


def rules_file(rule: Doc, path: Path) -> Path:
    """A Prometheus rules file (for promtool) from a PrometheusRule's spec."""
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def merged_values(*overrides: dict[str, Any]) -> dict[str, Any]:
    """The chart's values.yaml with overrides merged as helm merges them (maps deep, the rest
    replaced)."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    result: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for override in overrides:
        merge(result, copy.deepcopy(override))
    return result


def schema_errors(values: dict[str, Any]) -> list[str]:
    """What values.schema.json says about `values`, one line per problem with its path."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(values)
    ]
