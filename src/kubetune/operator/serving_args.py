"""The vLLM command line of a ModelDeployment, and the flags that vLLM knows.

`vllm_flags.json` records every option of `vllm serve` in the vLLM version of the pinned
image (`settings.DEFAULT_VLLM_IMAGE`), the LoRA ranks that version accepts and its metric
names. The builders emit only flags from that record (a golden test checks it), and
`spec.vllm.extraArgs` is checked against it before anything is created: a typo such as
`--max-num-seq` is refused with the flag named at `kubectl apply` time instead of a pod
that crash-loops an hour later on an `unrecognized arguments` error.

vLLM reads `--flag value`, `--flag=value`, underscores for dashes (`--max_num_seqs`) and
JSON keys (`--compilation-config.mode 3`); the check normalises all of them the same way.
Flags the operator sets itself (the port, the served names, the LoRA modules, the
settings that have a field in `spec.vllm`) are refused in extraArgs with the field to use
instead, so the two never disagree.

An image other than the recorded version (`spec.vllm.image`, or operator settings pointing
at another tag) may know other flags: extraArgs are then checked for operator-managed
flags only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

FLAGS_FILE = "vllm_flags.json"
PORT = 8000
PORT_NAME = "http"
MODELS_DIR = "/models"

MANAGED_FLAGS: dict[str, str] = {
    "--model": "the served artifact (spec.model or spec.baseModel)",
    "--served-model-name": "metadata.name and spec.adapters[].name",
    "--port": f"the operator (the Service and the probes use port {PORT})",
    "--host": "the operator (vLLM listens on every interface of the pod)",
    "--uds": "the operator (the Service and the probes need the HTTP port)",
    "--headless": "the operator (a headless engine serves no HTTP endpoint)",
    "--grpc": "the operator (the Service and the probes need the HTTP server)",
    "--config": "the operator (a config file would bypass these checks)",
    "--lora-modules": "spec.adapters (or variant Adapter)",
    "--enable-lora": "spec.adapters (or variant Adapter)",
    "--no-enable-lora": "spec.adapters (or variant Adapter)",
    "--max-lora-rank": "spec.vllm.maxLoraRank",
    "--max-loras": "spec.vllm.maxLoras",
    "--max-model-len": "spec.vllm.maxModelLen",
    "--tensor-parallel-size": "spec.vllm.tensorParallelSize",
    "-tp": "spec.vllm.tensorParallelSize",
    "--gpu-memory-utilization": "spec.vllm.gpuMemoryUtilization",
    "--load-format": "the operator (only safetensors are loaded)",
}
"""Flags the operator sets, with the field (or reason) that controls them instead."""

_NUMBER = re.compile(r"^-?[0-9.]+([eE][-+]?[0-9]+)?$")


@dataclass(frozen=True)
class VLLMRecord:
    """What `vllm_flags.json` records about one vLLM version.

    Attributes:
        version: the vLLM version, e.g. 0.33.0.
        image: the image it was recorded from.
        flags: every option of `vllm serve`, long and short.
        max_lora_ranks: the values `--max-lora-rank` accepts.
        metrics: Prometheus metric names by `spec.autoscaling.metric` value.
        entrypoint: the image's ENTRYPOINT, also used as the container command.
    """

    version: str
    image: str
    flags: frozenset[str]
    max_lora_ranks: tuple[int, ...]
    metrics: dict[str, str]
    entrypoint: tuple[str, ...]

    def checks_flags_of(self, image: str) -> bool:
        """Whether `image` runs this vLLM version: same tag (a mirror of the image counts)."""
        tag = image.rsplit("/", 1)[-1]
        return ":" in tag and "@" not in tag and tag.split(":", 1)[1] == f"v{self.version}"


@cache
def vllm_record() -> VLLMRecord:
    """The recorded flags of the pinned vLLM version (read once)."""
    text = resources.files("kubetune.operator").joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return VLLMRecord(
        version=str(data["vllmVersion"]),
        image=str(data["image"]),
        flags=frozenset(str(f) for f in data["flags"]),
        max_lora_ranks=tuple(int(r) for r in data["maxLoraRanks"]),
        metrics={str(k): str(v) for k, v in data["metrics"].items()},
        entrypoint=tuple(str(p) for p in data["entrypoint"]),
    )


def flag_name(token: str) -> str | None:
    """The option a command-line token names, as vLLM normalises it, or None for a value.

    `--max_num_seqs=8` → `--max-num-seqs`; `--compilation-config.mode` →
    `--compilation-config`; `-O3` → `-O`; `-tp` → `-tp`; `4`, `-1` and JSON → None.
    """
    if not token.startswith("-") or token == "-" or _NUMBER.match(token):
        return None
    if token.startswith("--"):
        key = token.split("=", 1)[0].split(".", 1)[0]
        return "--" + key[2:].replace("_", "-")
    if token.startswith("-O"):
        return "-O"
    return token.split("=", 1)[0].split(".", 1)[0]


@dataclass(frozen=True)
class ArgProblem:
    """One refused entry of `spec.vllm.extraArgs`."""

    index: int
    message: str

    @property
    def field(self) -> str:
        """The spec field of the entry."""
        return f"spec.vllm.extraArgs[{self.index}]"


def check_extra_args(
    extra_args: Sequence[str], image: str, record: VLLMRecord | None = None
) -> list[ArgProblem]:
    """Every problem with `spec.vllm.extraArgs`: a value before any flag, a flag the
    operator manages, or (for the recorded vLLM version) a flag vLLM does not know."""
    record = record or vllm_record()
    check_known = record.checks_flags_of(image)
    problems = []
    seen_flag = False
    for index, token in enumerate(extra_args):
        name = flag_name(token)
        if name is None:
            if not seen_flag:
                problems.append(
                    ArgProblem(
                        index,
                        f"{token!r} is not a flag: extraArgs are vLLM options such as "
                        "--max-num-seqs 64 (the model is set by the operator)",
                    )
                )
            continue
        seen_flag = True
        if name in MANAGED_FLAGS:
            problems.append(
                ArgProblem(index, f"{name} is set by {MANAGED_FLAGS[name]}: remove it here")
            )
        elif check_known and name not in record.flags:
            problems.append(
                ArgProblem(
                    index,
                    f"{name} is not an option of vllm serve in vLLM {record.version} "
                    f"({record.image}): check the spelling (vllm serve --help=all lists them)",
                )
            )
    return problems


def lora_rank_for(rank: int, record: VLLMRecord | None = None) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of `rank`, or None
    when the rank exceeds vLLM's largest."""
    record = record or vllm_record()
    return next((r for r in record.max_lora_ranks if r >= rank), None)


@dataclass(frozen=True)
class LoRAModule:
    """One adapter vLLM serves: its served name and its folder in the pod."""

    name: str
    path: str


def build_vllm_args(
    model_path: str,
    served_name: str,
    *,
    tensor_parallel_size: int,
    gpu_memory_utilization: str,
    max_model_len: int | None = None,
    quantized: bool = False,
    lora_modules: Sequence[LoRAModule] = (),
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The arguments of `vllm serve` (the image's entrypoint) for one deployment.

    Quantized variants are compressed-tensors checkpoints; `--quantization
    compressed-tensors` makes vLLM check that the checkpoint's config says so. Only
    safetensors are loaded (no pickle). extraArgs come last, after every operator flag.
    """
    args = [
        model_path,
        "--served-model-name",
        served_name,
        "--port",
        str(PORT),
        "--load-format",
        "safetensors",
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--gpu-memory-utilization",
        gpu_memory_utilization,
    ]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if quantized:
        args += ["--quantization", "compressed-tensors"]
    if lora_modules:
        args += ["--enable-lora", "--lora-modules"]
        args += [f"{module.name}={module.path}" for module in lora_modules]
        if max_lora_rank is not None:
            args += ["--max-lora-rank", str(max_lora_rank)]
        if max_loras is not None:
            args += ["--max-loras", str(max_loras)]
    return args + list(extra_args)


def emitted_flags(args: Sequence[str]) -> list[str]:
    """The flags in a command line (for the golden test and for reviewers)."""
    return [name for name in (flag_name(token) for token in args) if name is not None]
