"""A FineTuneJob as a test sees it through the API: its manifest (examples/
finetunejob-smoke.yaml with changes), status, conditions and Events, and the trainer's result
of a successful run."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.contract import Reason, TrainerResult
from support.kubeenv import KubeEnv

REPO = Path(__file__).parents[3]
FTJ_API = "kubetune.io/v1alpha1"
FTJ = "FineTuneJob"


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in (a JSON merge patch: None removes a key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """examples/finetunejob-smoke.yaml as `name` in `namespace`, with spec changes."""
    smoke: dict[str, Any] = yaml.safe_load((REPO / "examples/finetunejob-smoke.yaml").read_text())
    smoke["metadata"] = {"name": name, "namespace": namespace, "labels": {"team": "support"}}
    smoke["spec"] = merge(smoke["spec"], spec)
    return smoke


class FineTuneJobHandle:
    """One FineTuneJob of a test: its manifest, status and Events, read through the API."""

    def __init__(self, env: KubeEnv, namespace: str, name: str) -> None:
        self.env, self.namespace, self.name = env, namespace, name

    def create(self, **spec: Any) -> dict[str, Any]:
        return self.env.create(manifest(self.name, self.namespace, **spec))

    def get(self) -> dict[str, Any] | None:
        return self.env.get(FTJ_API, FTJ, self.name, self.namespace)

    def patch_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.env.patch(FTJ_API, FTJ, self.name, {"spec": spec}, self.namespace)

    def status(self) -> dict[str, Any]:
        body = self.get()
        assert body is not None
        status: dict[str, Any] = body.get("status") or {}
        return status

    def wait(
        self, check: Callable[[dict[str, Any]], object], what: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The status, once `check(status)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status and check(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} on FineTuneJob "
                    f"{self.namespace}/{self.name}; its status:\n{yaml.safe_dump(status)}"
                )
            time.sleep(0.05)

    def wait_stage(self, stage: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait(lambda s: s.get("stage") == stage, f"stage {stage}", timeout)

    def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events on this FineTuneJob, oldest first."""
        found = [
            e
            for e in self.env.list("v1", "Event", self.namespace)
            if e["involvedObject"]["name"] == self.name and e["involvedObject"]["kind"] == FTJ
        ]
        found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [(e["type"], e["reason"], e["message"]) for e in found]

    def wait_event(
        self, reason: str, message: str = "", timeout: float = 10.0
    ) -> tuple[str, str, str]:
        """The first Event with this reason whose message starts with `message` (Events
        are posted after the status they tell of is written)."""
        return self.env.wait_for(
            lambda: next(
                (e for e in self.events() if e[1] == reason and e[2].startswith(message)), None
            ),
            timeout,
            what=f"an Event {reason} {message!r} on {self.name}; seen: {self.events()}",
        )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def succeeded(status: dict[str, Any]) -> tuple[str, str]:
    """(status, reason) of the Succeeded condition."""
    found = condition(status, "Succeeded")
    return found["status"], found["reason"]


def success(run_uri: str, **extra: Any) -> TrainerResult:
    return TrainerResult(
        reason=Reason.SUCCEEDED,
        message="Published",
        run_uri=run_uri,
        manifest_digest="sha256:" + "ab" * 32,
        gate_passed=True,
        metrics={"Perplexity": "12.5", "EvalLoss": "2.526"},
        step=20,
        **extra,
    )
