"""The LLM judge: strict parsing, position-swapped pairwise verdicts, retries, the API key,
concurrency, and failures, against a scripted OpenAI-compatible server."""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import JudgeMode, JudgeSpec
from kubetune.trainer.evaluate import EvaluationError
from kubetune.trainer.scoring.judge import (
    API_KEY_ENV,
    DEFAULT_RUBRIC,
    REPLY_CHARS,
    combine_verdicts,
    conversation_text,
    judge,
    pairwise_messages,
    parse_score,
    parse_verdict,
    rubric_messages,
    win_rate,
)
from kubetune.trainer.scoring.judge_client import (
    FAIL_FAST_AFTER,
    MAX_WAIT_SECONDS,
    backoff_seconds,
    display_url,
    retry_after_seconds,
)
from support.openai_server import OpenAIServer, Recorded, Scripted

SECRET = "sk-test-0123456789abcdef"


def make_spec(endpoint: str, **fields: Any) -> JudgeSpec:
    return JudgeSpec(endpoint=endpoint, model="judge-model", **fields)


class Recorder:
    """Collects log lines and retry waits."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waits: list[float] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def examples(count: int) -> tuple[list[str], list[str], list[str], list[str]]:
    prompts = [f"Question {i}?" for i in range(count)]
    references = [f"Reference {i}." for i in range(count)]
    tuned = [f"TUNED answer {i}." for i in range(count)]
    base = [f"BASE answer {i}." for i in range(count)]
    return prompts, references, tuned, base


def run_judge(
    spec: JudgeSpec, count: int, recorder: Recorder, *, with_base: bool = True, **kwargs: Any
) -> Any:
    prompts, references, tuned, base = examples(count)
    return judge(
        spec,
        prompts,
        references,
        tuned,
        base if with_base else None,
        log=recorder.log,
        sleep=recorder.sleep,
        **kwargs,
    )


def tuned_position(request: Recorded) -> str:
    """Which position ("A" or "B") the tuned answer has in a pairwise request."""
    text = request.user_text
    return "A" if text.index("TUNED") < text.index("[Answer B]") else "B"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        pytest.param("Clear and correct.\nScore: 8", 8, id="explanation-then-score"),
        pytest.param("Score: 10", 10, id="top"),
        pytest.param("Score: 1", 1, id="bottom"),
        pytest.param("Fine.\n\n**Score: 7**\n", 7, id="bold-and-trailing-blank-lines"),
        pytest.param("score : 6/10.", 6, id="case-spaces-slash-ten-period"),
        pytest.param("Score: 11", None, id="above-range"),
        pytest.param("Score: 0", None, id="below-range"),
        pytest.param("Score: -3", None, id="negative"),
        pytest.param("Score: 7.5", None, id="not-an-integer"),
        pytest.param("Score: eight", None, id="word"),
        pytest.param("I would give it an 8.", None, id="missing"),
        pytest.param("Score: 8\nHope this helps!", None, id="not-the-last-line"),
        pytest.param("Score: 8 because it is clear", None, id="text-after-score"),
        pytest.param("", None, id="empty"),
        pytest.param("%%%###", None, id="junk"),
    ],
)
def test_parse_score_reads_only_a_valid_final_score_line(reply: str, score: int | None) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        pytest.param("A is more precise.\nVerdict: A", "A", id="a"),
        pytest.param("verdict: b", "B", id="lowercase-b"),
        pytest.param("**Verdict: Tie**", "tie", id="bold-tie"),
        pytest.param("Verdict: C", None, id="unknown-letter"),
        pytest.param("A", None, id="bare-letter"),
        pytest.param("Verdict: A or B", None, id="undecided"),
        pytest.param("Verdict: A\nThat is all.", None, id="not-the-last-line"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_verdict_reads_only_a_valid_final_verdict_line(
    reply: str, verdict: str | None
) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    ("tuned_as_a", "tuned_as_b", "outcome"),
    [
        pytest.param("A", "B", "win", id="wins-both-orders"),
        pytest.param("A", "tie", "win", id="wins-one-ties-other"),
        pytest.param("tie", "B", "win", id="ties-one-wins-other"),
        pytest.param("B", "A", "loss", id="loses-both-orders"),
        pytest.param("B", "tie", "loss", id="loses-one-ties-other"),
        pytest.param("tie", "A", "loss", id="ties-one-loses-other"),
        pytest.param("tie", "tie", "tie", id="ties-both"),
        pytest.param("A", "A", "tie", id="always-first-position-is-a-tie"),
        pytest.param("B", "B", "tie", id="always-second-position-is-a-tie"),
    ],
)
def test_combine_verdicts_of_both_orders(tuned_as_a: str, tuned_as_b: str, outcome: str) -> None:
    assert combine_verdicts(tuned_as_a, tuned_as_b) == outcome  # type: ignore[arg-type]


def test_win_rate_counts_ties_as_half_and_needs_a_decided_pair() -> None:
    assert win_rate(3, 2, 1) == pytest.approx(4 / 6)
    assert win_rate(0, 4, 0) == 0.5
    assert win_rate(0, 0, 0) is None


def test_prompts_carry_rubric_question_reference_and_answers() -> None:
    system, user = rubric_messages("brevity", "Why?", "Because.", "Since.")
    assert "brevity" in system["content"]
    assert "Score: N" in system["content"]
    assert "[Question]\nWhy?" in user["content"]
    assert "[Reference answer]\nBecause." in user["content"]
    assert "[Answer]\nSince." in user["content"]
    system, user = pairwise_messages("brevity", "Why?", "", "first", "second")
    assert "Verdict: A" in system["content"]
    assert "Verdict: tie" in system["content"]
    assert "Reference answer" not in user["content"]
    assert user["content"].index("first") < user["content"].index("second")


def test_conversation_text() -> None:
    assert conversation_text([{"role": "user", "content": "Hi?"}]) == "Hi?"
    text = conversation_text(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    )
    assert text == "system: Be brief.\n\nuser: Hi?"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), ("0.5", 0.5), ("-5", 0.0), ("100000", MAX_WAIT_SECONDS), (None, None)],
)
def test_retry_after_in_seconds_is_capped(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_http_date_falls_back_to_backoff() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2026 07:28:00 GMT") is None


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(0)
    waits = [backoff_seconds(attempt, rng) for attempt in range(8)]
    for attempt, wait in enumerate(waits[:5]):
        assert 2**attempt <= wait <= 2**attempt + 1
    assert max(waits) <= MAX_WAIT_SECONDS


def test_display_url_hides_credentials() -> None:
    assert display_url("http://user:pw@judge:8000/v1/chat") == "http://judge:8000/v1/chat"


# Rubric mode -----------------------------------------------------------------------------


def test_rubric_scores_parse_failures_are_counted_not_guessed() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push("Good.\nScore: 8", "Score: 6", "It is fine, maybe 9?", "Score: 11")
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, max_concurrency=1)
        result = run_judge(spec, 4, recorder, with_base=False)
    assert result.tuned.scored == 2
    assert result.tuned.unparseable == 2
    assert result.tuned.failed == 0
    assert result.metrics("tuned") == {"JudgeScore": 7.0}
    assert result.base is None
    assert result.pairwise is None
    assert [result.sample_details(i)["tuned"]["status"] for i in range(4)] == [
        "scored",
        "scored",
        "unparseable",
        "unparseable",
    ]
    request = server.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == "judge-model"
    assert request.body["temperature"] == 0
    assert DEFAULT_RUBRIC in request.body["messages"][0]["content"]
    assert "Authorization" not in request.headers


def test_rubric_scores_base_answers_too_for_relative_gates() -> None:
    def responder(body: dict[str, Any]) -> str:
        return "Score: 9" if "TUNED" in body["messages"][1]["content"] else "Score: 4"

    recorder = Recorder()
    with OpenAIServer(responder) as server:
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, rubric="politeness")
        result = run_judge(spec, 3, recorder)
    assert result.metrics("tuned") == {"JudgeScore": 9.0}
    assert result.metrics("base") == {"JudgeScore": 4.0}
    assert len(server.requests) == 6
    assert all("politeness" in r.body["messages"][0]["content"] for r in server.requests)


def test_nothing_scored_leaves_the_metric_out() -> None:
    recorder = Recorder()
    with OpenAIServer(lambda body: "no idea") as server:
        result = run_judge(make_spec(server.url, mode=JudgeMode.RUBRIC), 2, recorder)
    assert result.metrics("tuned") == {}
    assert result.tuned.unparseable == 2
    assert any("mean score n/a" in line for line in recorder.lines)
    assert any("too small to follow the format" in line for line in recorder.lines)


def test_long_replies_are_truncated_in_the_details() -> None:
    recorder = Recorder()
    with OpenAIServer(lambda body: "x" * 2000 + "\nScore: 5") as server:
        result = run_judge(make_spec(server.url, mode=JudgeMode.RUBRIC), 1, recorder)
    details = result.sample_details(0)["tuned"]
    assert details["score"] == 5
    assert len(details["reply"]) <= REPLY_CHARS + 3


# Pairwise mode ---------------------------------------------------------------------------


def test_pairwise_asks_both_orders_and_a_fair_judge_prefers_the_tuned_answer() -> None:
    def prefers_tuned(body: dict[str, Any]) -> str:
        text = body["messages"][1]["content"]
        return "Verdict: A" if text.index("TUNED") < text.index("[Answer B]") else "Verdict: B"

    recorder = Recorder()
    with OpenAIServer(prefers_tuned) as server:
        result = run_judge(make_spec(server.url, mode=JudgeMode.PAIRWISE), 3, recorder)
    assert len(server.requests) == 6
    for i in range(3):
        asked = [r for r in server.requests if f"TUNED answer {i}." in r.user_text]
        assert sorted(tuned_position(r) for r in asked) == ["A", "B"]
        assert all(f"BASE answer {i}." in r.user_text for r in asked)
    pairwise = result.pairwise
    assert (pairwise.wins, pairwise.ties, pairwise.losses) == (3, 0, 0)
    assert result.metrics("tuned") == {"JudgeWinRate": 1.0}
    assert result.metrics("base") == {}
    assert result.tuned is None


def test_a_position_biased_judge_yields_ties_not_wins() -> None:
    recorder = Recorder()
    with OpenAIServer(lambda body: "Verdict: A") as server:
        result = run_judge(make_spec(server.url, mode=JudgeMode.PAIRWISE), 4, recorder)
    pairwise = result.pairwise
    assert (pairwise.wins, pairwise.ties, pairwise.losses) == (0, 4, 0)
    assert pairwise.inconsistent == 4
    assert result.metrics("tuned") == {"JudgeWinRate": 0.5}
    assert result.sample_details(0)["pairwise"]["inconsistent"] is True


def test_pairwise_excludes_unparseable_and_failed_pairs_from_the_win_rate() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(
            "Verdict: A",  # pair 0, tuned as A: win
            "Verdict: B",  # pair 0, tuned as B: win
            "Verdict: B",  # pair 1, tuned as A: loss
            "I cannot decide.",  # pair 1, tuned as B: unparseable
            Scripted(400),  # pair 2, tuned as A: refused, not retried
            "Verdict: tie",  # pair 2, tuned as B
        )
        spec = make_spec(server.url, mode=JudgeMode.PAIRWISE, max_concurrency=1)
        result = run_judge(spec, 3, recorder)
    pairwise = result.pairwise
    assert [s.outcome for s in pairwise.samples] == ["win", "unparseable", "failed"]
    assert (pairwise.unparseable, pairwise.failed) == (1, 1)
    assert result.metrics("tuned") == {"JudgeWinRate": 1.0}
    assert len(server.requests) == 6
    assert recorder.waits == []


def test_both_mode_scores_and_compares() -> None:
    def responder(body: dict[str, Any]) -> str:
        if "Verdict" in body["messages"][0]["content"]:
            text = body["messages"][1]["content"]
            return "Verdict: A" if text.index("TUNED") < text.index("[Answer B]") else "Verdict: B"
        return "Score: 8" if "TUNED" in body["messages"][1]["content"] else "Score: 5"

    recorder = Recorder()
    with OpenAIServer(responder) as server:
        result = run_judge(make_spec(server.url), 2, recorder)
    assert result.metrics("tuned") == {"JudgeScore": 8.0, "JudgeWinRate": 1.0}
    assert result.metrics("base") == {"JudgeScore": 5.0}
    counts = json.loads(json.dumps(result.counts()))
    assert counts["requests"] == 8
    assert counts["rubric"]["tuned"]["scored"] == 2
    assert counts["pairwise"]["wins"] == 2
    assert counts["completionTokens"] == 8 * 5
    json.dumps(result.sample_details(1))


def test_pairwise_without_base_answers_is_refused() -> None:
    with pytest.raises(EvaluationError, match="compareBase") as error:
        run_judge(
            make_spec("http://127.0.0.1:1/v1", mode=JudgeMode.PAIRWISE),
            1,
            Recorder(),
            with_base=False,
        )
    assert error.value.reason == Reason.INVALID_SPEC


def test_both_without_base_answers_scores_by_rubric_only() -> None:
    recorder = Recorder()
    with OpenAIServer(lambda body: "Score: 6") as server:
        result = run_judge(make_spec(server.url), 2, recorder, with_base=False)
    assert result.metrics("tuned") == {"JudgeScore": 6.0}
    assert result.pairwise is None
    assert len(server.requests) == 2
    assert any("rubric scores only" in line for line in recorder.lines)


# Retries and failures --------------------------------------------------------------------


def test_rate_limit_is_retried_after_the_servers_retry_after() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(Scripted(429, headers={"Retry-After": "7"}), "Score: 9")
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC)
        result = run_judge(spec, 1, recorder, with_base=False)
    assert result.metrics("tuned") == {"JudgeScore": 9.0}
    assert len(server.requests) == 2
    assert recorder.waits == [7.0]
    assert any("HTTP 429" in line and "retry 1 of 3" in line for line in recorder.lines)


def test_retry_after_is_capped() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(Scripted(503, headers={"Retry-After": "86400"}), "Score: 9")
        run_judge(make_spec(server.url, mode=JudgeMode.RUBRIC), 1, recorder, with_base=False)
    assert recorder.waits == [MAX_WAIT_SECONDS]


def test_server_errors_exhaust_retries_and_count_as_a_failure() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(Scripted(500), Scripted(502), Scripted(500), "Score: 4")
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, max_retries=2, max_concurrency=1)
        result = run_judge(spec, 2, recorder, with_base=False)
    assert len(server.requests) == 4
    assert [s.status for s in result.tuned.samples] == ["failed", "scored"]
    assert "HTTP 500" in (result.tuned.samples[0].error or "")
    assert result.metrics("tuned") == {"JudgeScore": 4.0}
    assert len(recorder.waits) == 2
    assert 1 <= recorder.waits[0] <= 2 <= recorder.waits[1] <= 3


def test_a_timeout_is_retried() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(Scripted(content="Score: 2", delay=1.0), "Score: 9")
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC).model_copy(
            update={"timeout_seconds": 0.2}
        )
        result = run_judge(spec, 1, recorder, with_base=False)
    assert result.metrics("tuned") == {"JudgeScore": 9.0}
    assert len(server.requests) == 2
    assert len(recorder.waits) == 1
    assert any("no reply within" in line for line in recorder.lines)


def test_a_refused_key_stops_at_once_naming_the_secret_ref() -> None:
    recorder = Recorder()
    with OpenAIServer(lambda body: Scripted(401)) as server:
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, max_concurrency=1)
        with pytest.raises(EvaluationError) as error:
            run_judge(spec, 5, recorder)
    assert error.value.reason == Reason.SOURCE_UNAUTHORIZED
    assert "evaluation.judge.apiKeySecretRef" in str(error.value)
    assert API_KEY_ENV in str(error.value)
    assert len(server.requests) == 1
    assert recorder.waits == []


def test_an_unknown_model_or_path_names_endpoint_and_model() -> None:
    with (
        OpenAIServer(lambda body: Scripted(404)) as server,
        pytest.raises(EvaluationError) as error,
    ):
        run_judge(make_spec(server.url, mode=JudgeMode.RUBRIC), 2, Recorder())
    assert error.value.reason == Reason.SOURCE_NOT_FOUND
    assert "evaluation.judge.endpoint" in str(error.value)
    assert "evaluation.judge.model" in str(error.value)


def test_an_unreachable_judge_fails_the_evaluation() -> None:
    recorder = Recorder()
    spec = make_spec(f"http://127.0.0.1:{unused_port()}/v1", mode=JudgeMode.RUBRIC, max_retries=1)
    with pytest.raises(EvaluationError) as error:
        run_judge(spec, 2, recorder)
    assert error.value.reason == Reason.INFRASTRUCTURE_ERROR
    assert "could not be reached" in str(error.value)
    assert "all 4 requests" in str(error.value)
    assert "evaluation.judge.endpoint" in str(error.value)
    assert len(recorder.waits) == 4


def test_an_unreachable_judge_is_given_up_after_a_few_requests() -> None:
    recorder = Recorder()
    spec = make_spec(
        f"http://127.0.0.1:{unused_port()}/v1",
        mode=JudgeMode.RUBRIC,
        max_retries=0,
        max_concurrency=1,
    )
    with pytest.raises(EvaluationError, match=f"the first {FAIL_FAST_AFTER} requests"):
        run_judge(spec, 50, recorder)


def test_every_request_refused_is_an_invalid_spec() -> None:
    with (
        OpenAIServer(lambda body: Scripted(400)) as server,
        pytest.raises(EvaluationError, match=r"evaluation\.judge\.model") as error,
    ):
        run_judge(make_spec(server.url, mode=JudgeMode.RUBRIC), 2, Recorder())
    assert error.value.reason == Reason.INVALID_SPEC


def test_a_malformed_success_counts_as_a_failure() -> None:
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(Scripted(body='{"choices": []}'), "Score: 3")
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, max_concurrency=1)
        result = run_judge(spec, 2, recorder, with_base=False)
    assert [s.status for s in result.tuned.samples] == ["failed", "scored"]


# API key ---------------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    echo = json.dumps({"error": {"message": f"bad request with Authorization: Bearer {SECRET}"}})
    recorder = Recorder()
    with OpenAIServer() as server:
        server.push(*[Scripted(500, body=echo)] * 4, f"Score: 5 {SECRET}", "Score: 5")
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, max_concurrency=1)
        result = run_judge(spec, 3, recorder, with_base=False)
    assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert [s.status for s in result.tuned.samples] == ["failed", "unparseable", "scored"]
    shown = "\n".join(recorder.lines) + json.dumps(
        [result.counts()] + [result.sample_details(i) for i in range(3)]
    )
    assert "HTTP 500" in shown
    assert SECRET not in shown


@pytest.mark.parametrize("status", [500, 401, 404, 400])
def test_api_key_is_never_in_error_messages(monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    echo = Scripted(status, body=f"<html>Authorization: Bearer {SECRET}</html>")
    recorder = Recorder()
    with OpenAIServer(lambda body: echo) as server:
        spec = make_spec(server.url, mode=JudgeMode.RUBRIC, max_retries=1)
        with pytest.raises(EvaluationError) as error:
            run_judge(spec, 1, recorder)
    assert "Authorization: Bearer [redacted]" in str(error.value)
    assert SECRET not in str(error.value)
    assert SECRET not in "\n".join(recorder.lines)


# Concurrency -----------------------------------------------------------------------------


def test_requests_in_flight_never_exceed_max_concurrency() -> None:
    recorder = Recorder()
    with OpenAIServer(lambda body: Scripted(content="Score: 7", delay=0.4)) as server:
        spec = make_spec(server.url, mode=JudgeMode.BOTH, max_concurrency=3)
        result = run_judge(spec, 3, recorder)
    assert len(server.requests) == 12
    assert 2 <= server.max_in_flight <= 3
    assert result.tuned.scored == 3
