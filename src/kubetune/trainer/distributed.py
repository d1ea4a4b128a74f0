"""Several trainer processes training one model: torchrun's environment, the process group,
the Trainer's strategy arguments, and who does what.

`torchrun` starts one trainer process per GPU: the operator's pod command when a pod has
several GPUs or the job several nodes, and `kubetune run --nproc-per-node N` locally. Every
process runs the same recipe, divided like this:

- rank 0 prepares the data and publishes everything (checkpoints, the trained weights, the
  evaluation, the manifest); the other ranks read what it published and never write to the
  artifact store (a write from them is a bug and raises);
- every rank trains: DDP keeps a replica of the model on each GPU, FSDP and DeepSpeed ZeRO
  shard parameters, gradients and optimizer state across them;
- the trained weights are gathered once into rank 0's files; then the other ranks leave and
  rank 0 evaluates, merges, quantizes and publishes alone.

Each process has its own scratch folder: rank 0 uses the work dir, rank r `ranks/<r>` in it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import StageType
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.methods import PROMPT_LEARNING_METHODS, Method
from kubetune.api.v1alpha1.training import DistributedSpec, DistributedStrategy
from kubetune.calc.memory import DEEPSPEED_MAX_LIVE_PARAMETERS, DEEPSPEED_REDUCE_BUCKET
from kubetune.storage import ObjectInfo, Store
from kubetune.trainer.models import TrainingSetupError

TIMEOUT_ENV = "KUBETUNE_DISTRIBUTED_TIMEOUT_MINUTES"
"""How long a rank waits for the others at a collective (rank 0 preparing the data, a
checkpoint upload) before the run fails; default 60 minutes."""
SHARDED = (
    DistributedStrategy.FSDP,
    DistributedStrategy.DEEPSPEED_ZERO2,
    DistributedStrategy.DEEPSPEED_ZERO3,
)
DISTRIBUTED_STAGES = (StageType.SFT, StageType.DPO, StageType.KTO)
"""Stage types that train across several processes (through the transformers Trainer)."""


@dataclass(frozen=True)
class Topology:
    """This process's place among the trainer processes (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: prepares the data and publishes."""
        return self.rank == 0

    def work_dir(self, work_dir: Path) -> Path:
        """This process's scratch folder."""
        return work_dir if self.rank == 0 else work_dir / "ranks" / str(self.rank)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} (local rank {self.local_rank})"


def topology(env: Mapping[str, str] | None = None) -> Topology:
    """The topology torchrun describes in the environment (one process when it does not)."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        value = env.get(name, "")
        return int(value) if value.isdigit() else default

    world = number("WORLD_SIZE", 1)
    return Topology(
        rank=number("RANK", 0),
        world_size=world,
        local_rank=number("LOCAL_RANK", 0),
        local_world_size=number("LOCAL_WORLD_SIZE", world),
    )


def check(spec: FineTuneJobSpec, topo: Topology, *, cuda: bool) -> None:
    """Refuse, before any work, what does not train across several processes."""
    if not topo.distributed:
        return
    strategy = _strategy(spec.distributed)
    problems = []
    if len(spec.stages) > 1 or spec.stages[0].type not in DISTRIBUTED_STAGES:
        kinds = ", ".join(s.value for s in DISTRIBUTED_STAGES)
        problems.append(
            "stages: a run on several GPUs trains one stage of type "
            f"{kinds}; run stage chains and RewardModel/RLHF stages on one GPU "
            "(resources.gpus: 1)"
        )
    if spec.method in PROMPT_LEARNING_METHODS and strategy in SHARDED:
        problems.append(
            f"distributed.strategy: {strategy.value} does not shard {spec.method.value}'s "
            "virtual-token embeddings; use DDP (or None) for prefix and prompt tuning"
        )
    if spec.method == Method.QLORA and strategy in SHARDED:
        problems.append(
            f"distributed.strategy: QLoRA trains with {strategy.value} only on 4-bit storage "
            "this trainer does not set up; use DDP, or LoRA with FSDP"
        )
    if strategy in (
        DistributedStrategy.DEEPSPEED_ZERO2,
        DistributedStrategy.DEEPSPEED_ZERO3,
    ) and not _installed("deepspeed"):
        problems.append(
            f"distributed.strategy: {strategy.value} needs the deepspeed package in the "
            "trainer image; install it or use FSDP"
        )
    if strategy in SHARDED and not cuda:
        problems.append(
            f"distributed.strategy: {strategy.value} needs GPUs (the Trainer does not shard "
            "across CPU processes); use DDP on CPUs"
        )
    if problems:
        raise TrainingSetupError(Reason.INVALID_SPEC, "; ".join(problems))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def shards_parameters(spec: FineTuneJobSpec) -> bool:
    """Whether the job's strategy (FSDP, DeepSpeed ZeRO) manages the parameters or their
    gradients itself."""
    return _strategy(spec.distributed) in SHARDED


def _strategy(spec: DistributedSpec | None) -> DistributedStrategy:
    return spec.strategy if spec is not None else DistributedStrategy.NONE


def start(topo: Topology, *, cuda: bool) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pick this rank's GPU."""
    if not topo.distributed:
        return
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(topo.local_rank)
    if not dist.is_initialized():
        minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes)
        )


def barrier(topo: Topology) -> None:
    """Wait until every rank got here."""
    if topo.distributed:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_first(topo: Topology) -> Iterator[None]:
    """Rank 0 runs the block first (it writes to the store); the others then run it and find
    the work done."""
    if not topo.main:
        barrier(topo)
    yield
    if topo.main:
        barrier(topo)


def finish(topo: Topology) -> None:
    """Leave the process group (after the last collective)."""
    if not topo.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def trainer_arguments(
    spec: FineTuneJobSpec, topo: Topology, *, cuda: bool, bf16: bool = False
) -> dict[str, Any]:
    """The Trainer's arguments for the strategy (none for one process); `bf16`: the run
    trains under bf16 autocast."""
    if not topo.distributed:
        return {}
    distributed = spec.distributed
    strategy = _strategy(distributed)
    offload = bool(distributed and distributed.cpu_offload)
    if strategy == DistributedStrategy.FSDP:
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                # Full shard: parameters are gathered per layer for its forward and backward,
                # then freed again. Layers are wrapped by the model's own block class.
                "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "cpu_offload": offload,
                # Checkpoints and the trained weights are gathered into rank 0's files, so
                # rank 0's checkpoint is complete even when the ranks span several nodes.
                "state_dict_type": "FULL_STATE_DICT",
                "cpu_ram_efficient_loading": False,
            },
        }
    if strategy in (DistributedStrategy.DEEPSPEED_ZERO2, DistributedStrategy.DEEPSPEED_ZERO3):
        if spec.method == Method.FULL and bf16:
            # DeepSpeed's bf16 mode casts the weights to bf16 and builds the fp32 masters from
            # them: every master starts on a bf16 value, and updates of about the learning
            # rate leave the bf16 weights unchanged for several steps (the loss lags a
            # one-GPU run). Under torch autocast the fp32 weights are the masters, as on one
            # GPU; the Trainer's own bf16 switch must then be off.
            config = deepspeed_config(strategy, offload, torch_autocast=True)
            return {"deepspeed": config, "bf16": False}
        return {"deepspeed": deepspeed_config(strategy, offload)}
    # DDP (also strategy None with several processes): LoRA leaves most parameters frozen,
    # and every trainable one is used in every step.
    return {"ddp_find_unused_parameters": False, "ddp_backend": "nccl" if cuda else "gloo"}


def deepspeed_config(
    strategy: DistributedStrategy, offload: bool, *, torch_autocast: bool = False
) -> dict[str, Any]:
    """A DeepSpeed config with the Trainer's `auto` values (batch, precision, clipping);
    `torch_autocast`: fp32 weights trained under bf16 autocast instead of DeepSpeed's bf16
    weights."""
    stage = 3 if strategy == DistributedStrategy.DEEPSPEED_ZERO3 else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        # What the calculator counts (kubetune.calc.memory): DeepSpeed's defaults, written out.
        "reduce_bucket_size": DEEPSPEED_REDUCE_BUCKET,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_max_live_parameters"] = DEEPSPEED_MAX_LIVE_PARAMETERS
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
    }
    if torch_autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def evaluate_under_autocast(trainer: Any) -> bool:
    """Under DeepSpeed's `torch_autocast` (full fine-tuning) the engine trains under bf16
    autocast, but the Trainer evaluates the bare module, outside the engine: without this
    its evaluation would run in fp32, slower and unlike the training steps and a one-GPU
    run. Gives the Trainer's loss context the same autocast while the model is in eval
    mode (training steps get theirs from the engine); whether it did."""
    config = getattr(trainer.args, "deepspeed", None)
    autocast = config.get("torch_autocast", {}) if isinstance(config, dict) else {}
    if not autocast.get("enabled"):
        return False
    import torch

    device = trainer.args.device.type
    dtype = getattr(torch, str(autocast.get("dtype", "bfloat16")))

    def autocast_context(cache_enabled: bool | None = True) -> Any:
        if trainer.model.training:
            return nullcontext()
        return torch.autocast(device, dtype=dtype, cache_enabled=cache_enabled)

    trainer.autocast_smart_context_manager = autocast_context
    return True


def forget_deepspeed() -> None:
    """After training: models loaded later (rank 0's evaluation and merge) load whole on
    one GPU. While the Trainer's ZeRO-3 config is registered, transformers would partition
    every model it loads, and refuses a device map."""
    if _installed("deepspeed"):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


class WorkerStore:
    """The artifact store as a rank other than 0 sees it: reads pass through, a write
    raises (only rank 0 publishes)."""

    def __init__(self, store: Store, topo: Topology) -> None:
        self._store = store
        self._topo = topo

    @property
    def uri(self) -> str:
        return self._store.uri

    def uri_for(self, key: str) -> str:
        return self._store.uri_for(key)

    def _refuse(self, key: str) -> RuntimeError:
        return RuntimeError(f"{self._topo.describe()} tried to write {key}; only rank 0 publishes")

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        raise self._refuse(key)

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        raise self._refuse(key)

    def delete(self, key: str) -> None:
        raise self._refuse(key)

    def delete_prefix(self, prefix: str) -> int:
        raise self._refuse(prefix)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        return self._store.get_file(key, local_path)

    def get_bytes(self, key: str) -> bytes:
        return self._store.get_bytes(key)

    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        return self._store.open_read(key, offset)

    def exists(self, key: str) -> bool:
        return self._store.exists(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self._store.list(prefix)


def store_for(store: Store, topo: Topology) -> Store:
    """What this rank may do with the store: everything on rank 0, read on the others."""
    return store if topo.main else WorkerStore(store, topo)
