"""LLM-as-judge scores (metric Judge) from any OpenAI-compatible chat completions endpoint.

Modes (evaluation.judge.mode):

- Rubric: the judge rates each answer from 1 to 10 by the rubric, with the question and the
  reference answer in view, and ends its reply with the line ``Score: N``. JudgeScore is
  the mean over the answers it scored, for the tuned model and (given its answers) the base.
- Pairwise: the judge compares the base and the tuned answer to the same question and ends
  with ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie``. Each pair is asked twice, the
  tuned answer first as A and then as B, to cancel position bias: the tuned answer wins if
  it wins both orders or wins one and ties the other, loses symmetrically, and otherwise
  ties. Contradicting verdicts (each order prefers whichever answer sits in the same
  position) count as ties. JudgeWinRate = (wins + ties / 2) / decided pairs.
- Both: the two together.

Replies are parsed strictly: a reply whose last line is not the expected one is
unparseable. Unparseable replies and failed requests are counted, reported and left out of
the scores, never guessed. The prompts, parsing and combining are pure functions; `judge`
sends the requests through `JudgeClient` (retries, API key, concurrency).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import GateMetric, JudgeMode, JudgeSpec
from kubetune.trainer.evaluate import EvaluationError
from kubetune.trainer.scoring.judge_client import API_KEY_ENV, JudgeClient, Reply
from kubetune.trainer.scoring.judge_prompts import (
    DEFAULT_RUBRIC,
    Verdict,
    combine_verdicts,
    conversation_text,
    pairwise_messages,
    parse_score,
    parse_verdict,
    rubric_messages,
    tuned_outcome,
    win_rate,
)

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_RUBRIC",
    "JudgeResult",
    "PairwiseResult",
    "PairwiseSample",
    "RubricResult",
    "RubricSample",
    "combine_verdicts",
    "conversation_text",
    "judge",
    "pairwise_messages",
    "parse_score",
    "parse_verdict",
    "rubric_messages",
    "win_rate",
]

MAX_TOKENS = 512
"""Longest judge reply in tokens: a short explanation and the final line."""

REPLY_CHARS = 500
"""Judge replies are kept in the results up to this many characters."""

UNAVAILABLE_REASON = Reason.INFRASTRUCTURE_ERROR
"""Reason when the judge could not be reached at all (transient: the run is retried)."""

Status = Literal["scored", "unparseable", "failed"]
PairOutcome = Literal["win", "loss", "tie", "unparseable", "failed"]
Side = Literal["tuned", "base"]


@dataclass(frozen=True)
class RubricSample:
    """The judge's score of one answer."""

    status: Status
    score: int | None = None
    reply: str = ""
    error: str | None = None

    def details(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "score": self.score,
            "reply": self.reply,
            "error": self.error,
        }


@dataclass(frozen=True)
class RubricResult:
    """Rubric scores of one model's answers."""

    samples: tuple[RubricSample, ...]

    def _count(self, status: Status) -> int:
        return sum(s.status == status for s in self.samples)

    @property
    def scored(self) -> int:
        return self._count("scored")

    @property
    def unparseable(self) -> int:
        return self._count("unparseable")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def mean(self) -> float | None:
        """Mean score (1-10) over the scored answers; None when none was scored."""
        scores = [s.score for s in self.samples if s.score is not None]
        return sum(scores) / len(scores) if scores else None

    def counts(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "scored": self.scored,
            "unparseable": self.unparseable,
            "failed": self.failed,
        }


@dataclass(frozen=True)
class PairwiseSample:
    """Both orders of one base-versus-tuned comparison and their combined outcome."""

    outcome: PairOutcome
    verdicts: tuple[Verdict | None, Verdict | None] = (None, None)
    """Raw verdicts: (tuned shown as A, tuned shown as B)."""
    replies: tuple[str, str] = ("", "")
    errors: tuple[str | None, str | None] = (None, None)

    @property
    def inconsistent(self) -> bool:
        """Whether the two orders contradicted each other (counted as a tie)."""
        first, second = self.verdicts
        if first is None or second is None:
            return False
        return {tuned_outcome(first, "A"), tuned_outcome(second, "B")} == {"win", "loss"}

    def details(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "inconsistent": self.inconsistent,
            "tunedAsA": {"verdict": self.verdicts[0], "reply": self.replies[0]},
            "tunedAsB": {"verdict": self.verdicts[1], "reply": self.replies[1]},
            "errors": [e for e in self.errors if e],
        }


@dataclass(frozen=True)
class PairwiseResult:
    """Pairwise comparisons of the tuned against the base model."""

    samples: tuple[PairwiseSample, ...]

    def _count(self, outcome: PairOutcome) -> int:
        return sum(s.outcome == outcome for s in self.samples)

    @property
    def wins(self) -> int:
        return self._count("win")

    @property
    def ties(self) -> int:
        return self._count("tie")

    @property
    def losses(self) -> int:
        return self._count("loss")

    @property
    def unparseable(self) -> int:
        return self._count("unparseable")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def inconsistent(self) -> int:
        return sum(s.inconsistent for s in self.samples)

    @property
    def win_rate(self) -> float | None:
        return win_rate(self.wins, self.ties, self.losses)

    def counts(self) -> dict[str, Any]:
        return {
            "winRate": self.win_rate,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "inconsistent": self.inconsistent,
            "unparseable": self.unparseable,
            "failed": self.failed,
        }


@dataclass(frozen=True)
class JudgeResult:
    """Everything the judge decided, for metrics.json, samples.jsonl and the report."""

    model: str
    tuned: RubricResult | None = None
    base: RubricResult | None = None
    pairwise: PairwiseResult | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def metrics(self, side: Side) -> dict[str, float]:
        """Gate metrics of one model: JudgeScore (1-10) and, for the tuned model,
        JudgeWinRate (0-1). A metric is absent when nothing could be scored."""
        out: dict[str, float] = {}
        rubric = self.tuned if side == "tuned" else self.base
        if rubric is not None and rubric.mean is not None:
            out[GateMetric.JUDGE_SCORE.value] = rubric.mean
        if side == "tuned" and self.pairwise is not None and self.pairwise.win_rate is not None:
            out[GateMetric.JUDGE_WIN_RATE.value] = self.pairwise.win_rate
        return out

    def counts(self) -> dict[str, Any]:
        """Scores and counts for metrics.json (JSON-ready, camelCase keys)."""
        out: dict[str, Any] = {
            "model": self.model,
            "requests": self.requests,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
        }
        rubric = {side: r.counts() for side, r in (("tuned", self.tuned), ("base", self.base)) if r}
        if rubric:
            out["rubric"] = rubric
        if self.pairwise is not None:
            out["pairwise"] = self.pairwise.counts()
        return out

    def sample_details(self, index: int) -> dict[str, Any]:
        """What the judge said about example `index`, for samples.jsonl."""
        out: dict[str, Any] = {}
        if self.tuned is not None:
            out["tuned"] = self.tuned.samples[index].details()
        if self.base is not None:
            out["base"] = self.base.samples[index].details()
        if self.pairwise is not None:
            out["pairwise"] = self.pairwise.samples[index].details()
        return out


def _truncate(text: str | None) -> str:
    if not text:
        return ""
    return text if len(text) <= REPLY_CHARS else text[:REPLY_CHARS] + "..."


def rubric_sample(reply: Reply) -> RubricSample:
    """Score one reply (a failed request stays failed, a bad format unparseable)."""
    if reply.text is None:
        return RubricSample("failed", error=reply.error)
    score = parse_score(reply.text)
    status: Status = "unparseable" if score is None else "scored"
    return RubricSample(status, score, _truncate(reply.text))


def pairwise_sample(tuned_as_a: Reply, tuned_as_b: Reply) -> PairwiseSample:
    """Combine the replies of both orders into one outcome."""
    errors = (tuned_as_a.error, tuned_as_b.error)
    if tuned_as_a.text is None or tuned_as_b.text is None:
        replies = (_truncate(tuned_as_a.text), _truncate(tuned_as_b.text))
        return PairwiseSample("failed", replies=replies, errors=errors)
    verdicts = (parse_verdict(tuned_as_a.text), parse_verdict(tuned_as_b.text))
    replies = (_truncate(tuned_as_a.text), _truncate(tuned_as_b.text))
    first, second = verdicts
    if first is None or second is None:
        return PairwiseSample("unparseable", verdicts, replies, errors)
    return PairwiseSample(combine_verdicts(first, second), verdicts, replies, errors)


def judge(
    spec: JudgeSpec,
    prompts: list[str],
    references: list[str],
    tuned: list[str],
    base: list[str] | None,
    *,
    log: Callable[[str], None],
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_tokens: int = MAX_TOKENS,
) -> JudgeResult:
    """Judge the tuned (and base) answers as evaluation.judge says.

    Args:
        spec: evaluation.judge.
        prompts: each example's question (see `conversation_text`).
        references: each example's reference answer ("" for none).
        tuned: the tuned model's answers.
        base: the base model's answers, or None when the base was not evaluated (then
            Pairwise is refused and Both judges the tuned answers by rubric only).
        log: where progress and retries are reported (never the API key).
        client: an httpx client to send through (default: a new one, closed afterwards).
        sleep: waits between retries (tests pass a recorder).
        max_tokens: longest judge reply.

    Raises:
        EvaluationError: the key was refused, the endpoint or model does not exist, every
            request failed, or Pairwise was asked for without base answers.
    """
    count = len(prompts)
    lengths = {len(references), len(tuned)} | ({len(base)} if base is not None else set())
    if lengths != {count}:
        raise ValueError("prompts, references, tuned and base must have the same length")
    rubric = (spec.rubric or "").strip() or DEFAULT_RUBRIC
    if base is None and spec.mode == JudgeMode.PAIRWISE:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            "evaluation.judge.mode Pairwise compares the base and the tuned model's answers: "
            "set evaluation.compareBase: true, or use mode Rubric",
        )
    rubric_wanted = spec.mode in (JudgeMode.RUBRIC, JudgeMode.BOTH)
    pairwise_wanted = spec.mode != JudgeMode.RUBRIC and base is not None
    if base is None and spec.mode == JudgeMode.BOTH:
        log("Judge: no base answers (evaluation.compareBase is false): rubric scores only")

    jobs = build_requests(
        rubric, prompts, references, tuned, base, rubric=rubric_wanted, pairwise=pairwise_wanted
    )

    own = client is None
    http = client or httpx.Client(
        limits=httpx.Limits(
            max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency
        )
    )
    caller = JudgeClient(spec, http, log=log, sleep=sleep, max_tokens=max_tokens)
    log(
        f"Judge: {len(jobs)} requests for {count} examples to {spec.model} at "
        f"{caller.shown_url} (mode {spec.mode.value}, {spec.max_concurrency} at a time"
        f"{', with API key' if caller.sends_key else ''})"
    )
    try:
        replies = _ask_all(caller, jobs, spec.max_concurrency)
    finally:
        if own:
            http.close()
    if jobs and caller.succeeded == 0:
        _raise_all_failed(caller, len(jobs))

    tuned_scores, base_scores, pairwise = _assemble(
        replies, count, rubric_wanted, base is not None, pairwise_wanted
    )
    result = JudgeResult(
        spec.model,
        tuned_scores,
        base_scores,
        pairwise,
        requests=caller.succeeded + caller.failed,
        prompt_tokens=caller.prompt_tokens,
        completion_tokens=caller.completion_tokens,
    )
    for line in summary_lines(result):
        log(line)
    return result


def build_requests(
    criteria: str,
    prompts: list[str],
    references: list[str],
    tuned: list[str],
    base: list[str] | None,
    *,
    rubric: bool,
    pairwise: bool,
) -> list[list[dict[str, str]]]:
    """Every request, in order: tuned rubric, base rubric, then for each example the pair
    with the tuned answer as A followed by the pair with it as B."""
    jobs: list[list[dict[str, str]]] = []
    if rubric:
        for answers in [tuned] + ([base] if base is not None else []):
            jobs += [
                rubric_messages(criteria, p, r, a)
                for p, r, a in zip(prompts, references, answers, strict=True)
            ]
    if pairwise and base is not None:
        for p, r, t, b in zip(prompts, references, tuned, base, strict=True):
            jobs.append(pairwise_messages(criteria, p, r, t, b))
            jobs.append(pairwise_messages(criteria, p, r, b, t))
    return jobs


def _ask_all(
    caller: JudgeClient, jobs: list[list[dict[str, str]]], concurrency: int
) -> list[Reply]:
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge") as pool:
        futures = [pool.submit(caller.ask, messages) for messages in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            caller.stopped.set()
            for future in futures:
                future.cancel()
            raise


def _raise_all_failed(caller: JudgeClient, total: int) -> None:
    sent = caller.succeeded + caller.failed
    scope = f"all {total} requests" if sent == total else f"the first {sent} requests"
    last = caller.last_error
    if caller.unavailable:
        raise EvaluationError(
            UNAVAILABLE_REASON,
            f"The judge at {caller.shown_url} could not be reached: {scope} failed after "
            f"retries (last error: {last}). Check evaluation.judge.endpoint and that the judge "
            f"is running and reachable from the trainer pod",
        )
    raise EvaluationError(
        Reason.INVALID_SPEC,
        f"The judge at {caller.shown_url} refused {scope} (last error: {last}). Check "
        f"evaluation.judge.model and that evaluation.judge.endpoint is an OpenAI-compatible "
        f"API",
    )


def _assemble(
    replies: list[Reply], count: int, rubric_wanted: bool, has_base: bool, pairwise_wanted: bool
) -> tuple[RubricResult | None, RubricResult | None, PairwiseResult | None]:
    """Split the replies, in the order the requests were made, into results."""
    rest = iter(replies)

    def take(n: int) -> list[Reply]:
        return [next(rest) for _ in range(n)]

    tuned = base = None
    if rubric_wanted:
        tuned = RubricResult(tuple(rubric_sample(r) for r in take(count)))
        if has_base:
            base = RubricResult(tuple(rubric_sample(r) for r in take(count)))
    pairwise = None
    if pairwise_wanted:
        pairs = take(2 * count)
        pairwise = PairwiseResult(
            tuple(pairwise_sample(pairs[2 * i], pairs[2 * i + 1]) for i in range(count))
        )
    return tuned, base, pairwise


def summary_lines(result: JudgeResult) -> list[str]:
    """One log line per part of the result."""
    lines = []
    for side, rubric in (("tuned", result.tuned), ("base", result.base)):
        if rubric is not None:
            mean = "n/a" if rubric.mean is None else f"{rubric.mean:.2f}"
            lines.append(
                f"Judge rubric ({side}): mean score {mean} over {rubric.scored} scored, "
                f"{rubric.unparseable} unparseable, {rubric.failed} failed"
            )
    if result.pairwise is not None:
        pair = result.pairwise
        rate = "n/a" if pair.win_rate is None else f"{pair.win_rate:.3f}"
        lines.append(
            f"Judge pairwise: win rate {rate} (wins {pair.wins}, ties {pair.ties} of which "
            f"{pair.inconsistent} inconsistent, losses {pair.losses}), "
            f"{pair.unparseable} unparseable, {pair.failed} failed"
        )
    parts = [r for r in (result.tuned, result.base) if r is not None]
    unparseable = sum(r.unparseable for r in parts)
    decided = sum(r.scored for r in parts)
    if result.pairwise is not None:
        unparseable += result.pairwise.unparseable
        decided += result.pairwise.wins + result.pairwise.ties + result.pairwise.losses
    if unparseable and unparseable >= decided:
        lines.append(
            "Most judge replies did not end in the required 'Score: N' or 'Verdict: ...' line "
            "and were left out: the judge model may be too small to follow the format "
            "(evaluation.judge.model); eval/samples.jsonl shows its replies"
        )
    return lines
