"""Credentials never reach what the operator writes: child objects, status, Events, logs.

Two halves:

- Rendering. Specs that use every Secret reference the API has (model, dataset, per-stage
  and evaluation datasets, output, the settings' default output Secret, the judge's API
  key, a ModelDeployment's artifact and base-model Secrets) are rendered into every child
  (ConfigMap, Job single and multi-node, cleanup Pod, serving Deployment with its fetch
  init containers). Every credential variable must be a `secretKeyRef` to exactly the
  Secret key the spec names; no `value`, no `envFrom`, no Secret volume.
- A reconcile pass against an API whose Secrets hold canary values (the one place the
  operator reads Secrets, to name a missing key): the bodies sent to the API server
  (children, status patches, Events) and the operator's log must hold no canary, whole or
  base64-encoded.

Then the status and Event builders get failures whose messages embed credential-shaped
canaries in every form a library or a server writes them (`KEY=value`, JSON, headers,
URLs, SigV4, token shapes): none may survive into the status or an Event. A bare value with
nothing around it cannot be recognised by the operator; the trainer removes those before
they reach the termination message (tests/integration/test_secret_canary.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest
from kubernetes import client
from test_serving import BASE_REVISION, artifact, make_md

from kubetune.api.contract import JUDGE_API_KEY_ENV, Reason, TrainerResult
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, Variant
from kubetune.operator.cache import Cache
from kubetune.operator.children import build_children, build_cleanup_pod
from kubetune.operator.kube import Kube
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.pod import CREDENTIAL_KEYS, merge_credentials, secret_uses
from kubetune.operator.reconcile import Reconciler
from kubetune.operator.serving import ClusterFeatures, Resolution, plan_serving
from kubetune.operator.serving_objects import build_serving
from kubetune.operator.serving_status import compute_serving_status, dump_serving_status
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import Observed, compute_status, dump_status, events_for
from kubetune.storage.layout import run_id_for

NAMESPACE = "ml-team"
PRIVATE_BASE = "hf://acme/private-7b"
UID = "6f1c7d2e-0000-4000-8000-00000000c0de"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings.model_validate(
    {
        "trainerImage": "registry.example.com/kubetune/trainer:1.0.0",
        "defaultOutputCredentialsSecret": "artifact-store",
        "imagePullSecrets": ["registry-creds"],
        "gpuClasses": [
            {
                "name": "h100-80gb",
                "memoryGiB": 79.6,
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "gpusPerNode": 8,
            }
        ],
    }
)
CREDENTIAL_ENV = {key for keys in CREDENTIAL_KEYS.values() for key, _ in keys} | {JUDGE_API_KEY_ENV}
"""Every environment variable the operator fills from a Secret."""

SECRETS: dict[str, tuple[str, ...]] = {
    "hf-token": ("HF_TOKEN", "HF_ENDPOINT"),
    "data-creds": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "KUBETUNE_HTTPS_TOKEN",
    ),
    "judge-key": ("apiKey",),
    "artifact-store": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
}
"""The Secrets the specs below reference, and the keys each holds."""


def canary() -> str:
    return "kt-canary-" + secrets.token_hex(12)


def every_ref_spec(**extra: Any) -> dict[str, Any]:
    """A FineTuneJob spec using every Secret reference a FineTuneJob has."""
    spec: dict[str, Any] = {
        "model": {"uri": PRIVATE_BASE, "credentialsSecretRef": {"name": "hf-token"}},
        "dataset": {
            "uris": ["s3://ml-data/sft/*.jsonl", "https://data.example.com/extra.jsonl"],
            "credentialsSecretRef": {"name": "data-creds"},
        },
        "method": "LoRA",
        "stages": [
            {"type": "SFT"},
            {
                "type": "DPO",
                "dataset": {
                    "uri": "s3://ml-data/prefs/*.jsonl",
                    "format": "Preference",
                    "credentialsSecretRef": {"name": "data-creds"},
                },
            },
        ],
        "evaluation": {
            "metrics": ["Perplexity", "Judge"],
            "evalDataset": {
                "uri": "https://data.example.com/eval.jsonl",
                "credentialsSecretRef": {"name": "data-creds"},
            },
            "judge": {
                "endpoint": "https://judge.example.com/v1",
                "model": "judge-70b",
                "apiKeySecretRef": {"name": "judge-key", "key": "apiKey"},
            },
        },
        "output": {
            "uri": "s3://ml-artifacts/kubetune",
            "credentialsSecretRef": {"name": "data-creds"},
            "deletePolicy": "Delete",
        },
        "resources": {"gpus": 1, "gpuClass": "h100-80gb"},
    }
    spec.update(extra)
    return spec


def make_job(name: str = "canary-job", **spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": UID, "generation": 1},
            "spec": spec,
        }
    )


JOBS = {
    "every-ref": make_job(**every_ref_spec()),
    "multi-node": make_job(**every_ref_spec(distributed={"nodes": 2, "strategy": "FSDP"})),
    "default-output-secret": make_job(
        **every_ref_spec(
            dataset={
                "uri": "https://data.example.com/sft.jsonl",
                "credentialsSecretRef": {"name": "data-creds"},
            },
            stages=[{"type": "SFT"}],
            output={"uri": "s3://ml-artifacts/kubetune", "deletePolicy": "Delete"},
        )
    ),
}


def serving_cases() -> dict[str, tuple[ModelDeployment, Resolution]]:
    """ModelDeployments with an artifact Secret, and adapters on a private hf:// base."""
    merged = make_md(credentialsSecretRef={"name": "artifact-store"})
    adapters = make_md(
        baseModel={
            "uri": PRIVATE_BASE,
            "revision": BASE_REVISION,
            "credentialsSecretRef": {"name": "hf-token"},
        },
        adapters=[{"name": "support", "fineTuneJobRef": {"name": "support"}}],
        credentialsSecretRef={"name": "data-creds"},
    )
    return {
        "merged-with-artifact-secret": (merged, Resolution(model=artifact(Variant.MERGED))),
        "adapters-on-private-base": (
            adapters,
            Resolution(
                adapters={"support": artifact(Variant.ADAPTER, job="support", base=PRIVATE_BASE)}
            ),
        ),
    }


# --- Walking rendered objects -------------------------------------------------------------


def pod_specs(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The pod specs inside an object (a Pod, or a workload's template)."""
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    template = (obj.get("spec") or {}).get("template")
    return [template["spec"]] if template else []


def containers(pod: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield from pod.get("initContainers") or []
    yield from pod.get("containers") or []


def secret_refs(objects: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    """(variable, Secret, key) of every secretKeyRef in the objects' containers."""
    found = set()
    for obj in objects:
        for pod in pod_specs(obj):
            for container in containers(pod):
                for env in container.get("env") or []:
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        found.add((env["name"], ref["name"], ref["key"]))
    return found


def assert_credentials_by_reference(objects: Sequence[Mapping[str, Any]]) -> None:
    for obj in objects:
        for pod in pod_specs(obj):
            for volume in pod.get("volumes") or []:
                assert "secret" not in volume, volume
                sources = (volume.get("projected") or {}).get("sources") or []
                assert not any("secret" in s for s in sources), volume
            for container in containers(pod):
                where = f"{obj['kind']} {obj['metadata']['name']} container {container['name']}"
                assert "envFrom" not in container, where
                for env in container.get("env") or []:
                    if env["name"] in CREDENTIAL_ENV:
                        assert set(env) == {"name", "valueFrom"}, (where, env)
                        assert set(env["valueFrom"]) == {"secretKeyRef"}, (where, env)


@pytest.mark.parametrize("case", sorted(JOBS))
def test_training_children_reference_every_credential_and_inline_none(case: str) -> None:
    job = JOBS[case]
    run_id = run_id_for(job.spec)
    children = build_children(job, SETTINGS, run_id)
    root = f"{job.spec.output.uri}/{NAMESPACE}/{job.metadata.name}"  # type: ignore[union-attr]
    cleanup = build_cleanup_pod(job, SETTINGS, [root])
    objects = [*children.objects, cleanup]
    assert_credentials_by_reference(objects)
    # Every key the spec asks for is referenced (a dropped reference would hide a leak path).
    wanted, problems = merge_credentials(secret_uses(job.spec, SETTINGS))
    assert problems == []
    assert secret_refs([children.job]) == {(u.env, u.secret, u.key) for u in wanted}
    assert (JUDGE_API_KEY_ENV, "judge-key", "apiKey") in secret_refs([children.job])
    output_secret = "data-creds" if job.spec.output.credentials_secret_ref else "artifact-store"  # type: ignore[union-attr]
    assert {s for _, s, _ in secret_refs([cleanup])} == {output_secret}
    # The ConfigMap carries the spec: Secret names, never anything from inside them.
    config = json.loads(children.config_map["data"]["trainer-config.json"])
    assert config["spec"]["evaluation"]["judge"]["apiKeySecretRef"] == {
        "name": "judge-key",
        "key": "apiKey",
    }


@pytest.mark.parametrize("case", sorted(serving_cases()))
def test_serving_children_reference_credentials_only(case: str) -> None:
    md, resolution = serving_cases()[case]
    children = build_serving(md, resolution, SETTINGS, ClusterFeatures())
    assert_credentials_by_reference(children.objects)
    refs = secret_refs(children.objects)
    assert refs, "the fetch containers get the artifact credentials"
    expected_secrets = {"merged-with-artifact-secret": {"artifact-store"}}.get(
        case, {"data-creds", "hf-token"}
    )
    assert {secret for _, secret, _ in refs} == expected_secrets
    vllm = children.deployment["spec"]["template"]["spec"]["containers"][0]
    assert not [e for e in vllm.get("env") or [] if "valueFrom" in e], "vLLM gets no credential"


# --- A reconcile pass against Secrets holding canaries ---------------------------------------


class RecordingKube(Kube):
    """`Kube` whose requests are recorded instead of sent; Secrets hold canary values."""

    def __init__(self, stored: dict[str, dict[str, str]]) -> None:
        super().__init__(client.ApiClient())
        self.stored = stored
        self.sent: list[tuple[str, Any]] = []

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        name = method.__name__
        self.sent.append((name, [*args, kwargs]))
        if name == "read_namespaced_secret":
            secret_name = args[0]
            if secret_name not in self.stored:
                from kubetune.operator.kube import ApiError

                raise ApiError(404, "NotFound", f'secrets "{secret_name}" not found')
            values = self.stored[secret_name]
            return {
                "kind": "Secret",
                "metadata": {"name": secret_name, "namespace": args[1]},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
            }
        if name == "patch_namespaced_custom_object_status":
            return {"metadata": {"name": args[4], "namespace": args[2]}, **args[5]}
        return None


def stored_secrets(drop: tuple[str, str] | None = None) -> dict[str, dict[str, str]]:
    stored = {name: {key: canary() for key in keys} for name, keys in SECRETS.items()}
    if drop is not None:
        del stored[drop[0]][drop[1]]
    return stored


def forms(value: str) -> set[str]:
    """A secret value as it could appear: as is, or base64 (as in a Secret's data)."""
    encoded = base64.b64encode(value.encode()).decode()
    return {value, encoded, encoded.rstrip("=")}


def assert_no_secret_values(stored: dict[str, dict[str, str]], text: str, where: str) -> None:
    for secret, values in stored.items():
        for key, value in values.items():
            for form in forms(value):
                assert form not in text, f"{secret}/{key} leaked into {where}"


async def _no_scrape(url: str) -> None:
    return None


def reconcile(
    job: FineTuneJob,
    stored: dict[str, dict[str, str]],
    jobs: Sequence[dict[str, Any]] = (),
    pods: Sequence[dict[str, Any]] = (),
) -> RecordingKube:
    cache = Cache()
    body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["metadata"].update(resourceVersion="7", finalizers=["kubetune.io/artifacts"])
    cache.observe_finetunejob(body, False)
    for child in jobs:
        cache.observe_job(child, False)
    for pod in pods:
        cache.observe_pod(pod, False)
    kube = RecordingKube(stored)
    reconciler = Reconciler(cache, kube, SETTINGS, OperatorMetrics(), scrape=_no_scrape)
    asyncio.run(reconciler.reconcile((NAMESPACE, job.metadata.name or "")))
    return kube


def sent(kube: RecordingKube, *methods: str) -> list[Any]:
    return [args for name, args in kube.sent if name in methods]


def test_a_reconcile_reads_secret_keys_and_writes_no_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stored = stored_secrets()
    kube = reconcile(JOBS["every-ref"], stored)
    read = {args[0] for args in sent(kube, "read_namespaced_secret")}
    assert read == {"hf-token", "data-creds", "judge-key"}
    created = [
        args[-2] for args in sent(kube, "create_namespaced_config_map", "create_namespaced_job")
    ]
    assert [obj["kind"] for obj in created] == ["ConfigMap", "Job"]
    writes = [args for name, args in kube.sent if name != "read_namespaced_secret"]
    assert_no_secret_values(stored, json.dumps(writes, default=str), "the API requests")
    assert_no_secret_values(stored, caplog.text, "the operator's log")


def test_a_missing_secret_key_is_named_without_any_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stored = stored_secrets(drop=("data-creds", "AWS_SECRET_ACCESS_KEY"))
    kube = reconcile(JOBS["every-ref"], stored)
    assert not sent(kube, "create_namespaced_job")
    status = sent(kube, "patch_namespaced_custom_object_status")[-1][5]["status"]
    summary = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert summary["reason"] == Reason.SECRET_NOT_FOUND.value
    assert "AWS_SECRET_ACCESS_KEY" in summary["message"]  # names the key it lacks
    assert "AWS_ACCESS_KEY_ID" in summary["message"]  # and the keys it has, by name
    writes = [args for name, args in kube.sent if name != "read_namespaced_secret"]
    assert_no_secret_values(stored, json.dumps(writes, default=str), "the API requests")
    assert_no_secret_values(stored, caplog.text, "the operator's log")


# --- Failure messages that carry credentials ----------------------------------------------


def _token(alphabet: str, length: int) -> str:
    rng = random.SystemRandom()
    return "".join(rng.choice(alphabet) for _ in range(length))


ALNUM = string.ascii_letters + string.digits
SHAPES: dict[str, Callable[[], tuple[str, str]]] = {}
"""Name → a function giving (message, the secret in it), a fresh random secret each call."""


def shaped(name: str, make_secret: Callable[[], str], render: Callable[[str], str]) -> None:
    def make() -> tuple[str, str]:
        value = make_secret()
        return render(value), value

    SHAPES[name] = make


for _label, _template in {
    "env-aws-secret": "AWS_SECRET_ACCESS_KEY={}",
    "env-aws-key-id": "export AWS_ACCESS_KEY_ID={} && aws s3 ls",
    "env-session-token": "AWS_SESSION_TOKEN='{}'",
    "env-hf-token": "HF_TOKEN={} was rejected",
    "env-https-token": "KUBETUNE_HTTPS_TOKEN={}",
    "env-judge-key": f"{JUDGE_API_KEY_ENV}={{}}",
    "yaml-password": "password: {}",
    "ini-secret": "aws_secret_access_key = {}",
    "json-api-key": '{{"api_key": "{}"}}',
    "json-camel-secret": '{{"secretAccessKey": "{}", "region": "us-east-1"}}',
    "json-camel-key-id": '{{"accessKeyId":"{}"}}',
    "json-session-token": '{{"SessionToken": "{}"}}',
    "client-secret": "oauth failed: client_secret={}&grant_type=client_credentials",
    "refresh-token": "refresh_token={}",
    "bearer": "Authorization: Bearer {}",
    "header-token": "X-Amz-Security-Token: {}",
    "presigned-credential": "GET /b/k?X-Amz-Credential={}%2F20260301%2Fus-east-1 403",
    "presigned-token": "GET /b/k?X-Amz-Security-Token={}&X-Amz-Date=20260301 403",
    "sigv4-credential": "Authorization: AWS4-HMAC-SHA256 Credential={}/20260301/us-east-1/s3",
    "url-userinfo": "GET https://trainer:{}@data.example.com/x.jsonl failed",
    "python-repr": "Config(token='{}', endpoint='https://hub')",
}.items():
    shaped(_label, canary, _template.format)

shaped("aws-key-id", lambda: "AKIA" + _token(string.ascii_uppercase + string.digits, 16), str)
shaped("hf-token", lambda: "hf_" + _token(ALNUM, 34), "the Hub refused {}".format)
shaped("openai-key", lambda: "sk-proj-" + _token(ALNUM, 40), "judge said: invalid key {}".format)
shaped(
    "basic-auth",
    lambda: base64.b64encode(f"trainer:{canary()}".encode()).decode(),
    "Authorization: Basic {}".format,
)


def failed_job_and_pod(job: FineTuneJob, message: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's Job, failed, and its pod terminated with a TrainerResult carrying
    `message` (or, when it is not a result, the raw text the kubelet would show)."""
    run_id = run_id_for(job.spec)
    children = build_children(job, SETTINGS, run_id)
    rendered = children.job
    labels = rendered["spec"]["template"]["metadata"]["labels"]
    failed_job = {
        **rendered,
        "status": {
            "failed": 1,
            "startTime": "2026-03-01T10:00:00Z",
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": f"Container trainer for pod exited: {message}",
                    "lastTransitionTime": "2026-03-01T11:00:00Z",
                }
            ],
        },
    }
    result = TrainerResult(reason=Reason.SOURCE_UNAUTHORIZED, message=message)
    pod = {
        "metadata": {
            "name": f"{rendered['metadata']['name']}-abcde",
            "namespace": NAMESPACE,
            "labels": labels,
            "creationTimestamp": "2026-03-01T10:00:00Z",
        },
        "spec": rendered["spec"]["template"]["spec"],
        "status": {
            "phase": "Failed",
            "startTime": "2026-03-01T10:00:00Z",
            "message": message,
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 14,
                            "message": result.to_termination_message(),
                            "startedAt": "2026-03-01T10:00:00Z",
                            "finishedAt": "2026-03-01T11:00:00Z",
                        }
                    },
                }
            ],
        },
    }
    return failed_job, pod


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_failure_messages_lose_their_credentials(name: str) -> None:
    message, value = SHAPES[name]()
    job = JOBS["every-ref"]
    failed, pod = failed_job_and_pod(job, message)
    status = compute_status(job.spec, 1, None, Observed.of(NOW, failed, [pod]))
    written = json.dumps(dump_status(status)) + json.dumps(
        [e.__dict__ for e in events_for(None, status)]
    )
    assert Reason.SOURCE_UNAUTHORIZED.value in written
    for form in forms(value):
        assert form not in written, f"{name}: {message!r} reached the status or an Event"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_serving_failure_messages_lose_their_credentials(name: str) -> None:
    message, value = SHAPES[name]()
    md = make_md(credentialsSecretRef={"name": "artifact-store"})
    resolution = Resolution(model=artifact(Variant.MERGED))
    plan = plan_serving(md, resolution, SETTINGS, ClusterFeatures())
    deployment = build_serving(md, resolution, SETTINGS, ClusterFeatures()).deployment
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    fetch = deployment["spec"]["template"]["spec"]["initContainers"][0]["name"]
    pod = {
        "metadata": {"name": "support-bot-7c9-x", "namespace": NAMESPACE, "labels": labels},
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {
                    "name": fetch,
                    "restartCount": 4,
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": message}},
                    "lastState": {"terminated": {"exitCode": 14, "message": message}},
                }
            ],
        },
    }
    status = compute_serving_status(md, 1, None, deployment, [pod], plan, NOW)
    written = json.dumps(dump_serving_status(status))
    assert "crash-looping" in written
    for form in forms(value):
        assert form not in written, f"{name}: {message!r} reached the ModelDeployment status"


def test_a_reconcile_with_a_failed_pod_writes_no_credential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    made = [SHAPES[name]() for name in sorted(SHAPES)]
    message = "; ".join(text for text, _ in made)[:1000]
    values = [value for text, value in made if text in message]
    job = JOBS["every-ref"]
    failed, pod = failed_job_and_pod(job, message)
    kube = reconcile(job, stored_secrets(), jobs=[failed], pods=[pod])
    writes = json.dumps([args for name, args in kube.sent], default=str)
    assert "create_namespaced_event" in {name for name, _ in kube.sent}
    for value in values:
        for form in forms(value):
            assert form not in writes
            assert form not in caplog.text
