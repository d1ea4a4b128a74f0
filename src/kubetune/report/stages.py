"""The training stages of a run and what each one achieved: headline metrics for the report's
Stages section and the terminal summary, and the per-step series its plots draw. Pure
functions over `RunArtifacts`.

A stage is read from the manifest's `metrics.stages` (`{"name": "1-dpo", "type": "DPO",
"steps": 6, "metrics": {…}}`, where `metrics` are the stage's final values) and from its
records in `logs/train.jsonl` (`{"stage": "DPO", "step": 3, …}`). The keys read, by type:

    DPO, ORPO, SimPO, KTO  log: rewards/margins, rewards/accuracies (or, for a margin,
                           rewards/chosen minus rewards/rejected), their eval_ forms, kl
    RewardModel            log: accuracy, margin, eval_accuracy, eval_margin; stage
                           metrics: eval_accuracy_before/after, eval_margin_before/after,
                           train_pairs (without held-out values, the training accuracy)
    RLHF                   log: score (PPO) or reward and reward_std (RLOO, GRPO), kl,
                           value_loss (PPO); stage metrics: initial_score, algorithm
    SFT                    log: loss, eval_loss; stage metrics: train_loss, eval_loss

Log values win over stage metrics (they are the same numbers when both exist; the log also
has them for runs whose stage records lack them). A run without stage records (older runs,
or a report rendered before the manifest) takes its stages from the lineage and the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.report.artifacts import RunArtifacts
from kubetune.report.views import format_metric, number

PREFERENCE_TYPES = frozenset({"DPO", "ORPO", "SimPO", "KTO"})
REWARD_MODEL = "RewardModel"
RLHF = "RLHF"

Series = list[tuple[int, float]]


@dataclass(frozen=True)
class Stage:
    """One stage of the chain.

    Attributes:
        name: `<index>-<type>` in lower case, e.g. `1-dpo`.
        type: `SFT`, `DPO`, `ORPO`, `KTO`, `SimPO`, `RewardModel` or `RLHF`.
        index: its position in the chain (from 0).
        steps: optimizer steps it ran, if known.
        metrics: its final metrics from the manifest (empty when not recorded).
        log: its records of `logs/train.jsonl`.
    """

    name: str
    type: str
    index: int
    steps: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    log: tuple[Mapping[str, Any], ...] = ()

    @property
    def aligned(self) -> bool:
        """Whether this is an alignment stage (anything but SFT)."""
        return self.type != "SFT"

    @property
    def title(self) -> str:
        """The type, with the RLHF algorithm when known: `RLHF (PPO)`."""
        algorithm = rlhf_algorithm(self)
        return f"{self.type} ({algorithm})" if algorithm else self.type

    @property
    def plot_name(self) -> str:
        """The name of its plot: `stage-1-dpo`."""
        return "stage-" + re.sub(r"[^A-Za-z0-9._-]+", "-", self.name)


def run_stages(run: RunArtifacts) -> list[Stage]:
    """The run's stages in chain order, each with its log records."""
    named = _recorded(run.stages) or _from_lineage(run.lineage) or _from_log(run.train_log)
    buckets = _split_log(run.train_log, named)
    stages = []
    for index, ((name, kind, steps, metrics), records) in enumerate(
        zip(named, buckets, strict=True)
    ):
        if steps is None:
            logged = [int(s) for r in records if (s := number(r.get("step"))) is not None]
            steps = max(logged) if logged else None
        stages.append(Stage(name, kind, index, steps, metrics, tuple(records)))
    return stages


def shows_stages(stages: Sequence[Stage]) -> bool:
    """Whether the report has a Stages section: several stages, or any alignment stage."""
    return len(stages) > 1 or any(s.aligned for s in stages)


_Named = tuple[str, str, int | None, Mapping[str, Any]]


def _recorded(records: Iterable[Mapping[str, Any]]) -> list[_Named]:
    named = []
    for index, record in enumerate(records):
        kind = str(record.get("type") or "")
        name = str(record.get("name") or (f"{index}-{kind.lower()}" if kind else index))
        steps = number(record.get("steps"))
        metrics = record.get("metrics")
        named.append(
            (
                name,
                kind or name,
                int(steps) if steps is not None else None,
                metrics if isinstance(metrics, Mapping) else {},
            )
        )
    return named


def _from_lineage(lineage: Mapping[str, Any]) -> list[_Named]:
    stages = lineage.get("stages")
    if not isinstance(stages, list):
        return []
    kinds = [str(s.get("type") if isinstance(s, Mapping) else s) for s in stages]
    return [(f"{i}-{kind.lower()}", kind, None, {}) for i, kind in enumerate(kinds)]


def _from_log(records: Iterable[Mapping[str, Any]]) -> list[_Named]:
    kinds = list(dict.fromkeys(str(r["stage"]) for r in records if r.get("stage")))
    return [(f"{i}-{kind.lower()}", kind, None, {}) for i, kind in enumerate(kinds)]


def _split_log(
    records: Iterable[Mapping[str, Any]], named: Sequence[_Named]
) -> list[list[Mapping[str, Any]]]:
    """Each stage's log records. A record's `stage` is the stage type (or name); records are
    taken in chain order, so a second stage of the same type gets the records written after
    the first one reached its last step."""
    buckets: list[list[Mapping[str, Any]]] = [[] for _ in named]
    reached = [0] * len(named)
    current = 0
    for record in records:
        label = str(record.get("stage", ""))
        step = number(record.get("step"))
        index = _owner(named, label, current, reached, step)
        if index is None:
            continue
        buckets[index].append(record)
        current = index
        if step is not None:
            reached[index] = max(reached[index], int(step))
    return buckets


def _owner(
    named: Sequence[_Named], label: str, current: int, reached: list[int], step: float | None
) -> int | None:
    matches = [i for i, (name, kind, _, _) in enumerate(named) if label in (name, kind)]
    if not matches:
        return None
    later = [i for i in matches if i >= current]
    if not later:
        return matches[-1]
    first = later[0]
    steps = named[first][2]
    finished = steps is not None and reached[first] >= steps
    restarted = step is not None and step < reached[first]
    if finished and restarted and len(later) > 1:
        return later[1]
    return first


# Series -----------------------------------------------------------------------------------


def series(records: Iterable[Mapping[str, Any]], key: str) -> Series:
    """The (step, value) points of `key`, by step; a step logged twice keeps its last value."""
    points: dict[int, float] = {}
    for record in records:
        step, value = number(record.get("step")), number(record.get(key))
        if step is not None and value is not None:
            points[int(step)] = value
    return sorted(points.items())


def margin_series(records: Iterable[Mapping[str, Any]], prefix: str = "") -> Series:
    """`rewards/margins` (with `prefix`, e.g. `eval_`), or chosen minus rejected rewards at
    steps that log both (KTO logs no margin for batches of one kind of example)."""
    records = list(records)
    chosen = dict(series(records, f"{prefix}rewards/chosen"))
    rejected = dict(series(records, f"{prefix}rewards/rejected"))
    points = {s: chosen[s] - rejected[s] for s in chosen.keys() & rejected.keys()}
    points.update(series(records, f"{prefix}rewards/margins"))
    return sorted(points.items())


def last(points: Series) -> float | None:
    """The value at the last step, if any."""
    return points[-1][1] if points else None


def _metric(stage: Stage, *keys: str) -> float | None:
    return next((v for k in keys if (v := number(stage.metrics.get(k))) is not None), None)


def _final(points: Series, stage: Stage, *keys: str) -> float | None:
    value = last(points)
    return value if value is not None else _metric(stage, *keys)


def reward_series(stage: Stage) -> Series:
    """The RLHF mean reward per step: `score` (PPO) or `reward` (RLOO, GRPO)."""
    return series(stage.log, "score") or series(stage.log, "reward")


def rlhf_algorithm(stage: Stage) -> str | None:
    """`PPO`, `RLOO` or `GRPO` for an RLHF stage: the recorded `algorithm`, else PPO when
    it logged a value loss; None when it cannot be told (RLOO and GRPO log the same keys)."""
    if stage.type != RLHF:
        return None
    recorded = stage.metrics.get("algorithm")
    if isinstance(recorded, str) and recorded:
        return recorded
    if "value_loss" in stage.metrics or series(stage.log, "value_loss"):
        return "PPO"
    return None


# Headlines --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """One headline metric of a stage.

    Attributes:
        key: stable id: `margin`, `accuracy`, `eval_margin`, `eval_accuracy`,
            `train_accuracy`, `train_pairs`, `reward`, `kl`, `value_loss`, `train_loss`,
            `eval_loss`.
        label: the report's wording.
        short: the terminal summary's wording.
        value: the final value.
        before: the value before the stage trained (shown as `before → value`), if any.
        signed: show a sign (margins).
        count: a whole number (training pairs).
    """

    key: str
    label: str
    short: str
    value: float
    before: float | None = None
    signed: bool = False
    count: bool = False

    def html_text(self) -> str:
        """The value as the report writes numbers (`0.6250 → 0.7500`)."""
        if self.count:
            return f"{int(self.value):,}"
        after = format_metric(self.value, self.signed)
        if self.before is None:
            return after
        return f"{format_metric(self.before, self.signed)} → {after}"

    def short_text(self) -> str:
        """The value in a few digits, for the terminal (`0.62 → 0.75`); a change too small
        for two digits gets more (`-0.385 → -0.389`, not `-0.39 → -0.39`)."""
        if self.count:
            return f"{int(self.value):,}"
        if self.before is None:
            return short_number(self.value, self.signed)
        for digits in (2, 3, 4):
            before = short_number(self.before, self.signed, digits)
            after = short_number(self.value, self.signed, digits)
            if before != after:
                break
        return f"{before} → {after}"


def short_number(value: float, signed: bool = False, digits: int = 2) -> str:
    """`digits` decimals; as many significant digits below 0.1 (so a small margin is not
    0.00)."""
    sign = "+" if signed else ""
    if value == 0 or abs(value) >= 0.1:
        return f"{value:{sign},.{digits}f}"
    return f"{value:{sign}.{digits}g}"


def headlines(stage: Stage) -> list[Headline]:
    """The stage's headline metrics that were recorded, in display order."""
    if stage.type in PREFERENCE_TYPES:
        found = _preference(stage)
    elif stage.type == REWARD_MODEL:
        found = _reward_model(stage)
    elif stage.type == RLHF:
        found = _rlhf(stage)
    else:
        found = _sft(stage)
    return [h for h in found if h is not None]


def _headline(key: str, label: str, short: str, value: float | None, **kw: Any) -> Headline | None:
    return Headline(key, label, short, value, **kw) if value is not None else None


def _preference(stage: Stage) -> list[Headline | None]:
    log = stage.log
    eval_margin = last(margin_series(log, "eval_"))
    if eval_margin is None:
        chosen, rejected = (_metric(stage, f"eval_rewards/{k}") for k in ("chosen", "rejected"))
        eval_margin = _metric(stage, "eval_rewards/margins")
        if eval_margin is None and chosen is not None and rejected is not None:
            eval_margin = chosen - rejected
    return [
        _headline(
            "margin",
            "reward margin (training)",
            "margin",
            _final(margin_series(log), stage, "rewards/margins"),
            signed=True,
        ),
        _headline(
            "accuracy",
            "preference accuracy (training)",
            "accuracy",
            _final(series(log, "rewards/accuracies"), stage, "rewards/accuracies"),
        ),
        _headline(
            "eval_margin", "reward margin (validation)", "eval margin", eval_margin, signed=True
        ),
        _headline(
            "eval_accuracy",
            "preference accuracy (validation)",
            "eval accuracy",
            _final(series(log, "eval_rewards/accuracies"), stage, "eval_rewards/accuracies"),
        ),
    ]


def _reward_model(stage: Stage) -> list[Headline | None]:
    after = _metric(stage, "eval_accuracy_after")
    if after is None:
        after = last(series(stage.log, "eval_accuracy"))
    margin = _metric(stage, "eval_margin_after")
    if margin is None:
        margin = last(series(stage.log, "eval_margin"))
    held_out = _headline(
        "accuracy",
        "held-out accuracy",
        "held-out accuracy",
        after,
        before=_metric(stage, "eval_accuracy_before"),
    )
    if held_out is None:  # no held-out pairs or no stage record: the training batches say
        held_out = _headline(
            "train_accuracy",
            "accuracy (training)",
            "training accuracy",
            last(series(stage.log, "accuracy")),
        )
    return [
        held_out,
        _headline(
            "margin",
            "held-out reward margin",
            "margin",
            margin,
            before=_metric(stage, "eval_margin_before"),
            signed=True,
        ),
        _headline(
            "train_pairs",
            "training pairs",
            "training pairs",
            _metric(stage, "train_pairs"),
            count=True,
        ),
    ]


def _rlhf(stage: Stage) -> list[Headline | None]:
    rewards = reward_series(stage)
    initial = _metric(stage, "initial_score", "initial_reward")
    if initial is None and rewards:
        initial = rewards[0][1]
    final = _final(rewards, stage, "score", "reward")
    return [
        _headline("reward", "mean reward", "reward", final, before=initial),
        _headline("kl", "KL to the reference", "KL", _final(series(stage.log, "kl"), stage, "kl")),
        _headline(
            "value_loss",
            "value loss",
            "value loss",
            _final(series(stage.log, "value_loss"), stage, "value_loss"),
        ),
    ]


def _sft(stage: Stage) -> list[Headline | None]:
    train_loss = _metric(stage, "train_loss")
    if train_loss is None:
        train_loss = last(series(stage.log, "train_loss"))
    return [
        _headline("train_loss", "mean training loss", "training loss", train_loss),
        _headline(
            "eval_loss",
            "validation loss",
            "validation loss",
            _final(series(stage.log, "eval_loss"), stage, "eval_loss"),
        ),
    ]


def summary_line(stage: Stage) -> str:
    """`1-dpo: margin +0.19, accuracy 0.75, eval margin +0.19, eval accuracy 1.00`."""
    algorithm = rlhf_algorithm(stage)
    name = f"{stage.name} ({algorithm})" if algorithm else stage.name
    found = headlines(stage)
    if not found:
        return f"{name}: no {stage.type} metrics recorded"
    parts = []
    for headline in found:
        if headline.count:
            parts.append(f"{headline.short_text()} {headline.short}")
        else:
            parts.append(f"{headline.short} {headline.short_text()}")
    return f"{name}: " + ", ".join(parts)


# Plot panels ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One small plot of a stage's figure.

    Attributes:
        title: what it shows.
        train: (step, value) per training step.
        validation: (step, value) of validation runs.
        spread: (step, low, high) around `train` (RLOO/GRPO: mean ± std of the rewards).
        unit: values are shares (0-1 axis).
        zero: draw the zero line (margins, rewards and KL change sign).
        log_scale: the values may span orders of magnitude (value loss).
    """

    title: str
    train: Series
    validation: Series = field(default_factory=list)
    spread: list[tuple[int, float, float]] = field(default_factory=list)
    unit: bool = False
    zero: bool = False
    log_scale: bool = False


def panels(stage: Stage) -> list[Panel]:
    """The panels of the stage's figure that have data (none for SFT)."""
    log = stage.log
    found: list[Panel] = []
    if stage.type in PREFERENCE_TYPES:
        found = [
            Panel("reward margin", margin_series(log), margin_series(log, "eval_"), zero=True),
            Panel(
                "preference accuracy",
                series(log, "rewards/accuracies"),
                series(log, "eval_rewards/accuracies"),
                unit=True,
            ),
            Panel("KL (batch estimate)", series(log, "kl"), series(log, "eval_kl")),
        ]
    elif stage.type == REWARD_MODEL:
        found = [
            Panel(
                "accuracy",
                series(log, "accuracy"),
                _with_ends(stage, series(log, "eval_accuracy"), "eval_accuracy"),
                unit=True,
            ),
            Panel(
                "reward margin",
                series(log, "margin"),
                _with_ends(stage, series(log, "eval_margin"), "eval_margin"),
                zero=True,
            ),
        ]
    elif stage.type == RLHF:
        rewards = reward_series(stage)
        spread = dict(series(log, "reward_std"))
        found = [
            Panel(
                "mean reward",
                rewards,
                spread=[(s, v - spread[s], v + spread[s]) for s, v in rewards if s in spread],
                zero=True,
            ),
            Panel("KL to the reference", series(log, "kl"), zero=True),
            Panel("value loss", series(log, "value_loss"), log_scale=True),
        ]
    return [p for p in found if p.train or p.validation]


def _with_ends(stage: Stage, points: Series, key: str) -> Series:
    """Held-out values before (step 0) and after (the last step) training, where the stage
    recorded them and the log has no validation run at that step."""
    merged = dict(points)
    before, after = _metric(stage, f"{key}_before"), _metric(stage, f"{key}_after")
    if before is not None:
        merged.setdefault(0, before)
    if after is not None and stage.steps is not None:
        merged.setdefault(stage.steps, after)
    return sorted(merged.items())
