"""Token counts equal what the trainer's tokenizer call gives, on the built-in tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.trainer.data.process import Kept
from kubetune.trainer.data.tokens import TokenCounter

CONTENTS = [
    "Hello there!",
    "Ünïcödé, 漢字 and emoji 🙂 in one line",
    "literal special tokens <|im_end|> and <|im_start|>user inside the text",
    "spaces   and\ttabs\nand new\n\nlines",
    "numbers 1234567890 and code: def f(x): return x ** 2",
]


def test_counts_equal_the_tokenizer_call(builtin_model_dir: Path) -> None:
    counter = TokenCounter(str(builtin_model_dir))
    assert counter._rust is not None  # the fast path is what this test checks
    tokenizer = counter.tokenizer
    examples = [
        {"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": c[::-1]}]}
        for c in CONTENTS
    ]
    examples.append({"text": CONTENTS[2]})
    examples.append(
        {
            "prompt": [{"role": "user", "content": CONTENTS[0]}],
            "chosen": [{"role": "assistant", "content": CONTENTS[1]}],
            "rejected": [{"role": "assistant", "content": CONTENTS[2]}],
        }
    )

    def expected(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    conversations = [e["messages"] for e in examples[: len(CONTENTS)]]
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations]
    prompt = examples[-1]["prompt"]
    pair = [
        tokenizer.apply_chat_template([*prompt, *examples[-1][key]], tokenize=False)
        for key in ("chosen", "rejected")
    ]
    chosen, rejected = expected(pair)
    assert counter.count_many(examples) == [
        *({"tokens": n} for n in expected(rendered)),
        {"tokens": expected([CONTENTS[2]])[0] + 1},
        {"tokens": max(chosen, rejected), "chosenTokens": chosen, "rejectedTokens": rejected},
    ]


def test_kept_line_is_the_json_record() -> None:
    example = {"messages": [{"role": "user", "content": 'a "quoted"\nline ü 🙂 \\ /'}], "tokens": 7}
    where = 'data/ü "odd".jsonl:3'
    record = json.dumps({**example, "source": where}, ensure_ascii=False, separators=(",", ":"))
    kept = Kept(record, 7, b"\0" * 16, None, None)
    full = {"id": "0123abcd0123abcd-2", **example, "source": where}
    assert kept.line("0123abcd0123abcd-2") == (
        json.dumps(full, ensure_ascii=False, separators=(",", ":")) + "\n"
    )
