"""The parts of a cluster a ModelDeployment needs that the local Kubernetes API lacks: the
Deployment controller and the kubelet of the serving pods.

The fake built-in API (support/kubefake.py) stores the operator's Deployment but runs
nothing, so a test plays the rest, one explicit step at a time, as simulate.py does for
Jobs:

    serving = ServingCluster(kube_env, namespace)
    serving.rolling_out("support-bot")             # the controller saw the new template
    pod = serving.create_pod("support-bot")        # Pending, from the template
    pod = serving.fetching(pod)                    # the first init container downloads
    pod = serving.loading(pod)                     # vLLM runs, not ready yet
    pod = serving.serving(pod)                     # the readiness probe passes
    serving.report("support-bot", ready=1)         # the controller counts it

    serving.crash_loop(pod, "ValueError: …", exit_code=1)   # vLLM keeps dying

The Deployment controller's part follows apps/v1: `observedGeneration`, `replicas`,
`updatedReplicas`, `readyReplicas`, `availableReplicas`, `unavailableReplicas` and the
`Available` / `Progressing` conditions with the controller's reasons. Pods get the
template's labels plus `pod-template-hash`, and an ownerReference to the Deployment (a real
cluster puts a ReplicaSet in between, which the fake does not serve), so garbage
collection takes them with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

from simulate import POD_IP, now

from support.kubeenv import KubeEnv

Obj = dict[str, Any]

POD_TEMPLATE_HASH = "pod-template-hash"


def template_hash(deployment: Obj) -> str:
    """A stable hash of the Deployment's pod template (as the controller labels pods)."""
    text = json.dumps(deployment["spec"]["template"], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _condition(type_: str, status: str, reason: str, message: str) -> Obj:
    stamp = now()
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": stamp,
        "lastTransitionTime": stamp,
    }


class ServingCluster:
    """The Deployment controller and the kubelet for the serving pods of one namespace,
    driven by the test."""

    def __init__(self, env: KubeEnv, namespace: str) -> None:
        self.env = env
        self.namespace = namespace

    # ------------------------------------------------------------------ reading
    def deployment(self, name: str) -> Obj | None:
        return self.env.get("apps/v1", "Deployment", name, self.namespace)

    def wait_deployment(
        self,
        name: str,
        check: Callable[[Obj], object] | None = None,
        what: str = "",
        timeout: float = 10.0,
    ) -> Obj:
        """The Deployment, once it exists and `check(deployment)` holds."""

        def found() -> Obj | None:
            deployment = self.deployment(name)
            ok = deployment is not None and (check is None or check(deployment))
            return deployment if ok else None

        return self.env.wait_for(
            found, timeout, what=f"Deployment {self.namespace}/{name} {what}".strip()
        )

    # ------------------------------------------------------- Deployment controller
    def _status(self, name: str, status: Obj) -> Obj:
        return self.env.patch(
            "apps/v1", "Deployment", name, {"status": status}, self.namespace, subresource="status"
        )

    def rolling_out(self, name: str, replicas: int | None = None) -> Obj:
        """The controller observed the current generation and is rolling it out: nothing
        of it is ready yet (old replicas, if any, are counted by `report`)."""
        return self.report(name, ready=0, updated=0, replicas=replicas)

    def report(
        self,
        name: str,
        *,
        ready: int,
        updated: int | None = None,
        replicas: int | None = None,
        observed: bool = True,
    ) -> Obj:
        """The controller's status: `ready` replicas (old or new), `updated` of the
        current template (default: `ready`), `replicas` pods in all (default: the spec's).
        With `observed=False` the status stays on the generation observed before (a
        controller that has not caught up with a spec change)."""
        deployment = self.deployment(name)
        assert deployment is not None, f"Deployment {self.namespace}/{name} does not exist"
        wanted = int(deployment["spec"].get("replicas", 1))
        total = wanted if replicas is None else replicas
        updated = ready if updated is None else updated
        generation = int(deployment["metadata"]["generation"])
        before = deployment.get("status") or {}
        seen = generation if observed else int(before.get("observedGeneration") or 0)
        available = ready >= min(wanted, 1)
        if updated >= wanted and ready >= wanted:
            progressing = (
                "NewReplicaSetAvailable",
                f'ReplicaSet "{name}" has successfully progressed.',
            )
        else:
            progressing = ("ReplicaSetUpdated", f'ReplicaSet "{name}" is progressing.')
        status = {
            "observedGeneration": seen,
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, total - ready),
            "conditions": [
                _condition(
                    "Available",
                    "True" if available else "False",
                    "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                    "Deployment has minimum availability."
                    if available
                    else "Deployment does not have minimum availability.",
                ),
                _condition("Progressing", "True", *progressing),
            ],
        }
        return self._status(name, status)

    # ------------------------------------------------------------------ kubelet
    def create_pod(self, deployment_name: str) -> Obj:
        """A pod of the Deployment's current template, Pending while its init containers
        have not started."""
        deployment = self.deployment(deployment_name)
        assert deployment is not None, f"Deployment {deployment_name} does not exist"
        meta = deployment["metadata"]
        template = copy.deepcopy(deployment["spec"]["template"])
        digest = template_hash(deployment)
        pod_meta = template.get("metadata") or {}
        pod_meta["generateName"] = f"{meta['name']}-{digest}-"
        pod_meta["labels"] = {**(pod_meta.get("labels") or {}), POD_TEMPLATE_HASH: digest}
        pod_meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        spec = template["spec"]
        pod = self.env.create(
            {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec},
            self.namespace,
        )
        waiting = {"waiting": {"reason": "PodInitializing"}}
        return self._pod_status(
            pod,
            phase="Pending",
            init=[self._container(c, waiting) for c in spec.get("initContainers") or []],
            main=[self._container(c, waiting) for c in spec["containers"]],
            ready=False,
        )

    def fetching(self, pod: Obj) -> Obj:
        """The first init container runs (downloads the first artifact)."""
        spec = pod["spec"]
        started = {"running": {"startedAt": now()}}
        waiting = {"waiting": {"reason": "PodInitializing"}}
        init = [
            self._container(c, started if index == 0 else waiting)
            for index, c in enumerate(spec.get("initContainers") or [])
        ]
        main = [self._container(c, waiting) for c in spec["containers"]]
        return self._pod_status(pod, phase="Pending", init=init, main=main, ready=False)

    def loading(self, pod: Obj) -> Obj:
        """Every init container completed; vLLM runs and loads the model (not ready)."""
        return self._running(pod, ready=False)

    def serving(self, pod: Obj) -> Obj:
        """vLLM answers its readiness probe."""
        return self._running(pod, ready=True)

    def crash_loop(self, pod: Obj, message: str, exit_code: int = 1, restarts: int = 3) -> Obj:
        """vLLM keeps exiting: back-off after `restarts` restarts, the last exit's
        termination message kept in `lastState`."""
        stamp = now()
        spec = pod["spec"]
        terminated = {
            "exitCode": exit_code,
            "reason": "Error",
            "message": message,
            "startedAt": stamp,
            "finishedAt": stamp,
        }
        backoff = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": "back-off 40s restarting failed container",
            }
        }
        main = [
            {
                **self._container(c, backoff, restarts=restarts),
                "lastState": {"terminated": terminated},
            }
            for c in spec["containers"]
        ]
        return self._pod_status(pod, phase="Running", init=self._done(spec), main=main, ready=False)

    def delete_pod(self, pod: Obj) -> None:
        self.env.delete("v1", "Pod", pod["metadata"]["name"], self.namespace)

    def _running(self, pod: Obj, ready: bool) -> Obj:
        spec = pod["spec"]
        started = {"running": {"startedAt": now()}}
        main = [self._container(c, started, ready=ready) for c in spec["containers"]]
        return self._pod_status(pod, phase="Running", init=self._done(spec), main=main, ready=ready)

    def _done(self, spec: Obj) -> list[Obj]:
        stamp = now()
        completed = {
            "terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": stamp,
                "finishedAt": stamp,
            }
        }
        return [self._container(c, completed) for c in spec.get("initContainers") or []]

    @staticmethod
    def _container(container: Obj, state: Obj, ready: bool = False, restarts: int = 0) -> Obj:
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": restarts,
            "state": state,
        }

    def _pod_status(
        self, pod: Obj, *, phase: str, init: list[Obj], main: list[Obj], ready: bool
    ) -> Obj:
        stamp = now()
        initialized = all("terminated" in s["state"] for s in init)
        flag = {True: "True", False: "False"}
        status: Obj = {
            "phase": phase,
            "hostIP": POD_IP,
            "startTime": stamp,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                {"type": "Initialized", "status": flag[initialized], "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": flag[ready], "lastTransitionTime": stamp},
                {"type": "Ready", "status": flag[ready], "lastTransitionTime": stamp},
            ],
            "initContainerStatuses": init,
            "containerStatuses": main,
        }
        if phase == "Running":
            status.update(podIP=POD_IP, podIPs=[{"ip": POD_IP}])
        name = pod["metadata"]["name"]
        return self.env.patch(
            "v1", "Pod", name, {"status": status}, self.namespace, subresource="status"
        )
