"""The judge's prompts and the pure rules that read its replies.

A rubric reply must end with the line ``Score: N`` (N an integer from 1 to 10), a pairwise
reply with ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie``. Only the last non-empty line
is read; markdown emphasis around it and a ``/10`` after the score are tolerated, nothing
else is guessed. Pairwise verdicts of the two orders are combined into one outcome for the
tuned answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

DEFAULT_RUBRIC = "helpfulness, correctness, clarity"

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "loss", "tie"]

_MARKUP = re.compile(r"[*_`]")
_SCORE = re.compile(r"score\s*:\s*(\d{1,3})(?:\s*/\s*10)?\.?", re.IGNORECASE)
_VERDICT = re.compile(r"verdict\s*:\s*(a|b|tie)\.?", re.IGNORECASE)

_INSTRUCTIONS = (
    "Judge by these criteria: {rubric}. When a reference answer is given, it shows what a "
    "good answer contains, but a correct answer may be worded differently. Do not reward "
    "length for its own sake. First explain your judgement in at most three sentences. "
)
RUBRIC_SYSTEM = (
    "You are an impartial judge of an answer an AI assistant gave to a user's question. "
    + _INSTRUCTIONS
    + "Then, on the last line, write the score exactly as 'Score: N', where N is an integer "
    "from 1 (worst) to 10 (best), and write nothing after it."
)
PAIRWISE_SYSTEM = (
    "You are an impartial judge comparing two answers AI assistants gave to the same user "
    "question. Do not let the order of the answers influence you. "
    + _INSTRUCTIONS
    + "Then, on the last line, write exactly 'Verdict: A' if answer A is better, "
    "'Verdict: B' if answer B is better, or 'Verdict: tie' if they are equally good, and "
    "write nothing after it."
)


def _section(title: str, text: str) -> str:
    return f"[{title}]\n{text}\n[End of {title.lower()}]"


def _question(prompt: str, reference: str) -> list[str]:
    parts = [_section("Question", prompt)]
    if reference.strip():
        parts.append(_section("Reference answer", reference))
    return parts


def rubric_messages(rubric: str, prompt: str, reference: str, answer: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to score one answer from 1 to 10."""
    user = "\n\n".join([*_question(prompt, reference), _section("Answer", answer)])
    return [
        {"role": "system", "content": RUBRIC_SYSTEM.replace("{rubric}", rubric)},
        {"role": "user", "content": user},
    ]


def pairwise_messages(
    rubric: str, prompt: str, reference: str, answer_a: str, answer_b: str
) -> list[dict[str, str]]:
    """The chat messages asking the judge which of two answers is better."""
    answers = [_section("Answer A", answer_a), _section("Answer B", answer_b)]
    user = "\n\n".join([*_question(prompt, reference), *answers])
    return [
        {"role": "system", "content": PAIRWISE_SYSTEM.replace("{rubric}", rubric)},
        {"role": "user", "content": user},
    ]


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The question as the judge sees it: a lone message's content, or every turn as
    'role: content' when there are several (a system prompt, earlier turns)."""
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def _last_line(reply: str) -> str:
    lines = [_MARKUP.sub("", line).strip().lstrip("#> ").strip() for line in reply.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def parse_score(reply: str) -> int | None:
    """The score of a reply whose last line is 'Score: N' (N an integer 1..10; '/10' and
    markdown emphasis allowed), else None."""
    match = _SCORE.fullmatch(_last_line(reply))
    if match is None:
        return None
    score = int(match.group(1))
    return score if 1 <= score <= 10 else None


def parse_verdict(reply: str) -> Verdict | None:
    """The verdict of a reply whose last line is 'Verdict: A', 'Verdict: B' or
    'Verdict: tie' (any case), else None."""
    match = _VERDICT.fullmatch(_last_line(reply))
    if match is None:
        return None
    word = match.group(1).lower()
    return "A" if word == "a" else "B" if word == "b" else "tie"


def tuned_outcome(verdict: Verdict, tuned_position: Literal["A", "B"]) -> Outcome:
    """What one verdict means for the tuned answer shown in the given position."""
    if verdict == "tie":
        return "tie"
    return "win" if verdict == tuned_position else "loss"


def combine_verdicts(tuned_as_a: Verdict, tuned_as_b: Verdict) -> Outcome:
    """The tuned answer's outcome from both orders: a win needs a win in one order and no
    loss in the other (and symmetrically for a loss); contradicting orders are a tie."""
    outcomes = {tuned_outcome(tuned_as_a, "A"), tuned_outcome(tuned_as_b, "B")}
    if outcomes in ({"win"}, {"win", "tie"}):
        return "win"
    if outcomes in ({"loss"}, {"loss", "tie"}):
        return "loss"
    return "tie"


def win_rate(wins: int, ties: int, losses: int) -> float | None:
    """(wins + ties / 2) / decided pairs, or None when no pair was decided."""
    decided = wins + ties + losses
    return (wins + 0.5 * ties) / decided if decided else None
