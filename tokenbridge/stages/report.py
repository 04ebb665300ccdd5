"""The evaluation report: Markdown for Git diffs, one standalone HTML file for MLflow, and PNG plots.

Pure Python on purpose (no MLflow, no Prefect): the `report` flow decides where files go and what gets
logged; this module only turns the evaluate stage's metrics, the distill stage's history CSV and a few
facts about the run into files. Every sentence is generated from the numbers and says no more than they do.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from tokenbridge.io import atomic_path, write_text

MISSING = "–"
PRIMARY_MARK = "★"
PRIMARY_CLASS = ' class="primary"'
DPI = 110
TOTAL_LOSS = "loss"  # the history's total; each term has a `<name>_loss` column (alm_loss, sft_loss, ...)
# Metric names containing one of these are better when smaller; every other metric is better when larger.
LOWER_IS_BETTER = ("bits_per_byte", "loss", "perplexity")
# Metric names containing one of these are fractions, plotted on a fixed [0, 1] axis so panels compare.
FRACTIONS = ("exact_match", "accuracy")
# The evaluate stage's model names, which the summary sentence knows how to compare.
AFTER, BEFORE, TEACHER = "student_after", "student_before", "teacher"
# Context entries with a section of their own instead of a row in the run's key/value table.
SECTIONS = {"registry": "Model Registry", "params": "Parameters"}
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.5; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.numbers td { text-align: right; font-variant-numeric: tabular-nums; }
table.numbers td:first-child { text-align: left; }
.primary { background: #fff4cc; }
th.primary { background: #ffe799; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9rem; }
"""


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclass(frozen=True)
class _Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    numbers: bool = False  # right-align every column but the first
    marked_column: int | None = None


@dataclass(frozen=True)
class _Image:
    name: str  # the plot's file stem under plots/
    caption: str


_Block = _Heading | _Paragraph | _Table | _Image


def render_report(eval_metrics: dict, history_csv: Path, context: dict, out_dir: Path) -> dict[str, Path]:
    """Writes out_dir/report.md, out_dir/report.html and out_dir/plots/*.png.

    Returns {"markdown": ..., "html": ..., plus one key per plot (its file stem)}. Other files already in
    out_dir (such as the flow's registry.json) are left alone.
    """
    out_dir = Path(out_dir)
    models: dict[str, dict] = eval_metrics["models"]
    primary: str | None = eval_metrics.get("primary_metric")
    metrics = _metric_names(models, primary)
    scores = [name for name in metrics if name == primary or _is_score(models, name)]
    history = _read_history(Path(history_csv))

    plots = {"loss_curves": out_dir / "plots" / "loss_curves.png",
             "metrics_by_model": out_dir / "plots" / "metrics_by_model.png"}
    _plot_losses(history, plots["loss_curves"])
    _plot_metrics(models, scores, primary, plots["metrics_by_model"])

    blocks = _document(models, metrics, scores, primary, history, context)
    title = _title(context)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_text(paths["markdown"], _markdown(title, blocks))
    write_text(paths["html"], _html(title, blocks, {name: path.read_bytes() for name, path in plots.items()}))
    return {**paths, **plots}


COMPARED = ("bits_per_byte", "gsm_exact_match", "gsm_exact_match_flexible")


def render_comparison(methods: Mapping[str, Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]],
                      context: Mapping[str, Any], out_dir: Path, stem: str = "comparison") -> dict[str, Path]:
    """Distillation methods side by side: out_dir/<stem>.md, .html and plots/<stem>.png.

    `methods` maps a loss name to the distilled student's scores plus its distill summary (`final_loss`,
    `median_seconds_per_step`); `references` holds the teacher's and the untrained student's scores.
    """
    out_dir = Path(out_dir)
    models = {**references, **methods}
    metrics = [name for name in COMPARED if any(name in scores for scores in models.values())]
    header = ["model", *metrics, "gsm_n", "final loss", "s / step"]
    rows = [[name, *(format_value(scores.get(metric)) for metric in metrics), format_value(scores.get("gsm_n")),
             format_value(scores.get("final_loss")), format_value(scores.get("median_seconds_per_step"))]
            for name, scores in models.items()]
    best = {metric: _best(methods, metric) for metric in metrics}
    sentence = " ".join(f"Best {metric}: {', '.join(names)} ({format_value(methods[names[0]][metric])})."
                        for metric, names in best.items() if names)
    plot = out_dir / "plots" / f"{stem}.png"
    _plot_metrics(models, metrics, None, plot)
    blocks: list[_Block] = [
        _Paragraph(f"{len(methods)} distillation methods, each trained with the same data, steps and seed, then "
                   "evaluated on the same held-out questions. " + sentence),
        _Table(header, rows, numbers=True),
        _Paragraph("bits_per_byte: lower is better; gsm_exact_match: higher is better (n questions). "
                   "final loss values are not comparable across methods: each method has its own loss."),
        _Image(stem, "Each metric by method; teacher and untrained student for reference."),
        _Heading("Run"), _key_values(context, ["fact", "value"]),
    ]
    title = "tokenbridge: distillation methods compared"
    paths = {"markdown": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    write_text(paths["markdown"], _markdown(title, blocks))
    write_text(paths["html"], _html(title, blocks, {stem: plot.read_bytes()}))
    return {**paths, "plot": plot}


def render_transfer(scores: Mapping[str, Mapping[str, Any]], training: Mapping[str, Mapping[str, Any]],
                    sources: Sequence[str], members: Sequence[str], ensemble: Mapping[str, Any], out_dir: Path,
                    stem: str = "transfer") -> dict[str, Path]:
    """Tokenizer transfer and ensembling side by side: out_dir/<stem>.md, .html and plots/<stem>.png.

    `scores` maps `<source>.original|fvt|transferred`, `ensemble` and role members (`student`, `teacher`) to
    the evaluate stage's scores; `training` is the transfer stage's summary per source.
    """
    out_dir = Path(out_dir)
    metrics = [name for name in COMPARED if any(name in values for values in scores.values())]
    header = ["model", *metrics, "gsm_n"]

    def row(label: str) -> list[str]:
        values = scores.get(label, {})
        return [label, *(format_value(values.get(metric)) for metric in metrics), format_value(values.get("gsm_n"))]

    blocks: list[_Block] = [_Paragraph(
        "Each source model moved onto the target tokenizer: as it was (original, its own tokenizer), after FVT "
        "initialisation alone, and after FVT then ALM self-distillation; then the ensemble next to each of its "
        "members. All on the same held-out questions and answers.")]
    for source in sources:
        summary = training.get(source, {})
        blocks += [_Heading(f"Transfer: {source}"),
                   _Table(header, [row(f"{source}.{variant}") for variant in ("original", "fvt", "transferred")], numbers=True),
                   _Paragraph(f"FVT initialised {_counts(summary.get('fvt', {}))} target tokens; ALM self-distillation ran "
                              f"{format_value(summary.get('steps'))} steps on {format_value(summary.get('examples'))} "
                              f"examples (loss {format_value(summary.get('first_loss'))} -> {format_value(summary.get('final_loss'))}, "
                              f"{format_value(summary.get('median_seconds_per_step'))} s a step).")]
    labels = [member if member in scores else f"{member}.transferred" for member in members]
    blocks += [_Heading("Ensemble"), _Table(header, [row("ensemble"), *(row(label) for label in labels)], numbers=True),
               _Paragraph(f"{ensemble.get('name', 'ensemble')}: next-token probabilities averaged with weights "
                          f"{_counts(ensemble.get('weights', {}))}."),
               _Paragraph("bits_per_byte: lower is better; gsm_exact_match: higher is better (n questions). "
                          f"{MISSING}: not measured; the transfer models and the ensemble get GSM questions only with "
                          "evaluate.transfer_limit > 0 (docs/evaluation.md)."),
               _Image(stem, "Each metric by model.")]
    plot = out_dir / "plots" / f"{stem}.png"
    _plot_metrics({label: dict(values) for label, values in scores.items()}, metrics, None, plot)
    title = "tokenbridge: tokenizer transfer and ensembling"
    paths = {"markdown": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    write_text(paths["markdown"], _markdown(title, blocks))
    write_text(paths["html"], _html(title, blocks, {stem: plot.read_bytes()}))
    return {**paths, "plot": plot}


def _counts(values: Mapping[str, Any]) -> str:
    """{'exact': 46145, 'fvt': 3004} -> '46,145 exact, 3,004 fvt'; {'student': 0.5} -> 'student 0.50'."""
    return ", ".join(f"{value:,} {name}" if isinstance(value, int) else f"{name} {value:.2f}" for name, value in values.items())


def _best(methods: Mapping[str, Mapping[str, Any]], metric: str) -> list[str]:
    values = {name: scores[metric] for name, scores in methods.items() if _is_finite(scores.get(metric))}
    if not values:
        return []
    target = (min if lower_is_better(metric) else max)(values.values())
    return [name for name, value in values.items() if value == target]


def format_value(value: Any) -> str:
    """The one way every value is written in the report, so tables, sentences and tests agree."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e5:
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


def lower_is_better(metric: str) -> bool:
    return any(marker in metric for marker in LOWER_IS_BETTER)


def use_log_scale(values: Sequence[float]) -> bool:
    """Log-y only helps when every value is positive and they span more than a factor of ten."""
    finite = [value for value in values if math.isfinite(value)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 10


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number a sentence can compare: NaN or infinity is shown in the table but never called up or down."""
    return _is_number(value) and math.isfinite(value)


def _is_score(models: Mapping[str, Mapping], metric: str) -> bool:
    """A plottable score: numeric everywhere it is present, and not all integers (those are counts like gsm_n)."""
    present = [scores[metric] for scores in models.values() if scores.get(metric) is not None]
    return bool(present) and all(map(_is_number, present)) and not all(isinstance(v, int) for v in present)


def _metric_names(models: Mapping[str, Mapping], primary: str | None) -> list[str]:
    """Every metric any model has, in first-seen order; the primary metric shows even if no model has it."""
    names = dict.fromkeys(name for scores in models.values() for name in scores)
    if primary and primary not in names:
        names[primary] = None
    return list(names)


def _sample_size(scores: Mapping[str, Any], metric: str) -> Any:
    """The question count beside a benchmark metric: `gsm_n` for `gsm_exact_match` and its variants."""
    return scores.get(f"{metric.split('_', 1)[0]}_n")


def _comparison(metric: str, after: Mapping, before: Mapping | None, teacher: Mapping | None) -> str:
    value = after.get(metric)
    if not _is_finite(value):
        return f"The distilled student has no {metric} score."
    notes = ["lower is better" if lower_is_better(metric) else "higher is better"]
    if _is_number(_sample_size(after, metric)):
        notes.append(f"n = {format_value(_sample_size(after, metric))}")
    sentence = f"The distilled student's {metric} is {format_value(value)} ({', '.join(notes)})"
    earlier = before.get(metric) if before else None
    if _is_finite(earlier):
        if format_value(value) == format_value(earlier):
            sentence += f", the same as before distillation ({format_value(earlier)})"
        else:
            change = value - earlier
            better = (change < 0) == lower_is_better(metric)
            sign = "+" if change > 0 else ""
            sentence += (f", {'up' if change > 0 else 'down'} from {format_value(earlier)} before distillation "
                         f"({sign}{format_value(change)}, {'an improvement' if better else 'a regression'})")
    reference = teacher.get(metric) if teacher else None
    if _is_finite(reference):
        sentence += f"; the teacher's is {format_value(reference)}"
    return sentence + "."


def _summary(models: Mapping[str, Mapping], scores: Sequence[str], primary: str | None) -> str:
    """One paragraph on the primary metric and bits-per-byte: the student after vs before vs the teacher."""
    if not models:
        return "The metrics file lists no models."
    focus = [name for name in dict.fromkeys([primary, "bits_per_byte"]) if name in scores] or list(scores[:1])
    if not focus:
        return "The metrics file has no numeric scores."
    if AFTER not in models:
        return " ".join(f"{metric}: " + "; ".join(f"{name} {format_value(values.get(metric))}"
                                                  for name, values in models.items()) + "." for metric in focus)
    return " ".join(_comparison(metric, models[AFTER], models.get(BEFORE), models.get(TEACHER)) for metric in focus)


def _read_history(path: Path) -> dict[str, list[float]]:
    """Columns of the distill history as floats; an empty cell (a loss that was off) becomes NaN."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = rows[0].keys() if rows else ("step", TOTAL_LOSS, "seconds")
    return {column: [float(row[column]) if row.get(column) not in (None, "") else math.nan for row in rows]
            for column in columns}


def _logged(history: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """The loss series (total, then each term) with at least one number (a term is empty while its weight is 0)."""
    names = [name for name in history if name == TOTAL_LOSS or name.endswith("_loss")]
    return {name: history[name] for name in names if any(math.isfinite(v) for v in history[name])}


def _loss_label(name: str) -> str:
    return "loss (total)" if name == TOTAL_LOSS else name


def _training(history: Mapping[str, list[float]]) -> list[_Block]:
    steps = history["step"]
    if not steps:
        return [_Paragraph("The distill history lists no steps.")]
    seconds = [value for value in history["seconds"] if math.isfinite(value)]
    text = f"The distill history lists {len(steps)} step{'s' if len(steps) != 1 else ''}"
    text += f" (step {format_value(int(steps[0]))} to {format_value(int(steps[-1]))})" if len(steps) > 1 else ""
    if seconds:
        text += (f"; step time totals {format_value(math.fsum(seconds))} s "
                 f"(median {format_value(statistics.median(seconds))} s per step)")
    rows = []
    for name, values in _logged(history).items():
        finite = [value for value in values if math.isfinite(value)]
        rows.append([_loss_label(name), format_value(finite[0]), format_value(finite[-1]), format_value(min(finite))])
    return [_Paragraph(text + "."), _Table(["series", "first", "last", "min"], rows, numbers=True)]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys (`alm.temperature`), so a table of any depth stays two columns wide."""
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _key_values(data: Mapping[str, Any], header: Sequence[str]) -> _Table:
    return _Table(header, [[key, format_value(value)] for key, value in _flatten(data)])


def _title(context: Mapping[str, Any]) -> str:
    if context.get("teacher") and context.get("student"):
        return f"tokenbridge report: {context['teacher']} → {context['student']}"
    return "tokenbridge report"


def _document(models: Mapping[str, Mapping], metrics: Sequence[str], scores: Sequence[str], primary: str | None,
              history: Mapping[str, list[float]], context: Mapping[str, Any]) -> list[_Block]:
    """The report's content once, as blocks that both the Markdown and the HTML writer render."""
    marked = metrics.index(primary) + 1 if primary in metrics else None
    header = ["model", *(f"{name} {PRIMARY_MARK}" if name == primary else name for name in metrics)]
    rows = [[name, *(format_value(values.get(metric)) for metric in metrics)] for name, values in models.items()]
    notes = []
    if marked:
        notes.append(f"{PRIMARY_MARK} marks the primary metric ({primary}).")
    if any(MISSING in row[1:] for row in rows):
        notes.append(f"{MISSING} marks a metric not measured for that model.")
    blocks: list[_Block] = [_Paragraph(_summary(models, scores, primary)),
                            _Heading("Metrics"), _Table(header, rows, numbers=True, marked_column=marked)]
    if notes:
        blocks.append(_Paragraph(" ".join(notes)))
    blocks += [_Image("metrics_by_model", "Each metric by model; one panel per metric, since their scales differ."),
               _Heading("Training"), *_training(history), _Image("loss_curves", "Distillation losses per step.")]
    facts = {key: value for key, value in context.items() if not (key in SECTIONS and isinstance(value, Mapping))}
    if facts:
        blocks += [_Heading("Run"), _key_values(facts, ["fact", "value"])]
    for key, heading in SECTIONS.items():
        if isinstance(context.get(key), Mapping):
            first = "key" if key == "registry" else "parameter"
            blocks += [_Heading(heading), _key_values(context[key], [first, "value"])]
    return blocks


def _markdown_text(text: str) -> str:
    """Neutralise only a `<` that could open an HTML tag, so `0.1 <= 0.2` stays readable in a diff."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _markdown_cell(text: str) -> str:
    return _markdown_text(text).replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, blocks: Sequence[_Block]) -> str:
    lines = [f"# {_markdown_text(title)}", ""]
    for block in blocks:
        match block:
            case _Heading(text, level):
                lines += [f"{'#' * level} {_markdown_text(text)}", ""]
            case _Paragraph(text):
                lines += [_markdown_text(text), ""]
            case _Table(header, rows, numbers):
                align = ["---", *(["---:" if numbers else "---"] * (len(header) - 1))]
                lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in [header, align, *rows]] + [""]
            case _Image(name, caption):
                lines += [f"![{_markdown_text(caption)}](plots/{name}.png)", ""]
    return "\n".join(lines)


def _html_table(table: _Table) -> str:
    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f"<{tag}{PRIMARY_CLASS if index == table.marked_column else ''}>{html.escape(text)}</{tag}>"
                       for index, text in enumerate(row))

    classes = ' class="numbers"' if table.numbers else ""
    body = "\n".join(f"<tr>{cells('td', row)}</tr>" for row in table.rows)
    return f"<table{classes}>\n<thead><tr>{cells('th', table.header)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _html(title: str, blocks: Sequence[_Block], images: Mapping[str, bytes]) -> str:
    """A single self-contained file: inline CSS, plots as data URIs, no scripts, nothing fetched."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        match block:
            case _Heading(text, level):
                parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case _Paragraph(text):
                parts.append(f"<p>{html.escape(text)}</p>")
            case _Table():
                parts.append(_html_table(block))
            case _Image(name, caption):
                data = base64.b64encode(images[name]).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _save_png(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # Agg without pyplot: no global figure state, safe inside a long-running flow
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)


def _plain_number(value: float, _position: int) -> str:
    """Log-axis labels as 0.5 or 20 rather than matplotlib's 5×10⁻¹, which reads slowly beside a loss."""
    return f"{value:g}"


def _two_and_five(value: float, position: int) -> str:
    """Minor log-axis labels at 2 and 5 times a power of ten only, so spans under one decade still get numbers."""
    leading = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return _plain_number(value, position) if round(leading, 6) in (2, 5) else ""


def _plot_losses(history: Mapping[str, list[float]], path: Path) -> None:
    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    series = _logged(history)
    markers = len(history["step"]) <= 40
    for name, values in series.items():
        # The total is drawn wide and pale underneath: with one loss on, it equals that component exactly.
        total = name == "loss"
        axes.plot(history["step"], values, label=_loss_label(name), marker="o" if markers else None,
                  markersize=7 if total else 3.5, linewidth=4 if total else 1.6, alpha=0.45 if total else 1.0,
                  zorder=1 if total else 2)
    if len(history["step"]) == 1:
        axes.set_xlim(history["step"][0] - 1, history["step"][0] + 1)
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


def _plot_metrics(models: Mapping[str, Mapping], scores: Sequence[str], primary: str | None, path: Path) -> None:
    names = list(models)
    scores = scores if names else []
    colors = [colormaps["tab10"](index % 10) for index in range(len(names))]
    columns = min(len(scores), 3) or 1
    rows = math.ceil(len(scores) / columns) or 1
    figure = Figure(figsize=(0.6 + columns * max(3.2, 1.0 + 0.8 * len(names)), 1.2 + rows * 3.0), layout="constrained")
    figure.suptitle("Evaluation metrics by model")
    for index, metric in enumerate(scores):
        axes = figure.add_subplot(rows, columns, index + 1)
        values = [models[name].get(metric) for name in names]
        heights = [value if _is_finite(value) else 0.0 for value in values]
        bars = axes.bar(range(len(names)), heights, color=colors)
        for bar, value in zip(bars, values):
            axes.annotate(format_value(value if _is_number(value) else None),
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        low, high = min([0.0, *heights]), max([0.0, *heights])
        if any(marker in metric for marker in FRACTIONS) and 0 <= low and high <= 1:
            axes.set_ylim(0, 1.1)
        else:
            axes.set_ylim(low * 1.15, (high or 1.0) * 1.15)
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        direction = "lower is better" if lower_is_better(metric) else "higher is better"
        axes.set_title(f"{metric}{' (primary)' if metric == primary else ''}\n{direction}", fontsize=9)
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
