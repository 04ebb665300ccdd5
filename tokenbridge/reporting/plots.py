"""The reports' PNG plots: loss curves per step and each metric by model, drawn with matplotlib's Agg backend
without pyplot (no global figure state, safe inside a long-running flow)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from tokenbridge.contracts import EvalMetrics, interval
from tokenbridge.io import atomic_path
from tokenbridge.reporting.document import format_value, is_finite

DPI = 110
# Metric names containing one of these are fractions, plotted on a fixed [0, 1] axis so panels compare.
FRACTIONS = ("exact_match", "accuracy")


def use_log_scale(values: Sequence[float]) -> bool:
    """Log-y only helps when every value is positive and they span more than a factor of ten."""
    finite = [value for value in values if math.isfinite(value)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 10


def _save_png(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)


def _plain_number(value: float, _position: int) -> str:
    """Log-axis labels as 0.5 or 20 rather than matplotlib's 5×10⁻¹, which reads slowly beside a loss."""
    return f"{value:g}"


def _two_and_five(value: float, position: int) -> str:
    """Minor log-axis labels at 2 and 5 times a power of ten only, so spans under one decade still get numbers."""
    leading = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return _plain_number(value, position) if round(leading, 6) in (2, 5) else ""


def plot_losses(steps: Sequence[float], series: Mapping[str, Sequence[float]], total: str, path: Path) -> None:
    """Each loss series (by its label) per step; `total` names the series drawn wide and pale underneath."""
    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    markers = len(steps) <= 40
    for label, values in series.items():
        # The total is drawn wide and pale underneath: with one loss on, it equals that component exactly.
        wide = label == total
        axes.plot(steps, values, label=label, marker="o" if markers else None, markersize=7 if wide else 3.5,
                  linewidth=4 if wide else 1.6, alpha=0.45 if wide else 1.0, zorder=1 if wide else 2)
    if len(steps) == 1:
        axes.set_xlim(steps[0] - 1, steps[0] + 1)
    log = use_log_scale([value for values in series.values() for value in values])
    if log:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        axes.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    if series:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=axes.transAxes, color="#777")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("loss (log scale)" if log else "loss")
    axes.set_title("Distillation losses per step")
    axes.grid(alpha=0.3)
    _save_png(figure, path)


def axis_limits(metric: str, values: Sequence[float]) -> tuple[float, float]:
    """A metric panel's y range: [0, 1.1] for fractions (so panels compare), else the values and their intervals
    with a margin, so near numbers stay apart instead of sitting on top of a bar from zero."""
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if any(marker in metric for marker in FRACTIONS) and 0 <= low and high <= 1:
        return 0.0, 1.1
    pad = (high - low) * 0.2 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def plot_metrics(models: Mapping[str, Mapping], scores: Sequence[str], primary: str | None, path: Path) -> None:
    """One panel per metric (their scales differ), one point per model with its 95 % interval where the scores
    hold one, each titled with its direction. Fractions share a [0, 1] axis; other metrics zoom to their values,
    so near numbers stay apart (points, not bars, since the axis does not start at zero)."""
    names = list(models)
    scores = scores if names else []
    colors = [colormaps["tab10"](index % 10) for index in range(len(names))]
    columns = min(len(scores), 3) or 1
    rows = math.ceil(len(scores) / columns) or 1
    figure = Figure(figsize=(0.6 + columns * max(3.2, 1.0 + 0.8 * len(names)), 1.2 + rows * 3.0), layout="constrained")
    figure.suptitle("Evaluation metrics by model (bars: 95 % intervals)")
    for index, metric in enumerate(scores):
        axes = figure.add_subplot(rows, columns, index + 1)
        spans: list[float] = []
        for position, (name, color) in enumerate(zip(names, colors)):
            value = models[name].get(metric)
            if not is_finite(value):
                continue
            bounds = interval(models[name], metric) or (value, value)
            spans += bounds
            axes.errorbar([position], [value], yerr=[[value - bounds[0]], [bounds[1] - value]], fmt="o", color=color,
                          capsize=4, markersize=6)
            axes.annotate(format_value(value), (position, bounds[1]), xytext=(0, 3), textcoords="offset points",
                          ha="center", va="bottom", fontsize=8)
        axes.set_ylim(*axis_limits(metric, spans))
        axes.set_xlim(-0.5, len(names) - 0.5)
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axes.set_title(f"{metric}{' (primary)' if metric == primary else ''}\n{EvalMetrics.better(metric)} is better",
                       fontsize=9)
        axes.set_xlabel("model", fontsize=8)
        axes.set_ylabel(metric, fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    if scores:
        figure.legend(handles=[Patch(color=color, label=name) for name, color in zip(names, colors)],
                      loc="outside lower center", ncols=min(len(names), 4), fontsize=8)
    else:
        axes = figure.add_subplot()
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no numeric metrics to plot", ha="center", va="center", color="#777")
    _save_png(figure, path)


def plot_learning_curves(curves: Mapping[str, Mapping[int, Mapping]], metric: str, path: Path,
                         title: str | None = None) -> None:
    """`metric` of each arm (arm -> training steps -> its scores) by training budget (or at steps inside one run:
    `title` says which), a line per arm with its 95 % intervals: where the arms separate, and whether they still
    move."""
    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    spans: list[float] = []
    for arm, by_steps in curves.items():
        steps = [step for step in sorted(by_steps) if is_finite(by_steps[step].get(metric))]
        values = [by_steps[step][metric] for step in steps]
        bounds = [interval(by_steps[step], metric) or (value, value) for step, value in zip(steps, values)]
        spans += [bound for pair in bounds for bound in pair]
        axes.errorbar(steps, values, yerr=[[v - b[0] for v, b in zip(values, bounds)],
                                           [b[1] - v for v, b in zip(values, bounds)]],
                      marker="o", capsize=4, label=arm)
    axes.set_ylim(*axis_limits(metric, spans))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("training steps")
    axes.set_ylabel(metric)
    axes.set_title(f"{title or f'{metric} by budget'} ({EvalMetrics.better(metric)} is better)")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    _save_png(figure, path)
