"""The data stage built the straightforward Hugging Face way: the benchmark's baseline.

`datasets.load_dataset("json")`, one `Dataset.map(batched=True, num_proc=N)` that converts,
normalizes, checks, renders the chat template with `tokenizer.apply_chat_template`,
tokenizes, filters and computes a datasketch `MinHash` per row; then, in input order, an
exact-duplicate check (first occurrence kept) and a `datasketch.MinHashLSH` query/insert;
then kubetune's deterministic split, written as JSON lines. The per-row semantics come
from kubetune's pure functions (formats, cleaning, dedup.shingles), so both sides must
produce the same files; what differs is the machinery around them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1.dataset import DataFormat
from kubetune.trainer.data import cleaning
from kubetune.trainer.data.dedup import shingles
from kubetune.trainer.data.formats import Columns, convert
from kubetune.trainer.data.rows import RawRow, RowError

NUM_PERM = 128
KEPT, INVALID, FILTERED = "kept", "invalid", "filtered"


@cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _check(
    example: dict[str, Any], tokens: int, max_tokens: int, max_non_printable: float
) -> str | None:
    """The reason a valid example is filtered (kubetune's order), or None."""
    if tokens > max_tokens:
        return "too-long"
    text = "\n".join(cleaning.texts(example))
    if cleaning.non_printable_ratio(text) > max_non_printable:
        return "non-printable"
    if cleaning.repetition_ratio(text) > 0.5:
        return "repetitive"
    return None


def process_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    uri: str,
    tokenizer_dir: str,
    max_tokens: int,
) -> dict[str, list[Any]]:
    """The per-row work for one `Dataset.map` batch."""
    from datasketch import MinHash

    tokenizer = _tokenizer(tokenizer_dir)
    columns = list(batch)
    out: dict[str, list[Any]] = {
        key: [] for key in ("where", "status", "reason", "messages", "tokens", "exact", "minhash")
    }
    examples: list[tuple[int, dict[str, Any]]] = []
    for i, index in enumerate(indices):
        row = RawRow(uri, index + 1, {key: batch[key][i] for key in columns})
        out["where"].append(row.where)
        try:
            example = cleaning.normalize(convert(row, DataFormat.ALPACA, Columns(), None))
            cleaning.check_structure(example)
        except RowError as exc:
            out["status"].append(INVALID)
            out["reason"].append(exc.reason)
            continue
        out["status"].append(KEPT)
        out["reason"].append("")
        examples.append((i, example))
    texts = [tokenizer.apply_chat_template(e["messages"], tokenize=False) for _, e in examples]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    by_row: dict[int, tuple[dict[str, Any], int]] = {
        i: (e, n) for (i, e), n in zip(examples, lengths, strict=True)
    }
    survivors = []
    for i in range(len(indices)):
        if i not in by_row:
            continue
        example, tokens = by_row[i]
        reason = _check(example, tokens, max_tokens, 0.1)
        if reason is not None:
            out["status"][i], out["reason"][i] = FILTERED, reason
            del by_row[i]
        else:
            survivors.append((i, cleaning.canonical_text(example)))
    minhashes = MinHash.bulk([shingles(text) for _, text in survivors], num_perm=NUM_PERM)
    hashes = {i: (m.hashvalues, text) for (i, text), m in zip(survivors, minhashes, strict=True)}
    for i in range(len(indices)):
        if i in hashes:
            example, tokens = by_row[i]
            hashvalues, canonical = hashes[i]
            out["messages"].append(example["messages"])
            out["tokens"].append(tokens)
            out["exact"].append(hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32])
            out["minhash"].append(hashvalues)
        else:
            out["messages"].append(None)
            out["tokens"].append(None)
            out["exact"].append(None)
            out["minhash"].append(None)
    return out


def _split_key(seed: int, example_id: str) -> int:
    """kubetune's split rule: sha256 of "seed:id"; the smallest keys form validation."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "big")


def prepare_baseline(
    data: Path,
    out_dir: Path,
    cache_dir: Path,
    tokenizer_dir: Path,
    *,
    num_proc: int = 2,
    max_tokens: int = 1024,
    threshold: float = 0.85,
    fraction: float = 0.05,
    seed: int = 42,
) -> dict[str, Any]:
    """Prepare `data` (Alpaca JSON lines) into out_dir/train.jsonl and val.jsonl; returns
    the counts (rows, invalid, filtered, duplicates, train, validation, by reason)."""
    import datasets
    from datasketch import LeanMinHash, MinHashLSH

    datasets.disable_progress_bars()
    started = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=cache_dir)
    features = datasets.Features(
        {
            "where": datasets.Value("string"),
            "status": datasets.Value("string"),
            "reason": datasets.Value("string"),
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            "tokens": datasets.Value("int32"),
            "exact": datasets.Value("string"),
            "minhash": datasets.List(datasets.Value("uint32")),
        }
    )
    processed = raw.map(
        process_batch,
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        with_indices=True,
        remove_columns=raw.column_names,
        features=features,
        fn_kwargs={"uri": str(data), "tokenizer_dir": str(tokenizer_dir), "max_tokens": max_tokens},
    )
    mapped = time.perf_counter()

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    first: dict[str, str] = {}
    invalid: Counter[str] = Counter()
    filtered: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    kept_rows: list[int] = []
    kept_ids: list[str] = []
    position = 0
    columns = processed.select_columns(["status", "reason", "exact", "minhash"])
    for batch in columns.iter(batch_size=4096):
        for status, reason, exact, hashvalues in zip(
            batch["status"], batch["reason"], batch["exact"], batch["minhash"], strict=True
        ):
            position += 1
            if status == INVALID:
                invalid[reason] += 1
            elif status == FILTERED:
                filtered[reason] += 1
            elif exact in first:
                duplicates["exact"] += 1
            else:
                minhash = LeanMinHash(seed=1, hashvalues=hashvalues, scheme="affine32")
                if lsh.query(minhash):
                    duplicates["near"] += 1
                    continue
                example_id = exact[:16]
                lsh.insert(example_id, minhash)
                first[exact] = example_id
                kept_rows.append(position - 1)
                kept_ids.append(example_id)

    deduplicated = time.perf_counter()
    n = len(kept_ids)
    k = max(1, min(round(fraction * n), n - 1))
    keys = [_split_key(seed, example_id) for example_id in kept_ids]
    cut = sorted(keys)[k - 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = processed.select(kept_rows).select_columns(["messages", "tokens", "where"])
    ids = iter(zip(kept_ids, keys, strict=True))
    written = Counter[str]()
    with (
        (out_dir / "train.jsonl").open("w", encoding="utf-8") as train,
        (out_dir / "val.jsonl").open("w", encoding="utf-8") as val,
    ):
        for batch in kept.iter(batch_size=4096):
            for messages, tokens, where in zip(
                batch["messages"], batch["tokens"], batch["where"], strict=True
            ):
                example_id, key = next(ids)
                record = {"id": example_id, "messages": messages, "tokens": tokens, "source": where}
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
                split = "validation" if key <= cut else "train"
                (val if split == "validation" else train).write(line)
                written[split] += 1
    done = time.perf_counter()
    return {
        "seconds": {
            "loadAndMap": round(mapped - started, 1),
            "dedup": round(deduplicated - mapped, 1),
            "splitAndWrite": round(done - deduplicated, 1),
        },
        "counts": {
            "rows": position,
            "invalid": sum(invalid.values()),
            "filtered": sum(filtered.values()),
            "duplicates": sum(duplicates.values()),
            "train": written["train"],
            "validation": written["validation"],
        },
        "invalidByReason": dict(sorted(invalid.items())),
        "filteredByReason": dict(sorted(filtered.items())),
        "duplicatesByKind": dict(sorted(duplicates.items())),
    }
