"""The real kubetune operator as a process of its own, to be killed and started again.

`operator_runner.RunningOperator` runs kopf in a thread of the test process and stops it
gracefully. A crash is different: the process dies between two instructions, with requests
in flight, its cache, work queue and timers lost. `OperatorProcess` runs the operator
(`operator_main.py`: kopf with `kubetune.operator.handlers`, standalone, cluster-wide) with a
kubeconfig of its own user (`KubeEnv.kubeconfig_for`), so the router records which writes are
the operator's; `CrashAfterWrites` SIGKILLs it right after its k-th write in a namespace has
been applied and before it reads the answer (the router holds the answer while its write
hooks run), then starts the next one, as a Deployment's pod is replaced:

    operator = OperatorProcess(kube_env, {"statusPollIntervalSeconds": 1}, tmp_path)
    operator.start()
    with CrashAfterWrites(kube_env, operator, namespace, at={3}) as crashes:
        ...                                  # drive the FineTuneJob; the operator dies once
    crashes.fired                            # [Write(seq=..., verb="create", ...)]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from kubetune.operator.settings import SETTINGS_ENV
from support.kubeenv import KubeEnv
from support.kuberouter import Write

MAIN = Path(__file__).with_name("operator_main.py")
SRC = Path(__file__).parents[3] / "src"
"""The tests' own sources, imported by the operator process too."""
# As in kubetune.operator.handlers, which the test process does not import.
METRICS_PORT_ENV = "KUBETUNE_OPERATOR_METRICS_PORT"
WORKERS_ENV = "KUBETUNE_OPERATOR_WORKERS"
USER = "kubetune-operator"
"""The operator's bearer token: its writes are recorded under this user."""
STOP_GRACE_SECONDS = 10.0
FTJ_WATCH = ("watch", "finetunejobs.kubetune.io")


def applied(write: Write) -> bool:
    """Whether the server applied a write (answered 2xx); a refused write changes nothing,
    so a crash right after it is the same as a crash right before it."""
    return write.status < 300


class OperatorProcess:
    """Starts, kills and stops the operator process; safe to call from any thread (the
    router's write hooks kill it from the router's event loop).

    The next process is always started ahead, imported and waiting on its stdin
    (`operator_main.py`), so a restart costs kopf's start, not Python's imports. Output of
    every process goes to `log_path`.
    """

    def __init__(
        self, env: KubeEnv, settings: Mapping[str, Any], workdir: Path, user: str = USER
    ) -> None:
        self.user = user
        self.log_path = workdir / "operator.log"
        settings_path = workdir / "settings.yaml"
        settings_path.write_text(yaml.safe_dump(dict(settings)))
        self._env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
            "KUBECONFIG": str(env.kubeconfig_for(user)),
            SETTINGS_ENV: str(settings_path),
            METRICS_PORT_ENV: "0",
            WORKERS_ENV: "4",
        }
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._standby: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def running(self) -> bool:
        with self._lock:
            return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start an operator unless one is running."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._promote()

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self._log is None:
            self._log = self.log_path.open("ab")
        return subprocess.Popen(
            [sys.executable, str(MAIN)],
            env=self._env,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _promote(self) -> None:
        """The standby becomes the operator; a new standby is started."""
        process = self._standby if self._standby is not None else self._spawn()
        self.starts += 1
        assert self._log is not None
        stamp = datetime.now(timezone.utc).isoformat(sep=" ", timespec="milliseconds")
        line = f"----- [{stamp}] operator start {self.starts} (pid {process.pid})\n"
        self._log.write(line.encode())
        self._log.flush()
        assert process.stdin is not None
        process.stdin.write(b"run\n")
        process.stdin.flush()  # the pipe stays open: the operator exits when it closes
        self._process = process
        self._standby = self._spawn()

    def crash(self, restart: bool = True) -> None:
        """SIGKILL the operator now (it gets no chance to finish anything), then start the
        next one unless `restart` is false."""
        with self._lock:
            process = self._process
            if process is not None:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    self.kills += 1
                _close_stdin(process)
            self._process = None
            if restart:
                self._promote()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, as Kubernetes does), killing it if it lingers; the
        standby goes too."""
        with self._lock:
            process, self._process = self._process, None
            standby, self._standby = self._standby, None
        if standby is not None:
            _close_stdin(standby)  # end of input: it exits without starting
            standby.wait(STOP_GRACE_SECONDS)
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            _close_stdin(process)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, lines: int = 80) -> str:
        """The end of the operators' output, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _close_stdin(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None and not process.stdin.closed:
        with contextlib.suppress(BrokenPipeError):  # it has exited already
            process.stdin.close()


def operator_process_fixture(
    settings: Mapping[str, Any],
) -> Callable[..., Iterator[OperatorProcess]]:
    """A module-scoped `operator` fixture: one `OperatorProcess` with these settings for
    the module's tests (each works in its own namespace)."""

    @pytest.fixture(scope="module")
    def operator(
        kube_env: KubeEnv, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[OperatorProcess]:
        process = OperatorProcess(kube_env, settings, tmp_path_factory.mktemp("operator"))
        process.start()
        try:
            yield process
        finally:
            process.stop()

    return operator


class CrashAfterWrites:
    """Kills the operator right after its applied writes number `at` (1-based, counted from
    the moment the context is entered) in `namespace`, and starts the next one; a context
    manager. Refused writes are not counted (`applied`).

    `seen` are the operator's applied writes in the namespace, `fired` those a crash
    followed.
    """

    def __init__(
        self, env: KubeEnv, operator: OperatorProcess, namespace: str, at: Iterable[int]
    ) -> None:
        assert env.router is not None
        self._env = env
        self._operator = operator
        self.namespace = namespace
        self.at = frozenset(at)
        self.seen: list[Write] = []
        self.fired: list[Write] = []
        self._watches_at_crash = 0
        self._remove: Callable[[], None] | None = None

    def __enter__(self) -> CrashAfterWrites:
        assert self._env.router is not None
        self._remove = self._env.router.on_write(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _observe(self, write: Write) -> None:
        if write.user != self._operator.user or write.namespace != self.namespace:
            return
        if not applied(write):
            return
        self.seen.append(write)
        if len(self.seen) in self.at:
            self.fired.append(write)
            self._watches_at_crash = self._watches()
            self._operator.crash()

    def _watches(self) -> int:
        return self._env.request_counts(self._operator.user).get(FTJ_WATCH, 0)

    def wait_restarted(self, timeout: float = 30.0) -> None:
        """Wait until the operator started after the last crash watches FineTuneJobs (it
        has listed them and queued each for a reconcile)."""
        if not self.fired:
            return
        self._env.wait_for(
            lambda: self._watches() > self._watches_at_crash,
            timeout,
            what="the restarted operator to watch FineTuneJobs",
        )
