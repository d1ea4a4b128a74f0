"""A small preference set generated deterministically, for tests and examples.

The dates of the quickstart task (`builtin://quickstart`), written in everyday English,
with one of two requests: half of the prompts ask for the ISO 8601 form (`YYYY-MM-DD`),
the other half ask for the date in a sentence. The chosen answer follows the request and
the rejected answer uses the other form. A reward model therefore has to read the prompt:
a model that merely prefers one form gets about half of the pairs right, so an untrained
score head starts near 0.5 pairwise accuracy by construction, and a trained one climbs
towards 1.0 within a few hundred small steps, even from random weights.
"""

from __future__ import annotations

import random
from typing import Any

from kubetune.trainer.data.builtin import quickstart_rows

DATE_PREFERENCE_ROWS = 400
DATE_PREFERENCE_SEED = 20261130

_SENTENCE_REQUESTS = (
    "Write this date in a sentence.",
    "Answer in a full sentence: which date is this?",
    "Restate the date in a short sentence.",
    "Reply with a sentence that gives the date.",
)

_SENTENCES = (
    "The date is {date}.",
    "Sure! That date is {date}.",
    "That would be {date}.",
    "Here you go: {date}.",
    "The answer is {date}, of course.",
)


def date_preference_rows(
    count: int = DATE_PREFERENCE_ROWS, seed: int = DATE_PREFERENCE_SEED
) -> list[dict[str, Any]]:
    """Preference rows in the data contract form: `{"id", "prompt", "chosen", "rejected"}`
    with lists of messages. The same count and seed give the same rows."""
    rng = random.Random(seed)
    rows = []
    for index, row in enumerate(quickstart_rows(count, seed)):
        iso = row["output"]
        sentence = rng.choice(_SENTENCES).format(date=row["input"])
        if rng.random() < 0.5:
            request, chosen, rejected = row["instruction"], iso, sentence
        else:
            request, chosen, rejected = rng.choice(_SENTENCE_REQUESTS), sentence, iso
        rows.append(
            {
                "id": f"dates-{seed}-{index:05d}",
                "prompt": [{"role": "user", "content": f"{request}\n\n{row['input']}"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows
