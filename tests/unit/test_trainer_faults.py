"""Fault points and the checkpoint mechanics a killed trainer relies on: which point fires,
a checkpoint's own training log, the half-deleted checkpoint, the resume-proof train loss."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from kubetune.storage import RunLayout, open_store
from kubetune.storage.checkpoints import MARKER, checkpoint_steps, prune_checkpoints
from kubetune.trainer import checkpointing, faults


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    monkeypatch.setattr(faults.os, "kill", lambda _pid, number: sent.append(number))
    return sent


@pytest.mark.parametrize(
    ("fault", "point", "step", "stage", "fires"),
    [
        ("KILL@checkpoint-upload:4", "checkpoint-upload", 4, None, True),
        ("KILL@checkpoint-upload:4", "checkpoint-upload", 2, None, False),
        ("KILL@checkpoint-upload:4", "checkpoint-marker", 4, None, False),
        ("KILL@DPO.step-end:3", "step-end", 3, "DPO", True),
        ("KILL@DPO.step-end:3", "step-end", 3, "SFT", False),
        ("KILL@step-end:3", "step-end", 3, "SFT", True),
        ("TERM@manifest:0", "manifest", 0, None, True),
    ],
)
def test_a_fault_fires_at_its_point_step_and_stage_only(
    monkeypatch: pytest.MonkeyPatch,
    kills: list[int],
    fault: str,
    point: str,
    step: int,
    stage: str | None,
    fires: bool,
) -> None:
    monkeypatch.setenv(faults.ENV, fault)
    faults.reach(point, step, stage)
    expected = signal.SIGTERM if fault.startswith("TERM") else signal.SIGKILL
    assert kills == ([expected] if fires else [])


def test_every_point_is_documented() -> None:
    doc = faults.__doc__ or ""
    assert all(f"- `{point}` (" in doc for point in faults.POINTS)


def checkpoint_folder(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / "local" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        (folder / name).write_text(f"{name} at {step}")
    return folder


def test_a_checkpoint_carries_the_log_of_its_step(tmp_path: Path) -> None:
    store, layout = (
        open_store(str(tmp_path / "out")),
        RunLayout(str(tmp_path / "out"), "t", "j", "r"),
    )
    log = tmp_path / "logs" / "train.jsonl"
    log.parent.mkdir()
    log.write_text('{"step": 1}\n{"step": 2}\n')
    checkpointing.upload_checkpoint(
        store, layout, checkpoint_folder(tmp_path, 2), 2, 2, log_path=log
    )
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')  # trained on, then killed
    found = checkpointing.download_latest(store, layout, tmp_path / "resume", log_path=log)
    assert found is not None
    assert found[0] == 2
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_checkpoint_without_a_log_leaves_the_log_alone(tmp_path: Path) -> None:
    store, layout = (
        open_store(str(tmp_path / "out")),
        RunLayout(str(tmp_path / "out"), "t", "j", "r"),
    )
    checkpointing.upload_checkpoint(store, layout, checkpoint_folder(tmp_path, 2), 2, 2)
    log = tmp_path / "train.jsonl"
    log.write_text('{"step": 1}\n')
    assert checkpointing.download_latest(store, layout, tmp_path / "resume", log_path=log)
    assert log.read_text() == '{"step": 1}\n'


def test_a_half_deleted_checkpoint_has_no_marker_and_is_pruned_later(tmp_path: Path) -> None:
    store, layout = (
        open_store(str(tmp_path / "out")),
        RunLayout(str(tmp_path / "out"), "t", "j", "r"),
    )
    for step in (2, 4, 6):
        checkpointing.upload_checkpoint(store, layout, checkpoint_folder(tmp_path, step), step, 3)

    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        raise Killed(step)

    with pytest.raises(Killed):
        prune_checkpoints(store, layout, 1, marker_deleted=kill)
    left = checkpoint_steps(store, layout)
    assert MARKER not in left[2]
    assert left[2]
    found = checkpointing.download_latest(store, layout, tmp_path / "resume")
    assert found is not None
    assert found[0] == 6
    assert prune_checkpoints(store, layout, 1) == [2, 4]


def test_the_logged_train_loss_weights_each_window_by_its_steps() -> None:
    history = [
        {"step": 1, "loss": 4.0},
        {"step": 4, "loss": 2.0},  # steps 2-4
        {"step": 4, "eval_loss": 9.0},
        {"step": 6, "loss": 1.0},  # steps 5-6
        {"step": 6, "train_loss": 99.0},
    ]
    assert checkpointing.logged_train_loss(history) == pytest.approx((4 + 3 * 2 + 2 * 1) / 6)
    assert checkpointing.logged_train_loss([{"step": 1, "eval_loss": 1.0}]) is None


def test_the_token_count_comes_back_from_the_checkpoint(tmp_path: Path) -> None:
    history = [{"step": 1, "num_tokens": 10.0}, {"step": 2, "num_tokens": 25.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    class Trainer:
        _total_train_tokens = 0

    trainer = Trainer()
    checkpointing.restore_token_count(trainer, tmp_path)
    assert trainer._total_train_tokens == 25.0
