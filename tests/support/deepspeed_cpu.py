"""Full fine-tuning of a small random Llama with the Trainer, in one process on CPUs: plainly,
or under DeepSpeed ZeRO with the trainer's arguments (`--strategy`). Prints the per-step
losses as JSON. Run as a script: DeepSpeed sets up a process group and global state."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="None")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "DS_ACCELERATOR": "cpu",
    }.items():
        os.environ.setdefault(key, value)

    import torch
    from datasets import Dataset
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
    from kubetune.trainer import distributed

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2000,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.float32)  # full fine-tuning: fp32 weights
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(96):
        start = int(torch.randint(0, 50, (1,), generator=generator))
        ids = [(start + 3 * j) % 100 for j in range(32)]
        rows.append({"input_ids": ids, "labels": ids})

    arguments: dict[str, Any] = {"bf16": True}
    if args.strategy != "None":
        spec = FineTuneJobSpec.model_validate(
            {
                "model": {"uri": "builtin://random/llama-3.2-1b"},
                "dataset": {"uri": "builtin://quickstart"},
                "method": "Full",
                "distributed": {"strategy": args.strategy},
            }
        )
        two = distributed.Topology(world_size=2, local_world_size=2)
        arguments.update(distributed.trainer_arguments(spec, two, cuda=True, bf16=True))

    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, _args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    training = TrainingArguments(
        output_dir=args.output,
        max_steps=args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        per_device_train_batch_size=8,
        optim="adamw_torch",
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        **arguments,
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=Dataset.from_list(rows), callbacks=[Record()]
    )
    trainer.train()
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
    print(json.dumps({"losses": losses, "parameter_dtypes": dtypes}))


if __name__ == "__main__":
    main()
