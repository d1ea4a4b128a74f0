"""The parts of a cluster the local Kubernetes API lacks: a kubelet, a Job controller and
the trainer's metrics endpoint.

The fake built-in API (support/kubefake.py) stores Jobs and Pods but runs nothing, so an
operator test plays the rest of the cluster itself, one explicit step at a time:

    cluster = Cluster(kube_env, namespace, metrics_port=endpoint.port)
    pod = cluster.start_pod(job_name)            # the Job controller's pod, Running on 127.0.0.1
    endpoint.report("SFT", step=5, total_steps=20, loss=1.25)   # what the trainer exports
    cluster.finish_pod(pod, TrainerResult(...), exit_code=0)    # the kubelet, then the Job
                                                                # controller's verdict

The Job controller's part follows Kubernetes 1.31+: pods made from the template (labels,
ownerReference), `active`/`failed`/`succeeded` counters, `SuccessCriteriaMet` + `Complete`,
the Job's own `podFailurePolicy` (FailJob gives `FailureTarget` + `Failed` with reason
`PodFailurePolicy`, Count and unmatched codes count against `backoffLimit`, Ignore does not
count), a replacement pod after a counted failure, and `suspend` (pods deleted, condition
`Suspended`). The trainer's endpoint is the trainer's own `Metrics` gauges served on a free
local port, so the operator scrapes the real exposition format.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from prometheus_client import start_http_server

from kubetune.api.contract import TrainerResult
from kubetune.operator import names
from kubetune.operator.pod import CONTAINER_NAME, METRICS_PORT_NAME
from kubetune.trainer.progress import Metrics
from support.kubeenv import KubeEnv

Obj = dict[str, Any]

POD_IP = "127.0.0.1"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TrainerEndpoint:
    """The trainer's Prometheus gauges (`kubetune.trainer.progress.Metrics`) served on
    127.0.0.1 at a free port; a context manager."""

    def __init__(self) -> None:
        self.metrics = Metrics(0)
        server, _ = start_http_server(0, addr=POD_IP, registry=self.metrics.registry)
        self.metrics.server = server
        self.port = int(server.server_port)

    def __enter__(self) -> TrainerEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.metrics.close()

    def report(
        self,
        stage: str,
        *,
        step: int,
        total_steps: int,
        loss: float | None = None,
        tokens_per_second: float | None = None,
        eta_seconds: float | None = None,
        learning_rate: float | None = None,
        epoch: float | None = None,
        phase: str | None = "Training",
    ) -> None:
        """Set the gauges of one stage as the trainer's StageProgress does."""
        m = self.metrics
        m.step.labels(stage).set(step)
        m.total_steps.labels(stage).set(total_steps)
        m.stage_info.labels(stage, "0").set(1)
        for gauge, value in (
            (m.loss, loss),
            (m.tokens_per_second, tokens_per_second),
            (m.eta_seconds, eta_seconds),
            (m.learning_rate, learning_rate),
            (m.epoch, epoch),
        ):
            if value is not None:
                gauge.labels(stage).set(value)
        if phase is not None:
            m.set_phase(phase)


def _set_condition(
    conditions: list[Obj], type_: str, status: str, reason: str, message: str
) -> None:
    stamp = now()
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != status:
                condition["lastTransitionTime"] = stamp
            condition.update(status=status, reason=reason, message=message, lastProbeTime=stamp)
            return
    conditions.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastProbeTime": stamp,
            "lastTransitionTime": stamp,
        }
    )


def _rule_matches(rule: Mapping[str, Any], pod: Mapping[str, Any], code: int) -> bool:
    """Whether a podFailurePolicy rule matches a failed pod (Kubernetes' semantics)."""
    for wanted in rule.get("onPodConditions") or []:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition["type"] == wanted["type"] and condition["status"] == wanted.get(
                "status", "True"
            ):
                return True
    exit_codes = rule.get("onExitCodes")
    if not exit_codes or exit_codes.get("containerName", CONTAINER_NAME) != CONTAINER_NAME:
        return False
    inside = code in exit_codes["values"]
    return inside if exit_codes["operator"] == "In" else (not inside and code != 0)


class Cluster:
    """The kubelet and the Job controller for the Jobs of one namespace, driven by the
    test. Pods made here expose the trainer's `metrics` port at `metrics_port` (the
    TrainerEndpoint's) on 127.0.0.1."""

    def __init__(self, env: KubeEnv, namespace: str, metrics_port: int | None = None) -> None:
        self.env = env
        self.namespace = namespace
        self.metrics_port = metrics_port

    # ------------------------------------------------------------------ reading
    def job(self, name: str) -> Obj:
        job = self.env.get("batch/v1", "Job", name, self.namespace)
        assert job is not None, f"Job {self.namespace}/{name} does not exist"
        return job

    def jobs(self, ftj_name: str) -> list[Obj]:
        """The Jobs of a FineTuneJob, oldest first."""
        jobs = self.env.list(
            "batch/v1", "Job", self.namespace, f"{names.LABEL_FINETUNEJOB}={ftj_name}"
        )
        return sorted(jobs, key=lambda j: int(j["metadata"]["resourceVersion"]))

    def wait_job(self, ftj_name: str, count: int = 1, timeout: float = 10.0) -> Obj:
        """The newest Job of a FineTuneJob, once it has `count` Jobs."""

        def enough() -> list[Obj] | None:
            found = self.jobs(ftj_name)
            return found if len(found) >= count else None

        jobs = self.env.wait_for(
            enough, timeout, what=f"{count} Job(s) of FineTuneJob {self.namespace}/{ftj_name}"
        )
        return jobs[-1]

    def pods(self, job_name: str) -> list[Obj]:
        pods = self.env.list("v1", "Pod", self.namespace, f"{JOB_NAME_LABEL}={job_name}")
        return sorted(pods, key=lambda p: int(p["metadata"]["resourceVersion"]))

    # ------------------------------------------------------------ Job controller
    def _job_status(self, name: str, **changes: Any) -> Obj:
        return self.env.patch(
            "batch/v1", "Job", name, {"status": changes}, self.namespace, subresource="status"
        )

    def create_pod(self, job_name: str) -> Obj:
        """The Job controller's pod for a Job: the template with the controller's labels
        and an ownerReference; Pending. The Job counts it as active."""
        pod = self.add_pod(job_name)
        self.count_active(job_name)
        return pod

    def add_pod(self, job_name: str) -> Obj:
        """The first half of `create_pod`: the pod only, the Job's counters unchanged (for
        tests that let the operator see one write at a time)."""
        job = self.job(job_name)
        meta, template = job["metadata"], copy.deepcopy(job["spec"]["template"])
        pod_meta = template.get("metadata") or {}
        pod_meta["generateName"] = f"{meta['name']}-"
        pod_meta["labels"] = {
            **(pod_meta.get("labels") or {}),
            JOB_NAME_LABEL: meta["name"],
            CONTROLLER_UID_LABEL: meta["uid"],
        }
        pod_meta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        spec = template["spec"]
        if self.metrics_port is not None:
            for container in spec["containers"]:
                for port in container.get("ports") or []:
                    if port.get("name") == METRICS_PORT_NAME:
                        port["containerPort"] = self.metrics_port
        return self.env.create(
            {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec},
            self.namespace,
        )

    def count_active(self, job_name: str) -> Obj:
        """The second half of `create_pod`: the Job counts one more active pod (and has
        started)."""
        status = self.job(job_name).get("status") or {}
        return self._job_status(
            job_name,
            active=int(status.get("active") or 0) + 1,
            startTime=status.get("startTime") or now(),
        )

    def run_pod(self, pod: Obj) -> Obj:
        """The kubelet starts the pod: Running, ready, with an IP."""
        name = pod["metadata"]["name"]
        stamp = now()
        status = {
            "phase": "Running",
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "hostIP": POD_IP,
            "startTime": stamp,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": stamp},
                {"type": "Ready", "status": "True", "lastTransitionTime": stamp},
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": stamp}},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        job_name = pod["metadata"]["labels"].get(JOB_NAME_LABEL)
        updated = self.env.patch(
            "v1", "Pod", name, {"status": status}, self.namespace, subresource="status"
        )
        if job_name:
            self._job_status(job_name, ready=1)
        return updated

    def start_pod(self, job_name: str) -> Obj:
        """The Job's pod, created and Running."""
        return self.run_pod(self.create_pod(job_name))

    def finish_pod(self, pod: Obj, result: TrainerResult | None, exit_code: int) -> Obj | None:
        """The trainer exits: the kubelet records the termination message and exit code,
        then the Job controller applies the Job's podFailurePolicy and backoffLimit.
        Returns the replacement pod (Pending) when the Job retries, else None."""
        return self.pod_ended(self.terminate_pod(pod, result, exit_code))

    def terminate_pod(self, pod: Obj, result: TrainerResult | None, exit_code: int) -> Obj:
        """The kubelet's half of `finish_pod`: the pod Succeeded or Failed with the
        trainer's termination message; the Job does not know yet."""
        name = pod["metadata"]["name"]
        current = self.env.get("v1", "Pod", name, self.namespace)
        assert current is not None, f"Pod {name} is gone"
        started = (current.get("status") or {}).get("startTime") or now()
        terminated: Obj = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
        }
        if result is not None:
            terminated["message"] = result.to_termination_message()
        statuses = [
            {**s, "ready": False, "started": False, "state": {"terminated": terminated}}
            for s in current["status"].get("containerStatuses") or []
        ]
        phase = "Succeeded" if exit_code == 0 else "Failed"
        return self.env.patch(
            "v1",
            "Pod",
            name,
            {"status": {"phase": phase, "containerStatuses": statuses}},
            self.namespace,
            subresource="status",
        )

    def pod_ended(self, pod: Obj, replace: bool = True) -> Obj | None:
        """The Job controller's half of `finish_pod`, for a pod `terminate_pod` ended.
        Returns the replacement pod (Pending) when the Job retries, else None; with
        `replace` false the caller makes the replacement (`create_pod`) itself."""
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        exit_code = next(
            s["state"]["terminated"]["exitCode"]
            for s in statuses
            if s["name"] == CONTAINER_NAME and "terminated" in (s.get("state") or {})
        )
        job_name = pod["metadata"]["labels"][JOB_NAME_LABEL]
        job = self.job(job_name)
        spec, status = job["spec"], dict(job.get("status") or {})
        conditions = list(status.get("conditions") or [])
        active = max(0, int(status.get("active") or 0) - 1)
        if exit_code == 0:
            succeeded = int(status.get("succeeded") or 0) + 1
            reached = "Reached expected number of succeeded pods"
            for type_ in ("SuccessCriteriaMet", "Complete"):
                _set_condition(conditions, type_, "True", "CompletionsReached", reached)
            self._job_status(
                job_name,
                active=active,
                ready=0,
                succeeded=succeeded,
                conditions=conditions,
                completionTime=now(),
            )
            return None
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        index, action = next(
            ((i, r["action"]) for i, r in enumerate(rules) if _rule_matches(r, pod, exit_code)),
            (None, "Count"),
        )
        failed = int(status.get("failed") or 0) + (0 if action == "Ignore" else 1)
        reason: str | None = None
        message: str | None = None
        if action == "FailJob":
            reason = "PodFailurePolicy"
            message = (
                f"Container {CONTAINER_NAME} for pod {self.namespace}/{pod['metadata']['name']} "
                f"failed with exit code {exit_code} matching FailJob rule at index {index}"
            )
        elif failed > int(spec.get("backoffLimit", 6)):
            reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        if reason is not None and message is not None:
            for type_ in ("FailureTarget", "Failed"):
                _set_condition(conditions, type_, "True", reason, message)
            self._job_status(job_name, active=active, ready=0, failed=failed, conditions=conditions)
            return None
        self._job_status(job_name, active=active, ready=0, failed=failed)
        return self.create_pod(job_name) if replace else None

    def sync_suspend(self, job_name: str) -> Obj | None:
        """The Job controller reacts to `spec.suspend`: suspending deletes the active pods
        and sets `Suspended`; resuming clears it and creates a pod (returned, Pending)."""
        job = self.job(job_name)
        status = job.get("status") or {}
        conditions = list(status.get("conditions") or [])
        if job["spec"].get("suspend"):
            for pod in self.pods(job_name):
                if (pod.get("status") or {}).get("phase") in ("Pending", "Running"):
                    self.env.delete("v1", "Pod", pod["metadata"]["name"], self.namespace)
            _set_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended")
            self._job_status(job_name, active=0, ready=0, conditions=conditions)
            return None
        if any(c["type"] == "Suspended" for c in conditions):
            _set_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed")
            self._job_status(job_name, conditions=conditions, startTime=now())
        return self.create_pod(job_name)

    # ------------------------------------------------------------------ kubelet
    def set_pod_phase(self, name: str, phase: str) -> Obj:
        """Only the phase (e.g. the cleanup pod's Succeeded or Failed)."""
        return self.env.patch(
            "v1", "Pod", name, {"status": {"phase": phase}}, self.namespace, subresource="status"
        )
