"""One figure per alignment stage: its metrics vs optimizer step as small multiples.

DPO, ORPO, SimPO, KTO: reward margin, preference accuracy, KL (KTO); RewardModel:
accuracy and reward margin (held-out values before and after training as validation
points); RLHF: mean reward (± its spread for RLOO/GRPO), KL and the PPO value loss. Panels
without data are left out, and so is a stage with none. Drawn like the other plots
(`plots.py`): the stage's colour of the loss plot for training, orange dashed points for
validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubetune.report.artifacts import RunArtifacts
from kubetune.report.plots import (
    EVAL_COLOR,
    STAGE_COLORS,
    Plot,
    log_scale,
    new_figure,
    plot_of,
    style_axes,
)
from kubetune.report.stages import Panel, Stage, panels, run_stages, shows_stages

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

ZERO_COLOR = "#94a3b8"
LEGEND_ORDER = ("training", "± 1 std", "validation")


def stage_plots(run: RunArtifacts) -> list[Plot]:
    """The figure of each alignment stage that logged its metrics, in chain order."""
    stages = run_stages(run)
    if not shows_stages(stages):
        return []
    return [plot for stage in stages if stage.aligned and (plot := stage_plot(stage))]


def stage_plot(stage: Stage) -> Plot | None:
    """The stage's panels side by side, or None when it logged none of them."""
    found = panels(stage)
    if not found:
        return None
    from matplotlib.ticker import MaxNLocator

    figure, axes = new_figure(8, 2.8, len(found), squeeze=False, sharex=True)
    color = STAGE_COLORS[stage.index % len(STAGE_COLORS)]
    for ax, panel in zip(axes[0], found, strict=True):
        _draw(ax, panel, color)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.set_xlabel("optimizer step", fontsize=9)
    labels: dict[str, Artist] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    order = [label for label in LEGEND_ORDER if label in labels]
    if len(order) > 1:
        figure.legend(
            [labels[label] for label in order],
            order,
            frameon=False,
            fontsize=8,
            loc="outside upper right",
        )
    figure.suptitle(f"Stage {stage.name}: {stage.title}", fontsize=11)
    what = ", ".join(p.title for p in found)
    validation = " and validation" if any(p.validation for p in found) else ""
    return plot_of(
        stage.plot_name,
        f"Stage {stage.name}: {stage.title}",
        f"Line charts of the {stage.title} stage {stage.name} per optimizer step "
        f"(training{validation}): {what}",
        figure,
    )


def _draw(ax: Axes, panel: Panel, color: str) -> None:
    style_axes(ax)
    values: list[float] = []
    if panel.spread:
        xs, lows, highs = zip(*panel.spread, strict=True)
        ax.fill_between(xs, lows, highs, color=color, alpha=0.15, linewidth=0, label="± 1 std")
    if panel.train:
        xs, ys = zip(*panel.train, strict=True)
        ax.plot(xs, ys, color=color, marker=".", label="training")
        values += ys
    if panel.validation:
        xs, ys = zip(*panel.validation, strict=True)
        ax.plot(
            xs,
            ys,
            color=EVAL_COLOR,
            linestyle="--",
            marker="o",
            markersize=5,
            label="validation",
        )
        values += ys
    title = panel.title
    if panel.unit:
        ax.set_ylim(-0.05, 1.05)
    elif panel.log_scale and log_scale(ax, values):
        title += " (log scale)"
    if panel.zero and min(values) <= 0 <= max(values):
        ax.axhline(0, color=ZERO_COLOR, linewidth=0.8)
    ax.set_title(title, fontsize=9)
