"""Training throughput of per-document varlen attention against SDPA on padding-free batches.

LoRA r16 on all linear layers of random-weight Llama-3.2-1B / Llama-3.1-8B shapes, through
TRL's SFTTrainer with `padding_free=True` (8 examples flattened into one row per step), on
synthetic pre-tokenised examples with instruction-tuning-like lengths (lognormal, median 350,
sigma 0.8, clipped to [32, 2048]: the data of the Hugging Face baseline in PERF_BASELINE.md).
Two attention implementations see the same model, data and batches:

- `sdpa`: transformers builds a dense per-document mask over the flattened row (the correct
  "HF tuned" path of the baseline);
- `varlen`: kubetune's `kubetune_varlen` (torch's variable-length FlashAttention, no mask).

Throughput counts real tokens only, end to end (data, optimizer, syncs included) over the
steps after warm-up. Each configuration runs in its own process (no memory cross-talk).

    python bench/train_throughput.py --run 1b-sdpa,1b-varlen,8b-sdpa,8b-varlen --out DIR
    python bench/train_throughput.py --config 8b-varlen-gc       # one configuration

Names: <model>-<attention>[-gc][-bfd][-nocudnn]: model 1b | 8b | tiny, attention sdpa |
varlen; -gc turns gradient checkpointing on; -bfd packs examples into rows of --max-length
tokens first (TRL's best-fit-decreasing packing, as kubetune's `packing: Packed` does) and
--batch counts rows instead of examples; -nocudnn keeps SDPA off its cuDNN backend. Needs a
CUDA GPU, trl and datasets. Writes DIR/results.json and
DIR/table.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ARCHES = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b", "tiny": "tiny"}
IMPLS = {"sdpa": "sdpa", "varlen": "kubetune_varlen"}
OPTIONS = {"gc", "bfd", "nocudnn"}
LEN_MEDIAN, LEN_SIGMA, LEN_MIN, LEN_MAX = 350, 0.8, 32, 2048
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def log(*args: Any) -> None:
    print(*args, flush=True)


def parse(name: str) -> dict[str, Any]:
    """`8b-varlen-gc-bfd` -> model, attention implementation, options."""
    parts = name.split("-")
    options = set(parts[2:])
    if len(parts) < 2 or parts[0] not in ARCHES or parts[1] not in IMPLS or options - OPTIONS:
        raise SystemExit(
            f"unknown configuration {name!r}: use <1b|8b|tiny>-<sdpa|varlen>[-gc][-bfd][-nocudnn]"
        )
    return {
        "model": parts[0],
        "impl": IMPLS[parts[1]],
        "gc": "gc" in options,
        "bfd": "bfd" in options,
        "cudnn_sdpa": "nocudnn" not in options,
    }


# ---------------------------------------------------------------------------------------------
# One configuration (worker process)
# ---------------------------------------------------------------------------------------------
def lengths(n: int, seed: int = 0) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=math.log(LEN_MEDIAN), sigma=LEN_SIGMA, size=n)
    return [int(v) for v in np.clip(np.round(x), LEN_MIN, LEN_MAX)]


def dataset(n: int, vocab: int) -> Any:
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(1)
    ids = [rng.integers(3, vocab, size=length).tolist() for length in lengths(n)]
    return Dataset.from_dict({"input_ids": ids})


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def config_folder(model: str, dest: Path) -> Path:
    """A config-only folder for the architecture (kubetune's calculator table)."""
    from transformers import LlamaConfig

    from kubetune.calc.architectures import ARCHITECTURES

    if model == "tiny":
        fields: dict[str, Any] = {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 4096,
            "tie_word_embeddings": True,
        }
    else:
        arch = ARCHITECTURES[ARCHES[model]]
        fields = {
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.num_kv_heads,
            "vocab_size": arch.vocab_size,
            "tie_word_embeddings": arch.tie_word_embeddings,
        }
    config = LlamaConfig(
        **fields,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=False,
    )
    config.save_pretrained(dest)
    return dest


def run_config(name: str, warmup: int, steps: int, batch: int, max_length: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kubetune.trainer.fastpath import attention as fast
    from kubetune.trainer.fastpath.attention import register_attention, varlen_kernel
    from kubetune.trainer.resolve import build_random_model

    spec = parse(name)
    cuda = torch.cuda.is_available()  # CPU only for a smoke run of the tiny model

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if not spec["cudnn_sdpa"]:
        torch.backends.cuda.enable_cudnn_sdp(False)
    kernel = varlen_kernel()
    res: dict[str, Any] = {
        "name": name,
        **spec,
        "batch": batch,
        "warmup": warmup,
        "steps": steps,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU)",
        "varlen_kernel": None
        if kernel is None
        else {"window_size": kernel.window, "enable_gqa": kernel.gqa, "scale": kernel.scale},
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }
    register_attention()
    t_setup = time.perf_counter()
    folder = config_folder(spec["model"], Path(tempfile.mkdtemp(prefix="kt-bench-")))
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_random_model(folder, seed=0, dtype=dtype, device="cuda" if cuda else "cpu")
    model.set_attn_implementation(spec["impl"])
    res["attn_implementation"] = model.config._attn_implementation

    calls = {"varlen": 0, "per_document": 0}
    inner_varlen, inner_loop = fast.varlen_attention, fast.per_document_attention

    def counted_varlen(*args: Any, **kwargs: Any) -> Any:
        calls["varlen"] += 1
        return inner_varlen(*args, **kwargs)

    def counted_loop(*args: Any, **kwargs: Any) -> Any:
        calls["per_document"] += 1
        return inner_loop(*args, **kwargs)

    fast.varlen_attention = counted_varlen  # type: ignore[assignment]
    fast.per_document_attention = counted_loop  # type: ignore[assignment]

    rows = batch * (warmup + steps)
    # Packed rows hold max_length / (mean length ~472) examples each; make enough of them.
    examples = rows * (max_length // 300 + 1) + 64 if spec["bfd"] else rows
    ds = dataset(examples, model.config.vocab_size)
    records: list[dict[str, int]] = []
    losses: dict[int, float] = {}

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, examples: list[dict[str, Any]]) -> Any:
            out = self.inner(examples)
            sizes = [n for e in examples for n in e.get("seq_lengths") or [len(e["input_ids"])]]
            records.append(
                {
                    "real": sum(sizes),
                    "proc": int(out["input_ids"].numel()),
                    "docs": len(sizes),
                    "longest": max(sizes),
                }
            )
            return out

    class Timer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.t0 = 0.0
            self.t: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            sync()
            self.t.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    timer = Timer()
    args = SFTConfig(
        output_dir=str(folder / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=warmup + steps,
        learning_rate=2e-4,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=spec["gc"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec["gc"] else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        max_length=max_length if spec["bfd"] else None,
        packing=spec["bfd"],
        packing_strategy="bfd",
        padding_free=True,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer(),
        peft_config=lora,
        callbacks=[timer],
    )
    trainer.data_collator = Counting(trainer.data_collator)
    res["n_trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res["setup_s"] = time.perf_counter() - t_setup

    trainer.train()
    sync()
    res["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    res["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    res["attention_calls"] = dict(calls)

    t = [timer.t0, *timer.t]
    if len(timer.t) < warmup + steps:
        raise RuntimeError(f"only {len(timer.t)} steps ran")
    window = records[warmup : warmup + steps]
    dt = t[warmup + steps] - t[warmup]
    step_s = [t[i + 1] - t[i] for i in range(warmup, warmup + steps)]
    real = sum(r["real"] for r in window)
    res.update(
        {
            "measured_s": dt,
            "tok_s": real / dt,
            "real_tokens_per_step": real / steps,
            "docs_per_step": sum(r["docs"] for r in window) / steps,
            "pad_frac": 1 - real / sum(r["proc"] for r in window),
            "step_s_median": statistics.median(step_s),
            "step_s": [round(x, 4) for x in step_s],
            "warmup_s": t[warmup] - t[0],
            "losses": [losses.get(i + 1) for i in range(warmup + steps)],
            "tokens_per_step": [r["real"] for r in records[: warmup + steps]],
        }
    )
    return res


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def peer(r: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sdpa result (cuDNN on, when both ran) with the same model, checkpointing and
    packing."""
    same = [
        other
        for other in results
        if "error" not in other
        and other["impl"] == "sdpa"
        and (other["model"], other["gc"], other["bfd"]) == (r["model"], r["gc"], r["bfd"])
    ]
    same.sort(key=lambda other: not other["cudnn_sdpa"])
    return same[0] if same else None


def compare_losses(a: list[float | None], b: list[float | None]) -> dict[str, float]:
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    if not pairs:
        return {}
    diffs = [abs(x - y) for x, y in pairs]
    return {"first_step_abs": diffs[0], "max_abs": max(diffs), "mean_abs": statistics.mean(diffs)}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| config | attention | GC | rows | real tok/s | vs sdpa | step s (median) | vs sdpa "
        "(median step) | real tok/step | docs/step | peak alloc GiB | peak reserved GiB "
        "| loss step 1 | max abs loss diff vs sdpa |",
        "|" + "---|" * 14,
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | FAILED: {r['error'][:120]} |" + " |" * 12)
            continue
        base = peer(r, results)
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "n/a"
        median = f"{base['step_s_median'] / r['step_s_median']:.2f}x" if base else "n/a"
        diff = compare_losses(r["losses"], base["losses"]) if base and base is not r else {}
        first = r["losses"][0]
        attn = r["attn_implementation"] + ("" if r["cudnn_sdpa"] else " (no cuDNN)")
        lines.append(
            f"| {r['name']} | {attn} | {'on' if r['gc'] else 'off'} "
            f"| {'BFD packed' if r['bfd'] else 'examples'} | {r['tok_s']:,.0f} | {ratio} "
            f"| {r['step_s_median']:.3f} | {median} | {r['real_tokens_per_step']:,.0f} "
            f"| {r['docs_per_step']:.1f} | {r['peak_alloc_GiB']:.1f} "
            f"| {r['peak_reserved_GiB']:.1f} | {first if first is None else f'{first:.4f}'} "
            f"| {diff.get('max_abs', float('nan')):.4f} |"
        )
    return "\n".join(lines)


def driver(names: list[str], out: Path, deadline: float, timeout: float, extra: list[str]) -> int:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    for name in names:
        left = deadline - (time.time() - start)
        if left < 40:
            results.append({"name": name, **parse(name), "error": "skipped: out of time"})
            continue
        log(f"=== {name} (timeout {min(timeout, left):.0f}s)")
        command = [sys.executable, __file__, "--config", name, *extra]
        t0 = time.time()
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=min(timeout, left), env=env
            )
            stdout, stderr, rc = proc.stdout, proc.stderr, str(proc.returncode)
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            rc = "timeout"
        result = None
        for line in stdout.splitlines():
            if line.startswith("RESULT_JSON "):
                result = json.loads(line[len("RESULT_JSON ") :])
        if result is None:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            log(tail)
            result = {"name": name, **parse(name), "error": f"rc={rc}: {tail[-300:]}"}
        result["wall_s"] = time.time() - t0
        results.append(result)
        if "error" in result:
            log(f"--- {name}: FAILED {result['error'][:300]}")
        else:
            log(
                f"--- {name}: {result['tok_s']:,.0f} real tok/s, step "
                f"{result['step_s_median']:.3f}s, peak {result['peak_alloc_GiB']:.1f}/"
                f"{result['peak_reserved_GiB']:.1f} GiB, attention calls "
                f"{result['attention_calls']}, wall {result['wall_s']:.0f}s"
            )
            log("    losses: " + " ".join(f"{x:.4f}" for x in result["losses"] if x is not None))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    log(text)
    log(f"== total {time.time() - start:.0f}s")
    return 0 if all("error" not in r for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="comma-separated configurations, each in its own process")
    parser.add_argument("--config", help="run one configuration in this process")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="examples (-bfd: rows) per step")
    parser.add_argument("--max-length", type=int, default=2048, help="row length for -bfd")
    parser.add_argument("--deadline", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per configuration")
    args = parser.parse_args()
    extra = [
        *("--warmup", str(args.warmup), "--steps", str(args.steps)),
        *("--batch", str(args.batch), "--max-length", str(args.max_length)),
    ]
    if args.config:
        try:
            result = run_config(args.config, args.warmup, args.steps, args.batch, args.max_length)
        except Exception as exc:  # the driver reports it with the others
            traceback.print_exc()
            result = {"name": args.config, **parse(args.config), "error": repr(exc)[:400]}
        print("RESULT_JSON " + json.dumps(result), flush=True)
        return 0 if "error" not in result else 1
    if args.run:
        names = args.run.split(",")
        for name in names:
            parse(name)
        return driver(names, Path(args.out), args.deadline, args.timeout, extra)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
