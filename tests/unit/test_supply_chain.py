"""What kubetune loads and where it writes (DESIGN §7): safetensors only unless pickle is
allowed, no model code unless trusted, and artifact keys that cannot leave their prefix.

- Weights: the loader never falls back to pickle weights, even when the safetensors go
  missing after the folder was checked; `allowPickle` and `trustRemoteCode` are false by
  default in the API, in the CRD, in every example and in the TrainerConfig the operator
  renders; vLLM is told to load safetensors only and is not told to trust model code.
- Keys: `..`, absolute paths, backslashes and control characters are refused everywhere a
  key is made (validate_key, RunLayout, the local and S3 stores, manifests and checkpoint
  markers read back); URL-encoded traversal is a literal name (never decoded) and stays
  inside the prefix; a symbolic link in a local store cannot take a read or a write out of
  it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.finetunejob import ModelSource
from kubetune.operator.children import build_config_map
from kubetune.operator.pod import CONFIG_KEY
from kubetune.operator.serving_args import build_vllm_args, emitted_flags
from kubetune.operator.settings import OperatorSettings
from kubetune.storage.errors import InvalidKey, ManifestMismatch
from kubetune.storage.fetch import marker_files
from kubetune.storage.layout import RunLayout, parse_run_uri
from kubetune.storage.local import LocalStore
from kubetune.storage.manifest import parse_manifest
from kubetune.storage.store import validate_key
from kubetune.trainer.resolve import ModelResolutionError, resolve_model

REPO = Path(__file__).resolve().parents[2]
SHA = "0" * 64


# --- Weights and model code ---------------------------------------------------------------


def test_pickle_and_remote_code_are_off_by_default_everywhere() -> None:
    source = ModelSource(uri="hf://org/name")
    assert (source.allow_pickle, source.trust_remote_code) == (False, False)
    crd = yaml.safe_load((REPO / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    model = schema["properties"]["spec"]["properties"]["model"]["properties"]
    assert model["allowPickle"]["default"] is False
    assert model["trustRemoteCode"]["default"] is False
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            spec_model = ((document or {}).get("spec") or {}).get("model") or {}
            assert spec_model.get("allowPickle", False) is False, path.name
            assert spec_model.get("trustRemoteCode", False) is False, path.name


def test_the_rendered_trainer_config_spells_both_settings_out() -> None:
    """`kubectl get configmap <job>-<run>-config -o yaml` shows what the trainer will allow."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bot", "namespace": "ml-team", "uid": "u-1"},
            "spec": {
                "model": {"uri": "hf://org/name"},
                "dataset": {"uri": "s3://data/train.jsonl"},
                "output": {"uri": "s3://artifacts/runs"},
            },
        }
    )
    config = build_config_map(job, OperatorSettings(), "0123456789ab")
    model = json.loads(config["data"][CONFIG_KEY])["spec"]["model"]
    assert model["trustRemoteCode"] is False
    assert model["allowPickle"] is False


def _tiny_copy(tiny_model_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_model_dir, target)
    return target


def test_the_loader_never_falls_back_to_pickle(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A folder that passed the checks loses its safetensors before the load (a swapped
    volume, a race): the load fails instead of reading pytorch_model.bin."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = _tiny_copy(tiny_model_dir, tmp_path / "model")
    weights = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, folder / "pytorch_model.bin")
    resolved = resolve_model(ModelSource(uri=str(folder)), cache_dir=tmp_path / "cache")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(str(folder), **resolved.from_pretrained_kwargs())
    allowed = resolve_model(
        ModelSource.model_validate({"uri": str(folder), "allowPickle": True}),
        cache_dir=tmp_path / "cache",
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder), **allowed.from_pretrained_kwargs())
    assert all(not p.detach().any() for p in model.parameters())  # the pickle, as asked


def test_model_code_is_refused_before_anything_is_imported(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}
        )
    )
    with pytest.raises(ModelResolutionError) as caught:
        resolve_model(ModelSource(uri=str(folder)), cache_dir=tmp_path / "cache")
    assert caught.value.reason == Reason.MODEL_NEEDS_REMOTE_CODE
    assert not marker.exists()


def test_vllm_loads_safetensors_only_and_trusts_no_model_code() -> None:
    args = build_vllm_args(
        model_path="/models/merged",
        served_name="bot",
        tensor_parallel_size=1,
        gpu_memory_utilization="0.9",
    )
    assert args[args.index("--load-format") + 1] == "safetensors"
    assert "--trust-remote-code" not in emitted_flags(args)


# --- Keys ----------------------------------------------------------------------------------

ESCAPING_KEYS = [
    pytest.param("..", id="dotdot"),
    pytest.param("../other-run/manifest.json", id="parent"),
    pytest.param("adapter/../../../etc/passwd", id="deep-parent"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("\\etc\\passwd", id="absolute-backslash"),
    pytest.param("..\\..\\x", id="backslash-parent"),
    pytest.param("adapter\\..\\..\\x", id="backslash-inside"),
    pytest.param("C:\\Windows\\x", id="drive"),
    pytest.param("adapter/./x", id="dot"),
    pytest.param("adapter//x", id="empty-segment"),
    pytest.param("adapter/x\x00.json", id="nul"),
    pytest.param("adapter/\nx", id="newline"),
    pytest.param("", id="empty"),
]
LITERAL_KEYS = [
    pytest.param("%2e%2e/x", id="url-encoded-dots"),
    pytest.param("..%2fx", id="url-encoded-slash"),
    pytest.param("%2E%2E%2F%2E%2E%2Fetc", id="url-encoded-all"),
    pytest.param("adapter/%2e%2e/%2e%2e/x", id="url-encoded-inside"),
    pytest.param("\uff0e\uff0e/x", id="fullwidth-dots"),
    pytest.param("...", id="three-dots"),
    pytest.param("~/x", id="tilde"),
]


@pytest.fixture(scope="module")
def s3() -> Any:
    """An S3 store that is never contacted (every key below is refused before a request)."""
    from kubetune.storage.s3 import S3Store

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        return S3Store("bucket", "runs", endpoint_url="http://127.0.0.1:9")


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_escaping_keys_are_refused_everywhere(key: str, tmp_path: Path, s3: Any) -> None:
    layout = RunLayout("s3://bucket/runs", "ml-team", "bot", "0123456789ab")
    store = LocalStore(tmp_path / "store")
    calls: list[Callable[[], object]] = [
        lambda: validate_key(key),
        lambda: layout.key(key),
        lambda: store.put_bytes(b"x", key),
        lambda: store.get_bytes(key),
        lambda: store.uri_for(key),
        lambda: s3.uri_for(key),
        lambda: s3.put_bytes(b"x", key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey) as caught:
            call()
        assert caught.value.reason == Reason.INVALID_SPEC
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


@pytest.mark.parametrize("key", LITERAL_KEYS)
def test_encoded_traversal_is_a_literal_name_inside_the_prefix(key: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    store.put_bytes(b"x", key)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1
    assert root.resolve() in written[0].resolve().parents
    assert written[0].relative_to(root).as_posix() == key  # not decoded, not normalised
    assert [o.key for o in store.list()] == [key]


def _manifest(path: str) -> bytes:
    document: dict[str, Any] = {
        "schemaVersion": 1,
        "runId": "0123456789ab",
        "namespace": "ml-team",
        "jobName": "bot",
        "createdAt": "2026-03-01T12:00:00Z",
        "files": [{"path": path, "size": 1, "sha256": SHA}],
    }
    return json.dumps(document).encode()


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_a_manifest_or_marker_naming_an_escaping_path_is_refused(key: str) -> None:
    """A tampered manifest.json in a bucket cannot make `kubetune fetch` write outside its
    folder, nor a tampered checkpoint marker make a resume read outside the checkpoint."""
    with pytest.raises(ManifestMismatch, match="not a valid manifest"):
        parse_manifest(_manifest(key))
    assert marker_files({"files": [{"path": key, "size": 1, "sha256": SHA}]}) == ()


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/runs/ml-team/bot/..",
        "s3://bucket/runs/ml-team/../0123456789ab",
        "s3://bucket/runs/%2e%2e/bot/0123456789ab",
        "pvc://claim/runs/ml-team/bot/0123456789ab\\..",
    ],
)
def test_a_run_uri_with_traversal_is_not_a_run(uri: str) -> None:
    with pytest.raises(InvalidKey):
        parse_run_uri(uri)


# --- Symbolic links in a local store ---------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("not an artifact")
    return folder


def test_a_write_through_a_linked_folder_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "store"
    (root / "ml-team").mkdir(parents=True)
    (root / "ml-team" / "bot").symlink_to(outside, target_is_directory=True)
    store = LocalStore(root)
    for call in (
        lambda: store.put_bytes(b"x", "ml-team/bot/run/manifest.json"),
        lambda: store.put_file(outside / "secret.txt", "ml-team/bot/run/a.bin"),
        lambda: store.delete_prefix("ml-team/bot"),
        lambda: store.list("ml-team/bot"),
    ):
        with pytest.raises(InvalidKey, match="symbolic link"):
            call()
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_a_read_through_a_linked_file_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "store"
    run = root / "ml-team" / "bot" / "run"
    run.mkdir(parents=True)
    (run / "tokenizer.json").symlink_to(outside / "secret.txt")
    (run / "config.json").write_text("{}")
    (run / "alias.json").symlink_to(run / "config.json")  # inside the store: fine
    store = LocalStore(root)
    assert [o.key for o in store.list("ml-team/bot/run")] == [
        "ml-team/bot/run/alias.json",
        "ml-team/bot/run/config.json",
    ]
    assert store.get_bytes("ml-team/bot/run/alias.json") == b"{}"
    for call in (
        lambda: store.get_bytes("ml-team/bot/run/tokenizer.json"),
        lambda: store.get_file("ml-team/bot/run/tokenizer.json", tmp_path / "copy"),
        lambda: store.open_read("ml-team/bot/run/tokenizer.json"),
    ):
        with pytest.raises(InvalidKey, match="symbolic link"):
            call()
    assert not (tmp_path / "copy").exists()
