"""TRL's DPO with its defaults: the baseline of `bench/throughput.py --part dpo-8b`.

The plain Hugging Face way: `DPOTrainer` with a default `DPOConfig` (padded batches, SDPA,
gradient checkpointing and the rest as TRL ships them) and a PEFT LoRA config (r16, all
linear layers, so the reference is the base with the adapter disabled), on random weights of
the architecture in `--config-dir` (a folder with config.json and the tokenizer), in bf16.
Only what a comparison needs is set: the pairs per step (`--batch`, the same as ours), the
longest sequence (`--max-length`, as ours), the learning rate (TRL's default 1e-6 is kept)
and the number of steps.

Throughput is pairs per second after `--warmup` steps, end to end (tokens/s too: the
non-padding tokens of both sequences, each with its prompt). Prints one `RESULT_JSON {...}`
line.

    python bench/dpo_baseline.py --config-dir DIR --data pairs.jsonl --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def conversational(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dpo-baseline"))
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    rows = [conversational(json.loads(line)) for line in args.data.open()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.config_dir)
    config = AutoConfig.from_pretrained(args.config_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]

    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    dpo_args = DPOConfig(
        output_dir=str(args.out),
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        max_steps=args.warmup + args.steps,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=model,
        args=dpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    inner = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> Any:
        batch = inner(examples)
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        tokens.append(int(sum(int(m.sum()) for m in masks)))
        return batch

    trainer.data_collator = counting
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    window = slice(args.warmup, args.warmup + args.steps)
    seconds = times[args.warmup + args.steps - 1] - times[args.warmup - 1]
    counted = sum(tokens[window])
    result = {
        "name": "TRL DPO defaults",
        "tok_s": counted / seconds,
        "pairs_s": args.steps * args.batch / seconds,
        "pairs_per_step": args.batch,
        "tokens_per_step": counted / args.steps,
        "train_s": time.perf_counter() - start,
        "gradient_checkpointing": bool(dpo_args.gradient_checkpointing),
        "losses": losses,
    }
    if cuda:
        result["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    print("RESULT_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
