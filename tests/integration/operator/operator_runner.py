"""The real kubetune operator (`kubetune.operator.handlers` under kopf) in a thread of the
test process, against the local Kubernetes API (support/kubeenv.py).

    operator = operator_fixture({"statusPollIntervalSeconds": 1})   # in a test module

gives a module-scoped fixture: one operator for all tests of the module (each test works in
its own namespace; the operator watches them all), with `stop()` and `start()` for tests
that kill and restart it. kopf imports the handlers module once per process and registers
its handlers into the registry that is the default at that moment, so every start reuses
the one registry the first start filled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kopf
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner

from kubetune.operator.settings import SETTINGS_ENV
from support.kubeenv import KubeEnv

HANDLERS = "kubetune.operator.handlers"
# As in kubetune.operator.handlers, which is not imported here: kopf imports it.
METRICS_PORT_ENV = "KUBETUNE_OPERATOR_METRICS_PORT"
WORKERS_ENV = "KUBETUNE_OPERATOR_WORKERS"
ARGS = ["run", "--all-namespaces", "--standalone", "-m", HANDLERS]


class RunningOperator:
    """Starts and stops the operator; `runs` counts the starts."""

    def __init__(self) -> None:
        self.registry = kopf.OperatorRegistry()
        kopf.on.login(registry=self.registry, id="login_via_client")(kopf.login_via_client)
        self._runner: KopfRunner | None = None
        self.runs = 0
        # A handlers module imported before (into another registry) would register nothing
        # into this one; import it afresh on the first start.
        sys.modules.pop(HANDLERS, None)

    @property
    def running(self) -> bool:
        return self._runner is not None

    def start(self) -> None:
        if self._runner is not None:
            return
        runner = KopfRunner(ARGS, registry=self.registry, timeout=30)
        runner.__enter__()
        self._runner = runner
        self.runs += 1

    def stop(self) -> None:
        """Stop the operator; raises what it died of, if anything."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.__exit__(None, None, None)
        assert runner.exit_code == 0, runner.output


def operator_fixture(settings: Mapping[str, Any]) -> Callable[..., Iterator[RunningOperator]]:
    """A module-scoped `operator` fixture running with these operator settings, its
    metrics server off and the kubeconfig of `kube_env`."""

    @pytest.fixture(scope="module")
    def operator(
        kube_env: KubeEnv, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[RunningOperator]:
        path = tmp_path_factory.mktemp("operator") / "settings.yaml"
        path.write_text(yaml.safe_dump(dict(settings)))
        kubeconfig = str(kube_env.kubeconfig_path)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(SETTINGS_ENV, str(path))
            patch.setenv(METRICS_PORT_ENV, "0")
            patch.setenv(WORKERS_ENV, "4")
            patch.setenv("KUBECONFIG", kubeconfig)
            # The client read KUBECONFIG at import, long before this fixture.
            patch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
            running = RunningOperator()
            running.start()
            try:
                yield running
            finally:
                running.stop()

    return operator
