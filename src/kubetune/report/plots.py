"""The report's plots as PNG images: loss and learning rate vs step, the alignment metrics
of each stage (`stage_plots`), base vs tuned metrics, token lengths, and quantized
variants' size and perplexity.

matplotlib is imported only when a plot is drawn, through its object-oriented API
(`matplotlib.figure.Figure` on the Agg canvas): no pyplot, no GUI backend, no global state
changed in the calling process. Without matplotlib the report says how to get the plots.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.report.artifacts import RunArtifacts, TokenLengths
from kubetune.report.views import (
    LOWER_IS_BETTER,
    MetricRow,
    QuantVariant,
    merged_reference,
    metric_rows,
    number,
    quantized_variants,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 150
"""Rendered pixels per inch; images are shown at 96 CSS pixels per inch (sharp on HiDPI)."""

BASE_COLOR = "#94a3b8"
TUNED_COLOR = "#2563eb"
EVAL_COLOR = "#ea580c"
STAGE_COLORS = ("#2563eb", "#16a34a", "#9333ea", "#db2777", "#0891b2")


@dataclass(frozen=True)
class Plot:
    """One rendered plot.

    Attributes:
        name: a file-name stem: `loss`, `learning-rate`, `stage-<stage name>` (e.g.
            `stage-1-dpo`), `metrics`, `token-lengths` or `quantized`.
        title: the heading shown above it.
        alt: the text alternative (what it shows).
        png: the PNG bytes.
        width: display width in CSS pixels.
    """

    name: str
    title: str
    alt: str
    png: bytes
    width: int


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn (matplotlib not installed), or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "plots need matplotlib: pip install 'kubetune[trainer]' (or matplotlib>=3.8)"
    return None


def build_plots(run: RunArtifacts) -> list[Plot]:
    """Every plot the run has data for, in report order (none without matplotlib)."""
    if matplotlib_missing():
        return []
    # Imported here: stage plots draw with this module's helpers.
    from kubetune.report.stage_plots import stage_plots

    plots = [plot for build in (loss_plot, learning_rate_plot) if (plot := build(run))]
    plots += stage_plots(run)
    builders = (metrics_plot, token_plot, quantized_plot)
    return plots + [plot for build in builders if (plot := build(run)) is not None]


def new_figure(width: float, height: float, columns: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure of `width` x `height` inches with one row of `columns` axes (keyword
    arguments go to `Figure.subplots`)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, columns, **kwargs)
    return figure, axes


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry: the same data gives the same bytes.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def plot_of(name: str, title: str, alt: str, figure: Figure) -> Plot:
    """The figure rendered as a `Plot`, shown at its size."""
    width = int(figure.get_figwidth() * 96)
    return Plot(name=name, title=title, alt=alt, png=_png(figure), width=width)


def style_axes(axes: Axes) -> None:
    """The report's look: a light grid behind the data, no top and right spines."""
    axes.grid(True, color="#e2e8f0", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def log_scale(axes: Axes, values: Sequence[float]) -> bool:
    """Put the y axis on a log scale, with plain tick labels, when the values are all
    positive and span more than a factor of 20 (a loss that falls fast); returns whether it
    did."""
    positive = [v for v in values if v > 0]
    if not positive or len(positive) != len(values) or max(positive) / min(positive) <= 20:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator

    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.tick_params(axis="y", which="both", labelsize=8)
    return True


# Training log -------------------------------------------------------------------------


def log_series(
    records: Iterable[Mapping[str, Any]], key: str
) -> dict[str, list[tuple[int, float]]]:
    """Per stage (in order of appearance), the (step, value) points of `key`; a step logged
    twice (a resumed run) keeps its last value."""
    points: dict[str, dict[int, float]] = {}
    for record in records:
        step, value = number(record.get("step")), number(record.get(key))
        if step is None or value is None:
            continue
        points.setdefault(str(record.get("stage", "")), {})[int(step)] = value
    return {stage: sorted(steps.items()) for stage, steps in points.items()}


def stage_offsets(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Step offsets that lay stages out one after another when each restarts at step 1."""
    steps: dict[str, list[int]] = {}
    for record in records:
        step = number(record.get("step"))
        if step is not None:
            steps.setdefault(str(record.get("stage", "")), []).append(int(step))
    offsets: dict[str, int] = {}
    end = 0
    for index, (stage, values) in enumerate(steps.items()):
        offsets[stage] = end if index and min(values) <= end else 0
        end = offsets[stage] + max(values)
    return offsets


def _mark_stages(axes: Axes, offsets: Mapping[str, int]) -> None:
    if len(offsets) < 2:
        return
    # A stage starts high (its first loss) and the one before it ends low: the first label
    # goes at the bottom, later ones at the top, next to the line that starts them.
    for index, (stage, offset) in enumerate(offsets.items()):
        if offset:
            axes.axvline(offset, color="#64748b", linestyle=":", linewidth=1)
        axes.annotate(
            stage or "stage",
            xy=(offset, 1 if index else 0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3 if index else 3),
            textcoords="offset points",
            va="top" if index else "bottom",
            fontsize=8,
            color="#475569",
        )


def loss_plot(run: RunArtifacts) -> Plot | None:
    """Training loss and validation loss (`eval_loss`) vs step, one colour per stage."""
    train = log_series(run.train_log, "loss")
    validation = log_series(run.train_log, "eval_loss")
    if not train and not validation:
        return None
    offsets = stage_offsets(run.train_log)
    figure, axes = new_figure(8, 3.6)
    style_axes(axes)
    values: list[float] = []
    several = len(offsets) > 1
    for index, stage in enumerate(offsets):
        color = STAGE_COLORS[index % len(STAGE_COLORS)]
        suffix = f" ({stage})" if several and stage else ""
        shift = offsets[stage]
        if stage in train:
            xs, ys = zip(*train[stage], strict=True)
            axes.plot([x + shift for x in xs], ys, color=color, label="training loss" + suffix)
            values += ys
        if stage in validation:
            xs, ys = zip(*validation[stage], strict=True)
            axes.plot(
                [x + shift for x in xs],
                ys,
                color=EVAL_COLOR if not several else color,
                linestyle="--",
                marker="o",
                markersize=5,
                label="validation loss" + suffix,
            )
            values += ys
    axes.set_ylabel("loss (log scale)" if log_scale(axes, values) else "loss")
    axes.set_xlabel("optimizer step" + (" (stages one after another)" if several else ""))
    axes.set_title("Training and validation loss")
    _mark_stages(axes, offsets)
    axes.legend(frameon=False)
    return plot_of(
        "loss",
        "Training and validation loss",
        "Line chart of training loss and validation loss (eval_loss) per optimizer step",
        figure,
    )


def learning_rate_plot(run: RunArtifacts) -> Plot | None:
    """The learning rate vs step; one panel per stage (stages' rates can differ by orders
    of magnitude, e.g. SFT then DPO)."""
    series = log_series(run.train_log, "learning_rate")
    if not series:
        return None
    figure, axes = new_figure(8, 2.8, len(series), squeeze=False)
    for index, (ax, (stage, points)) in enumerate(zip(axes[0], series.items(), strict=True)):
        style_axes(ax)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=STAGE_COLORS[index % len(STAGE_COLORS)], marker=".")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_xlabel("optimizer step" + (f" of {stage}" if len(series) > 1 and stage else ""))
        if len(series) > 1:
            ax.set_title(stage or "stage", fontsize=9)
    axes[0][0].set_ylabel("learning rate")
    figure.suptitle("Learning rate schedule", fontsize=11)
    return plot_of(
        "learning-rate",
        "Learning rate",
        "Line chart of the learning rate per optimizer step"
        + (", one panel per stage" if len(series) > 1 else ""),
        figure,
    )


# Metrics --------------------------------------------------------------------------------


def metric_panels(rows: Sequence[MetricRow]) -> list[tuple[str, list[MetricRow]]]:
    """Rows grouped by scale: 0-1 scores, loss and perplexity, and the rest (e.g. the
    judge's 1-10 score), so no bar is squashed by another metric's scale."""
    scores, losses, other = [], [], []
    for row in rows:
        if row.tuned is None and row.base is None:
            continue
        values = [v for v in (row.base, row.tuned) if v is not None]
        if row.name in LOWER_IS_BETTER:
            losses.append(row)
        elif all(0 <= v <= 1 for v in values):
            scores.append(row)
        else:
            other.append(row)
    panels = [
        ("scores, 0-1\n(higher is better)", scores),
        ("loss, perplexity\n(lower is better)", losses),
        ("other\n(higher is better)", other),
    ]
    return [(title, group) for title, group in panels if group]


def metrics_plot(run: RunArtifacts) -> Plot | None:
    """Grouped bars of base and tuned for each metric, one panel per scale."""
    panels = metric_panels(metric_rows(run.metrics))
    if not panels:
        return None
    widths = [max(len(rows), 2) for _, rows in panels]
    figure, axes = new_figure(
        min(11.0, max(6.0, 0.8 * sum(widths) + 1.5)),
        3.8,
        len(panels),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    has_base = any(r.base is not None for _, rows in panels for r in rows)
    crowded = {"fontsize": 6.5, "rotation": 90} if sum(widths) > 8 else {"fontsize": 7}
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        style_axes(ax)
        ax.grid(axis="x", visible=False)
        positions = list(range(len(rows)))
        width = 0.38 if has_base else 0.6
        if has_base:
            base = [r.base if r.base is not None else 0.0 for r in rows]
            bars = ax.bar(
                [p - width / 2 for p in positions], base, width, color=BASE_COLOR, label="base"
            )
            ax.bar_label(bars, labels=[_short(r.base) for r in rows], padding=1, **crowded)
        tuned = [r.tuned if r.tuned is not None else 0.0 for r in rows]
        offset = width / 2 if has_base else 0.0
        bars = ax.bar(
            [p + offset for p in positions], tuned, width, color=TUNED_COLOR, label="tuned"
        )
        ax.bar_label(bars, labels=[_short(r.tuned) for r in rows], padding=1, **crowded)
        ax.set_xticks(
            positions,
            [r.name for r in rows],
            rotation=30 if len(rows) > 4 else 0,
            ha="right" if len(rows) > 4 else "center",
            fontsize=8,
        )
        ax.set_title(title, fontsize=8.5)
        ax.margins(y=0.22 if "rotation" in crowded else 0.15)
        if title.startswith("scores"):
            ax.set_ylim(0, 1.2 if "rotation" in crowded else 1.12)
    axes[0][0].set_ylabel("value")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, frameon=False, fontsize=8, loc="outside upper right")
    figure.suptitle("Base vs tuned model", fontsize=11)
    return plot_of(
        "metrics",
        "Base vs tuned",
        "Grouped bar chart of each evaluation metric for the base and the tuned model",
        figure,
    )


def _short(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) >= 100 else f"{value:.3f}"


# Data -----------------------------------------------------------------------------------


def histogram_bins(values: Sequence[int], most: int = 60) -> list[float]:
    """Bin edges of whole-token width (or wider, for at most `most` bins) centred on the
    integer lengths."""
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / most))
    return [low - 0.5 + i * width for i in range((high - low) // width + 2)]


def token_plot(run: RunArtifacts) -> Plot | None:
    """Histograms of tokens per example (train and validation, as a share of each split),
    or, without the rows, the percentiles of `data/report.json`."""
    if run.token_lengths:
        return _token_histogram(run.token_lengths, _max_seq_length(run))
    tokens = (run.data_report or {}).get("tokens")
    if isinstance(tokens, Mapping) and tokens:
        return _token_percentiles(tokens)
    return None


def _max_seq_length(run: RunArtifacts) -> int | None:
    value = number((run.data_report or {}).get("maxSeqLength"))
    return int(value) if value else None


def _token_histogram(lengths: Mapping[str, TokenLengths], limit: int | None) -> Plot:
    figure, axes = new_figure(8, 3.4)
    style_axes(axes)
    everything = [v for split in lengths.values() for v in split.values]
    bins = histogram_bins(everything)
    colors = {"train": TUNED_COLOR, "validation": EVAL_COLOR}
    for split, found in lengths.items():
        values = found.values
        ordered = sorted(values)
        median = ordered[len(ordered) // 2]
        first = "" if found.complete else f"first {len(values):,} rows, "
        color = colors.get(split, "#475569")
        filled = split == "train"
        axes.hist(
            values,
            bins=bins,
            weights=[100 / len(values)] * len(values),
            histtype="stepfilled" if filled else "step",
            alpha=0.35 if filled else 1.0,
            color=color,
            linewidth=0 if filled else 1.8,
            label=f"{split} ({first}{len(values):,} examples, median {median})",
        )
    if limit and max(everything) >= 0.6 * limit:
        axes.axvline(limit, color="#dc2626", linestyle="--", linewidth=1)
        axes.annotate(
            f"maxSeqLength {limit}",
            xy=(limit, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-3, -3),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8,
            color="#dc2626",
        )
    axes.set_xlabel("tokens per example (chat template applied)")
    axes.set_ylabel("share of examples (%)")
    axes.set_title("Token lengths")
    axes.legend(frameon=False, fontsize=8)
    return plot_of(
        "token-lengths",
        "Token lengths",
        "Histogram of tokens per example in the training and validation sets",
        figure,
    )


def _token_percentiles(tokens: Mapping[str, Any]) -> Plot | None:
    marks = (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    figure, axes = new_figure(8, 3.2)
    style_axes(axes)
    drawn = False
    for split, stats in tokens.items():
        if not isinstance(stats, Mapping):
            continue
        points = [(q, v) for key, q in marks if (v := number(stats.get(key))) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", label=str(split))
            drawn = True
    if not drawn:
        return None
    axes.set_xticks([q for _, q in marks], [k for k, _ in marks])
    axes.set_xlabel("percentile of examples")
    axes.set_ylabel("tokens per example")
    axes.set_title("Token lengths (percentiles from data/report.json)")
    axes.legend(frameon=False, fontsize=8)
    return plot_of(
        "token-lengths",
        "Token lengths",
        "Token-length percentiles (min, p50, p90, p99, max) of the training and validation sets",
        figure,
    )


# Quantized variants ---------------------------------------------------------------------


def quantized_plot(run: RunArtifacts) -> Plot | None:
    """Size and perplexity of each produced variant next to the merged model."""
    variants = [v for v in quantized_variants(run) if v.skipped is None]
    if not variants:
        return None
    reference = merged_reference(run)
    shown: list[QuantVariant] = ([reference] if reference else []) + variants
    figure, (left, right) = new_figure(8, 3.4, 2)
    names = [v.scheme for v in shown]
    colors = [BASE_COLOR if v.scheme == "merged" else TUNED_COLOR for v in shown]
    sizes = [v.size_bytes for v in shown]
    largest = max((s for s in sizes if s), default=0)
    unit, scale = ("GB", 1e9) if largest >= 1e9 else ("MB", 1e6)
    style_axes(left)
    left.grid(axis="x", visible=False)
    bars = left.bar(names, [(s or 0) / scale for s in sizes], color=colors)
    left.bar_label(bars, labels=[f"{s / scale:.1f}" if s else "n/a" for s in sizes], fontsize=8)
    left.set_ylabel(f"size on disk ({unit})")
    left.set_title("Size", fontsize=9)
    left.margins(y=0.15)
    style_axes(right)
    right.grid(axis="x", visible=False)
    perplexities = [v.perplexity for v in shown]
    bars = right.bar(names, [p or 0 for p in perplexities], color=colors)
    labels = [
        "n/a"
        if v.perplexity is None
        else f"{v.perplexity:.3g}"
        + (
            ""
            if v.scheme == "merged" or v.perplexity_delta is None
            else f"\n({v.perplexity_delta:+.3g})"
        )
        for v in shown
    ]
    right.bar_label(bars, labels=labels, fontsize=8)
    right.set_ylabel("perplexity (lower is better)")
    right.set_title("Perplexity on the validation set", fontsize=9)
    right.margins(y=0.25)
    figure.suptitle("Quantized variants vs the merged model", fontsize=11)
    return plot_of(
        "quantized",
        "Quantized variants",
        "Bar charts of the size and the perplexity of each quantized variant and of the "
        "merged model",
        figure,
    )
