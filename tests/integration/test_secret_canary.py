"""Secret canaries through every credential path of the trainer, then a grep of every byte
the trainer produced.

Each credential the operator can hand the trainer pod (`operator.pod.secret_uses`) gets a
distinct canary value in the environment: the S3 access key id, secret key and session
token (output store and data sources share them: the pod has one environment), the Hugging
Face token, the https dataset token and the LLM judge's API key. Bystanders the operator
never sets (MLflow's credential variables) get canaries too, so anything that dumps the
environment is caught. The trainer then runs as the pod runs it (`python -m
kubetune.trainer`):

- a whole run that uses every credential for real: the data from S3 and from an https
  server that checks the token, the judge behind a server that checks the key (and whose
  first answer echoes the key in an error page), the artifacts to S3;
- runs where the credentials are refused by servers that echo what they received in their
  error bodies (an S3 data source, the Hugging Face Hub, the judge), so that error messages
  and the termination message are checked too.

Sinks checked: stdout, stderr, the termination message, every file on the scratch volume
(work dir, caches, temporary files) and every object the run wrote to the bucket (data,
checkpoints with trainer_state.json, adapter, merged weights, eval files, report.html,
manifest.json with its lineage, TensorBoard files). A canary counts as leaked when it
appears whole, or its first or last `WINDOW` characters do (a truncated message).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
import yaml

from kubetune.api.contract import JUDGE_API_KEY_ENV, Reason
from kubetune.api.v1alpha1.evaluation import JudgeSpec
from kubetune.trainer.evaluate import EvaluationError
from kubetune.trainer.runner import run_from_file
from kubetune.trainer.scoring.judge import judge
from support.openai_server import OpenAIServer, Scripted
from support.s3 import moto_s3

CANARY_PREFIX = "kt-canary-"
WINDOW = 16
"""Characters of a canary's head or tail that count as a leak on their own."""

CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "KUBETUNE_HTTPS_TOKEN",
    JUDGE_API_KEY_ENV,
)
"""Every credential the operator gives the trainer pod from a Secret."""

BYSTANDERS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
"""Credentials of libraries the trainer uses that the operator never sets."""

OUTPUT_BUCKET = "artifacts"
DATA_BUCKET = "raw-data"


def make_canaries() -> dict[str, str]:
    """A distinct random canary per variable, e.g. kt-canary-5f3a9c1e… (24 hex digits)."""
    return {name: CANARY_PREFIX + secrets.token_hex(12) for name in CREDENTIALS + BYSTANDERS}


def leaks(data: bytes, canaries: dict[str, str]) -> list[str]:
    """The variables whose canary (whole, head or tail) appears in `data`."""
    found = []
    for name, value in canaries.items():
        probes = {value, value[:WINDOW], value[-WINDOW:]}
        if any(probe.encode() in data for probe in probes):
            found.append(name)
    if CANARY_PREFIX.encode() in data and not found:
        found.append("(a canary's prefix)")
    return found


@dataclass
class Sinks:
    """Everything one trainer run produced, by where it went."""

    items: dict[str, bytes] = field(default_factory=dict)

    def add(self, where: str, data: bytes) -> None:
        self.items[where] = data

    def add_tree(self, label: str, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.add(f"{label}/{path.relative_to(root).as_posix()}", path.read_bytes())

    def add_bucket(self, endpoint: str, bucket: str, prefix: str = "") -> None:
        client = bucket_client(endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                self.add(f"s3://{bucket}/{item['Key']}", body)

    def leaked(self, canaries: dict[str, str]) -> dict[str, list[str]]:
        """Sink → the variables whose canary it holds (only sinks that hold one)."""
        found = {where: leaks(data, canaries) for where, data in self.items.items()}
        return {where: names for where, names in found.items() if names}


def bucket_client(endpoint: str) -> Any:
    """A boto3 client of the test itself (moto does not check credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required"
        ),
    )


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create the bucket unless this session's moto already has it."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


# --- Servers ------------------------------------------------------------------------------


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class RecordingServer:
    """An HTTP(S) server on 127.0.0.1 that records request headers and answers with
    `answer(method, path, headers) -> (status, extra headers, body)`."""

    def __init__(self, answer: Any, tls: tuple[Path, Path] | None = None) -> None:
        self.answer = answer
        self.headers: list[tuple[str, str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                headers = dict(self.headers)
                server.headers.append((self.command, self.path, headers))
                status, extra, body = server.answer(self.command, self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _reply

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def echo(headers: dict[str, str]) -> str:
    """What a careless server puts in its error page: the credentials it received."""
    wanted = ("authorization", "x-amz-security-token", "x-amz-credential")
    return "; ".join(f"{k}: {v}" for k, v in headers.items() if k.lower() in wanted)


def refuse_s3(method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """An S3 endpoint that refuses the access key and echoes the request's credentials
    (real S3 names the key id in <AWSAccessKeyId>; this one also quotes the headers)."""
    authorization = headers.get("Authorization", "")
    key_id = authorization.partition("Credential=")[2].split("/", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
        "<Message>The AWS Access Key Id you provided does not exist in our records. "
        f"Request: {escape(f'{method} {path} {echo(headers)}')}</Message>"
        f"<AWSAccessKeyId>{key_id}</AWSAccessKeyId><RequestId>canary</RequestId></Error>"
    )
    return 403, {"Content-Type": "application/xml"}, body.encode()


def refuse_bearer(
    method: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """A Hub (or any bearer-token API) that refuses the token and echoes it."""
    body = json.dumps({"error": f"Invalid credentials in {echo(headers)}"}).encode()
    return 401, {"Content-Type": "application/json", "X-Error-Code": "InvalidCredentials"}, body


# --- Running the trainer ------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerRun:
    returncode: int
    result: dict[str, Any]
    sinks: Sinks


def trainer_env(tmp: Path, canaries: dict[str, str], **extra: str) -> dict[str, str]:
    """The pod's environment: scratch-volume caches, the canaries, nothing of the host's
    credentials."""
    scratch = tmp / "scratch"
    for sub in ("home", "tmp", "huggingface", "cache"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "HF_", "KUBETUNE_", "MLFLOW_", "SSL_"))
    }
    env.update(
        HOME=str(scratch / "home"),
        TMPDIR=str(scratch / "tmp"),
        HF_HOME=str(scratch / "huggingface"),
        KUBETUNE_CACHE_DIR=str(scratch / "cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(canaries)
    env.update(extra)
    return env


def run_trainer(tmp: Path, config: dict[str, Any], env: dict[str, str]) -> TrainerRun:
    """`python -m kubetune.trainer` as in the pod; collects its output and scratch files."""
    config_path = tmp / "trainer-config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result_path = tmp / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(config_path),
         "--result-file", str(result_path), "--work-dir", str(tmp / "scratch" / "work")],
        env=env, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    sinks = Sinks()
    sinks.add("stdout", proc.stdout)
    sinks.add("stderr", proc.stderr)
    sinks.add("trainer-config (the ConfigMap)", config_path.read_bytes())
    result: dict[str, Any] = {}
    if result_path.exists():
        sinks.add("termination message", result_path.read_bytes())
        result = json.loads(result_path.read_text())
    sinks.add_tree("scratch", tmp / "scratch")
    return TrainerRun(proc.returncode, result, sinks)


def run_here(
    tmp: Path,
    config: dict[str, Any],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> TrainerRun:
    """The trainer's main in this process (a run that fails before training needs no second
    torch import); the log is captured at the pod's level, INFO."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "HF_", "KUBETUNE_", "MLFLOW_", "SSL_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO)
    config_path = tmp / "trainer-config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result_path = tmp / "termination-log"
    capfd.readouterr()
    code = run_from_file(config_path, result_path, tmp / "scratch" / "work")
    out, err = capfd.readouterr()
    sinks = Sinks()
    sinks.add("stdout", out.encode())
    sinks.add("stderr", err.encode())
    sinks.add("log", caplog.text.encode())
    sinks.add("trainer-config (the ConfigMap)", config_path.read_bytes())
    sinks.add("termination message", result_path.read_bytes())
    sinks.add_tree("scratch", tmp / "scratch")
    return TrainerRun(code, json.loads(result_path.read_text()), sinks)


def run_config(spec: dict[str, Any], output_uri: str, run_id: str) -> dict[str, Any]:
    """A TrainerConfig; moto keeps its buckets for the whole session, so each test uses its
    own run id."""
    return {
        "run": {"namespace": "team", "jobName": "canary", "runId": run_id, "outputUri": output_uri},
        "spec": spec,
        "metricsPort": 0,
    }


def rows(count: int, start: int = 0) -> bytes:
    lines = [
        json.dumps({"instruction": f"Write the number {i} in digits.", "output": str(i)})
        for i in range(start, start + count)
    ]
    return ("\n".join(lines) + "\n").encode()


def context(data: bytes, probe: bytes, chars: int = 80) -> str:
    """The text around the first occurrence of `probe` in `data`."""
    at = data.find(probe)
    return data[max(0, at - chars) : at + len(probe) + chars].decode(errors="replace")


def assert_no_leaks(run: TrainerRun, canaries: dict[str, str]) -> None:
    leaked = run.sinks.leaked(canaries)
    where = {
        sink: [names, context(run.sinks.items[sink], CANARY_PREFIX.encode())]
        for sink, names in leaked.items()
    }
    assert not leaked, f"credentials leaked into: {json.dumps(where, indent=1)}"


@pytest.fixture
def canaries() -> dict[str, str]:
    return make_canaries()


@pytest.fixture
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def moto() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


# --- The tests ----------------------------------------------------------------------------


def test_the_probe_finds_a_canary_whole_or_truncated() -> None:
    canaries = make_canaries()
    value = canaries["AWS_SECRET_ACCESS_KEY"]
    assert leaks(f"x={value};".encode(), canaries) == ["AWS_SECRET_ACCESS_KEY"]
    assert leaks(f"...{value[:20]}...".encode(), canaries) == ["AWS_SECRET_ACCESS_KEY"]
    assert leaks(f"...{value[-20:]}".encode(), canaries) == ["AWS_SECRET_ACCESS_KEY"]
    assert leaks(b"nothing here", canaries) == []


def test_a_whole_run_with_every_credential_leaks_none(
    tmp_path: Path,
    tiny_model_dir: Path,
    moto: str,
    tls: tuple[Path, Path],
    canaries: dict[str, str],
) -> None:
    token = canaries["KUBETUNE_HTTPS_TOKEN"]
    key = canaries[JUDGE_API_KEY_ENV]

    def validation_set(method: str, path: str, headers: dict[str, str]) -> Any:
        if headers.get("Authorization") != f"Bearer {token}":
            return refuse_bearer(method, path, headers)
        return 200, {"Content-Type": "application/jsonl"}, rows(8, start=100)

    def judge_reply(body: dict[str, Any]) -> str:
        system = body["messages"][0]["content"]
        return "Verdict: A" if "Verdict" in system else "Score: 7"

    client = bucket_client(moto)
    for bucket in (OUTPUT_BUCKET, DATA_BUCKET):
        ensure_bucket(client, bucket)
    client.put_object(Bucket=DATA_BUCKET, Key="support/train.jsonl", Body=rows(40))
    with RecordingServer(validation_set, tls=tls) as https, OpenAIServer(judge_reply) as judge:
        # The first judge answer is an error page quoting the request's Authorization header,
        # cut where a 200-character excerpt of it ends (the judge retries and logs it).
        page = "Error: " * 23 + f"Authorization: Bearer {key} was not accepted"
        judge.push(Scripted(500, body=page))
        spec = {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {
                "uri": f"s3://{DATA_BUCKET}/support/*.jsonl",
                "credentialsSecretRef": {"name": "s3-data"},
                "validation": {"uri": f"{https.url}/val.jsonl"},
            },
            "method": "LoRA",
            "lora": {"rank": 4},
            "training": {
                "maxSteps": 1,
                "batchSize": 4,
                "maxSeqLength": 96,
                "logEverySteps": 1,
                "checkpoint": {"everySteps": 1},
            },
            "evaluation": {
                "metrics": ["Perplexity", "Judge"],
                "maxSamples": 2,
                "generation": {"maxNewTokens": 8},
                "judge": {
                    "endpoint": judge.url,
                    "model": "judge-1",
                    "maxRetries": 1,
                    "apiKeySecretRef": {"name": "judge", "key": "apiKey"},
                },
            },
            "tracking": {"tensorBoard": {}},
            "output": {
                "uri": f"s3://{OUTPUT_BUCKET}/kubetune",
                "endpoint": moto,
                "credentialsSecretRef": {"name": "s3-artifacts"},
            },
        }
        env = trainer_env(tmp_path, canaries, AWS_ENDPOINT_URL_S3=moto, SSL_CERT_FILE=str(tls[0]))
        started = time.monotonic()
        run = run_trainer(
            tmp_path, run_config(spec, f"s3://{OUTPUT_BUCKET}/kubetune", "whole"), env
        )
        elapsed = time.monotonic() - started

    stderr = run.sinks.items["stderr"].decode(errors="replace")
    assert run.returncode == 0, stderr[-3000:]
    assert run.result["reason"] == Reason.SUCCEEDED.value, run.result
    # Every credential was used for real: the servers received them.
    assert f"Bearer {token}" in {h.get("Authorization") for _, _, h in https.headers}
    assert {r.headers.get("Authorization") for r in judge.requests} == {f"Bearer {key}"}
    assert len(judge.requests) > 1  # the refused first answer was retried
    run.sinks.add_bucket(moto, OUTPUT_BUCKET, "kubetune/team/canary/whole/")
    published = [w for w in run.sinks.items if w.startswith(f"s3://{OUTPUT_BUCKET}/")]
    for expected in ("manifest.json", "eval/report.html", "eval/samples.jsonl", "trainer_state"):
        assert any(expected in w for w in published), (expected, published)
    assert_no_leaks(run, canaries)
    print(f"whole run: {elapsed:.1f} s, {len(run.sinks.items)} sinks checked")


def quick_spec(model: str, dataset: str, output: str, moto: str) -> dict[str, Any]:
    """A spec that fails before training when a source refuses its credentials."""
    return {
        "model": {"uri": model, "credentialsSecretRef": {"name": "model-creds"}},
        "dataset": {"uri": dataset, "credentialsSecretRef": {"name": "data-creds"}},
        "training": {"maxSteps": 1, "batchSize": 2, "maxSeqLength": 64},
        "output": {"uri": output, "endpoint": moto},
    }


@pytest.mark.parametrize("source", ["s3-data", "hf-model", "https-data"])
def test_refused_credentials_leak_nothing_into_messages_or_logs(
    source: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    moto: str,
    tls: tuple[Path, Path],
    canaries: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import huggingface_hub.constants

    ensure_bucket(bucket_client(moto), OUTPUT_BUCKET)
    output = f"s3://{OUTPUT_BUCKET}/kubetune"
    answer = refuse_s3 if source == "s3-data" else refuse_bearer
    with RecordingServer(answer, tls=tls if source == "https-data" else None) as server:
        env = trainer_env(tmp_path, canaries, SSL_CERT_FILE=str(tls[0]))
        model, dataset = str(tiny_model_dir), "builtin://quickstart"
        if source == "s3-data":
            env["AWS_ENDPOINT_URL_S3"] = server.url  # the output names its own endpoint
            dataset = f"s3://{DATA_BUCKET}/support/*.jsonl"
        elif source == "hf-model":
            env.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0")
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            model = "hf://acme/private-model"
        else:
            dataset = f"{server.url}/support.jsonl"
        config = run_config(quick_spec(model, dataset, output, moto), output, source)
        run = run_here(tmp_path, config, env, monkeypatch, capfd, caplog)

    assert run.result["reason"] == Reason.SOURCE_UNAUTHORIZED.value, run.result
    assert run.returncode != 0
    received = " ".join(echo(headers) for _, _, headers in server.headers)
    expected = {
        "s3-data": canaries["AWS_ACCESS_KEY_ID"],
        "hf-model": f"Bearer {canaries['HF_TOKEN']}",
        "https-data": f"Bearer {canaries['KUBETUNE_HTTPS_TOKEN']}",
    }[source]
    assert expected in received  # the server got the credential, and echoed it
    run.sinks.add_bucket(moto, OUTPUT_BUCKET, f"kubetune/team/canary/{source}/")
    assert_no_leaks(run, canaries)


def test_a_refused_judge_key_is_not_in_the_error_nor_the_log(canaries: dict[str, str]) -> None:
    key = canaries[JUDGE_API_KEY_ENV]
    lines: list[str] = []
    with OpenAIServer() as server:
        page = "Error: " * 23 + f"Authorization: Bearer {key} is not a valid key"
        server.push(*[Scripted(401, body=page)] * 4)
        spec = JudgeSpec.model_validate(
            {"endpoint": server.url, "model": "judge-1", "mode": "Rubric", "maxRetries": 0}
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(JUDGE_API_KEY_ENV, key)
            with pytest.raises(EvaluationError) as caught:
                judge(spec, ["Q?"], ["A."], ["A."], ["B."], log=lines.append, max_tokens=8)
    assert server.requests[0].headers["Authorization"] == f"Bearer {key}"
    assert caught.value.reason == Reason.SOURCE_UNAUTHORIZED
    message = str(caught.value)
    assert "[redacted]" in message  # the server's words are quoted, the key removed
    assert leaks(message.encode(), canaries) == []
    assert leaks("\n".join(lines).encode(), canaries) == []


@pytest.mark.parametrize(
    ("target", "gets_token"),
    [
        pytest.param("https://127.0.0.1:{tls}/data.jsonl", True, id="same-origin"),
        pytest.param("https://localhost:{tls}/data.jsonl", False, id="other-host"),
        pytest.param("http://127.0.0.1:{plain}/data.jsonl", False, id="downgrade-to-http"),
    ],
)
def test_the_https_token_does_not_follow_a_redirect_to_another_origin(
    target: str,
    gets_token: bool,
    tmp_path: Path,
    tls: tuple[Path, Path],
    canaries: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune.trainer.data.sources import expand

    token = canaries["KUBETUNE_HTTPS_TOKEN"]

    def answer(method: str, path: str, headers: dict[str, str]) -> Any:
        if path == "/moved.jsonl":
            location = target.format(tls=secure.port, plain=plain.port)
            return 302, {"Location": location}, b""
        return 200, {}, rows(2)

    monkeypatch.setenv("KUBETUNE_HTTPS_TOKEN", token)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    with RecordingServer(answer, tls=tls) as secure, RecordingServer(answer) as plain:
        files = expand(f"{secure.url}/moved.jsonl", tmp_path)
    assert files[0].path is not None
    assert files[0].path.read_bytes() == rows(2)
    assert secure.headers[0][2].get("Authorization") == f"Bearer {token}"
    followed = [h for _, p, h in secure.headers + plain.headers if p == "/data.jsonl"]
    assert len(followed) == 1
    assert followed[0].get("Authorization") == (f"Bearer {token}" if gets_token else None)
