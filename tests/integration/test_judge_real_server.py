"""The judge end to end against a real model behind an OpenAI-compatible server.

The judge here is the built-in 135M model: too small to follow the output format reliably,
so the test checks the plumbing, not the scores: every request is answered, every result is
counted as scored or unparseable, and the numbers are in range.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kubetune.api.v1alpha1.evaluation import JudgeMode, JudgeSpec
from kubetune.trainer.scoring.judge import judge
from support.chat_server import ChatServer

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "What is 2 + 3?", "Name a primary colour."]
REFERENCES = ["Paris.", "5", "Red."]
TUNED = ["The capital of France is Paris.", "2 + 3 = 5.", "Red is a primary colour."]
BASE = ["France is a country in Europe.", "It is 6.", "Green."]


def test_judge_in_both_modes_against_a_real_model(builtin_model_dir: Path) -> None:
    lines: list[str] = []
    with ChatServer(builtin_model_dir, name="smollm2") as server:
        spec = JudgeSpec(
            endpoint=server.url,
            model="smollm2",
            mode=JudgeMode.BOTH,
            max_concurrency=2,
            timeout_seconds=120,
            max_retries=0,
        )
        result = judge(spec, PROMPTS, REFERENCES, TUNED, BASE, log=lines.append, max_tokens=24)
    assert server.requests == 12  # 3 tuned + 3 base rubric, 3 pairs in two orders
    for rubric in (result.tuned, result.base):
        assert rubric is not None
        assert rubric.failed == 0
        assert rubric.scored + rubric.unparseable == 3
        assert rubric.mean is None or 1 <= rubric.mean <= 10
    pairwise = result.pairwise
    assert pairwise is not None
    assert pairwise.failed == 0
    assert pairwise.wins + pairwise.ties + pairwise.losses + pairwise.unparseable == 3
    assert pairwise.win_rate is None or 0 <= pairwise.win_rate <= 1
    counts = result.counts()
    assert counts["requests"] == 12
    assert counts["completionTokens"] > 0
    details = result.sample_details(0)
    assert details["tuned"]["reply"]
    assert details["pairwise"]["tunedAsA"]["reply"]
    assert any(line.startswith("Judge pairwise:") for line in lines)


def test_chat_server_runs_as_a_process(builtin_model_dir: Path, repo_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo_root / "tests"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "support.chat_server", str(builtin_model_dir), "--name", "m"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Serving m at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].strip()
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert response.status_code == 200
        payload = response.json()
        assert isinstance(payload["choices"][0]["message"]["content"], str)
        assert payload["usage"]["completion_tokens"] <= 4
        assert httpx.post(f"{url}/chat/completions", json={}, timeout=10).status_code == 400
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
