"""Stage `report`: the evaluation report (metrics table, summary sentence, loss curves, metrics by model) and the
tokenizer-transfer and ensemble report, each as Markdown for Git diffs, one standalone HTML file for MLflow,
and PNG plots (`tokenbridge.reporting` renders them).

Pure Python on purpose (no MLflow, no Prefect): the `report` flow decides where files go and what gets
logged; this module only turns the evaluate stage's metrics, the distill stage's history CSV and a few
facts about the run into files. Every sentence is generated from the numbers and says no more than they do.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenbridge.contracts import HELDOUT, SCORE_AND_INTERVAL, UNCERTAINTY_SUFFIXES, EvalMetrics, TaskScore, interval
from tokenbridge.reporting.comparison import COMPARED
from tokenbridge.reporting.document import (
    MISSING,
    Block,
    Heading,
    Image,
    Paragraph,
    Table,
    format_value,
    inside_the_noise,
    is_finite,
    is_number,
    key_values,
    with_interval,
)
from tokenbridge.reporting.plots import plot_learning_curves, plot_losses, plot_metrics
from tokenbridge.reporting.render import write_document

PRIMARY_MARK = "★"
CLAIMS_PAGE = "docs/results/claims.md"  # the claims' index, relative to the project root (reports/ is one below)
TOTAL_LOSS = "loss"  # the history's total; each term has a `<name>_loss` column (alm_loss, sft_loss, ...)
# The evaluate stage's model names, which the summary sentence knows how to compare.
AFTER, BEFORE, TEACHER = "student_after", "student_before", "teacher"
# Context entries with a section of their own instead of a row in the run's key/value table.
SECTIONS = {"registry": "Model Registry", "params": "Parameters"}
# The distill history's held-out curves (`heldout_<score>` columns) and what each is measured on.
HELDOUT_SERIES = {"bits_per_byte": "reference answers", "teacher_answers_bits_per_byte": "teacher's answers"}


def render_report(eval_metrics: dict, history_csv: Path, context: dict, out_dir: Path) -> dict[str, Path]:
    """Writes out_dir/report.md, out_dir/report.html and out_dir/plots/*.png from `eval_metrics`: `models` (name ->
    its single-number scores), `primary_metric`, and `tasks` (name -> task -> its `TaskScore` fields).

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
    plot_losses(history["step"], {_loss_label(name): values for name, values in _logged(history).items()},
                _loss_label(TOTAL_LOSS), plots["loss_curves"])
    plot_metrics(models, scores, primary, plots["metrics_by_model"])
    if curves := _heldout_curves(history, models.get(BEFORE, {})):
        plots["heldout_curve"] = out_dir / "plots" / "heldout_curve.png"
        plot_learning_curves(curves, "bits_per_byte", plots["heldout_curve"], "held-out bits-per-byte in training")

    blocks = _document(models, metrics, scores, primary, history, context, eval_metrics.get("tasks") or {},
                       bool(curves))
    paths = write_document(out_dir, "report", _title(context), blocks, plots)
    return {**paths, **plots}


def render_transfer(scores: Mapping[str, Mapping[str, Any]], training: Mapping[str, Mapping[str, Any]],
                    sources: Sequence[str], members: Sequence[str], ensemble: Mapping[str, Any], out_dir: Path,
                    hypernet: Mapping[str, Mapping[str, Any]], hypernet_training: Mapping[str, Any],
                    stem: str = "transfer") -> dict[str, Path]:
    """Tokenizer transfer, the hypernetwork against FVT, and ensembling: out_dir/<stem>.md, .html and
    plots/<stem>.png.

    `scores` maps `<source>.original|fvt|hypernet|transferred`, `ensemble` and role members (`student`,
    `teacher`) to the evaluate stage's scores; `training` is the transfer stage's summary per source;
    `hypernet` the evaluate_hypernet stage's scores (`base`, `<tokenizer>.<fvt|hypernet>[_alm]`) and
    `hypernet_training` the hypernet stage's summary.
    """
    out_dir = Path(out_dir)
    metrics = [name for name in COMPARED if any(name in values for values in scores.values())]
    header = ["model", *metrics, "gsm_n"]

    def row(label: str) -> list[str]:
        values = scores.get(label, {})
        return [label, *(with_interval(values, metric) for metric in metrics), format_value(values.get("gsm_n"))]

    blocks: list[Block] = [Paragraph(
        "Each source model moved onto the target tokenizer: as it was (original, its own tokenizer), after its "
        "initialisation alone (FVT or the hypernetwork), and after that then self-distillation (`transfer.loss`, "
        "ALM by default); the "
        "hypernetwork against FVT on tokenizers it never trained on; then the ensemble next to each of its "
        "members. All on the same held-out questions and answers.")]
    for source in sources:
        summary = training.get(source, {})
        init = "hypernet" if summary.get("hypernet") else "fvt"
        blocks += [Heading(f"Transfer: {source}"),
                   Table(header, [row(f"{source}.{variant}") for variant in ("original", init, "transferred")],
                         numbers=True),
                   Paragraph(f"{'The hypernetwork' if init == 'hypernet' else 'FVT'} initialised "
                             f"{_counts(summary.get(init, {}))} target tokens; ALM "
                             f"self-distillation ran {format_value(summary.get('steps'))} steps on "
                             f"{format_value(summary.get('examples'))} examples (loss "
                             f"{format_value(summary.get('first_loss'))} -> {format_value(summary.get('final_loss'))}, "
                             f"{format_value(summary.get('median_seconds_per_step'))} s a step).")]
    blocks += _hypernet_blocks(hypernet, hypernet_training)
    labels = [member if member in scores else f"{member}.transferred" for member in members]
    blocks += [Heading("Ensemble"), Table(header, [row("ensemble"), *(row(label) for label in labels)], numbers=True),
               Paragraph(f"{ensemble.get('name', 'ensemble')}: next-token probabilities averaged with weights "
                         f"{_counts(ensemble.get('weights', {}))}."),
               Paragraph("bits_per_byte: lower is better; original_answers_bits_per_byte: bits-per-byte on the "
                         "source's own greedy answers, lower is closer to the original (whose own value is the "
                         "floor); gsm_exact_match: higher is better (n questions); "
                         "[low, high]: the 95 % interval. "
                         f"{MISSING}: not measured; the transfer models and the ensemble get GSM questions only with "
                         "evaluate.transfer_limit > 0 (docs/evaluation.md)."),
               Image(stem, "Each metric by model.")]
    plot = out_dir / "plots" / f"{stem}.png"
    plot_metrics({label: dict(values) for label, values in scores.items()}, metrics, None, plot)
    paths = write_document(out_dir, stem, "tokenbridge: tokenizer transfer and ensembling", blocks, {stem: plot})
    return {**paths, "plot": plot}


HYPERNET_COLUMNS = {"fvt": "FVT", "hypernet": "hypernetwork", "fvt_alm": "FVT + ALM",
                    "hypernet_alm": "hypernetwork + ALM"}


def _hypernet_blocks(scores: Mapping[str, Mapping[str, Any]], training: Mapping[str, Any]) -> list[Block]:
    """Held-out bits-per-byte of the base model moved onto each compared tokenizer, by start and training."""
    names = list(dict.fromkeys(label.split(".")[0] for label in scores if label != "base"))
    columns = [column for column in HYPERNET_COLUMNS if any(f"{name}.{column}" in scores for name in names)]
    rows = [[name, *(with_interval(scores.get(f"{name}.{column}", {}), "bits_per_byte") for column in columns)]
            for name in names]
    wins = [name for name in names
            if scores[f"{name}.hypernet"]["bits_per_byte"] < scores[f"{name}.fvt"]["bits_per_byte"]]
    noise = [name for name in wins if inside_the_noise("bits_per_byte", scores[f"{name}.hypernet"],
                                                        scores[f"{name}.fvt"])]
    inside = f" ({len(noise)} of them inside both 95 % intervals: {', '.join(noise)})" if noise else ""
    base = format_value(scores.get("base", {}).get("bits_per_byte"))
    return [Heading("Zero-shot transfer: hypernetwork against FVT"),
            Table(["tokenizer", *(HYPERNET_COLUMNS[column] for column in columns)], rows, numbers=True),
            Paragraph(f"Held-out bits-per-byte (lower is better) of the base model moved onto each tokenizer; on its "
                      f"own tokenizer it scores {base}. The zero-shot hypernetwork beats zero-shot FVT on "
                      f"{len(wins)} of {len(names)} tokenizers{': ' + ', '.join(wins) if wins else ''}"
                      f"{inside}. It trained "
                      f"{format_value(training.get('identity_steps'))} identity warm-up steps and "
                      f"{format_value(training.get('steps'))} ALM steps (loss "
                      f"{format_value(training.get('first_loss'))} -> {format_value(training.get('final_loss'))}); "
                      "`+ ALM`: then the transfer stage's ALM run (evaluate_hypernet.alm).")]


def _counts(values: Mapping[str, Any]) -> str:
    """{'exact': 46145, 'fvt': 3004} -> '46,145 exact, 3,004 fvt'; {'student': 0.5} -> 'student 0.50'."""
    return ", ".join(f"{value:,} {name}" if isinstance(value, int) else f"{name} {value:.2f}"
                     for name, value in values.items())


def _is_score(models: Mapping[str, Mapping], metric: str) -> bool:
    """A plottable score: numeric everywhere it is present, and not all integers (those are counts like gsm_n)."""
    present = [scores[metric] for scores in models.values() if scores.get(metric) is not None]
    return bool(present) and all(map(is_number, present)) and not all(isinstance(v, int) for v in present)


def _metric_names(models: Mapping[str, Mapping], primary: str | None) -> list[str]:
    """Every metric any model has, in first-seen order, less the intervals and standard errors shown beside their
    metric; the primary metric shows even if no model has it."""
    names = dict.fromkeys(name for scores in models.values() for name in scores)
    names = dict.fromkeys(name for name in names
                          if not any(name.endswith(suffix) and name.removesuffix(suffix) in names
                                     for suffix in UNCERTAINTY_SUFFIXES))
    if primary and primary not in names:
        names[primary] = None
    return list(names)


def _sample_size(scores: Mapping[str, Any], metric: str) -> Any:
    """The question count beside a benchmark metric: `gsm_n` for `gsm_exact_match` and its variants."""
    return scores.get(f"{metric.split('_', 1)[0]}_n")


def _comparison(metric: str, after: Mapping, before: Mapping | None, teacher: Mapping | None) -> str:
    value = after.get(metric)
    if not is_finite(value):
        return f"The distilled student has no {metric} score."
    better = EvalMetrics.better(metric)
    notes = [f"{better} is better"]
    if is_number(_sample_size(after, metric)):
        notes.append(f"n = {format_value(_sample_size(after, metric))}")
    bounds = interval(after, metric)
    if bounds:
        notes.append(f"95 % interval {format_value(bounds[0])} to {format_value(bounds[1])}")
    sentence = f"The distilled student's {metric} is {format_value(value)} ({', '.join(notes)})"
    earlier = before.get(metric) if before else None
    if is_finite(earlier):
        if format_value(value) == format_value(earlier):
            sentence += f", the same as before distillation ({format_value(earlier)})"
        else:
            change = value - earlier
            improved = (change < 0) == (better == "lower")
            sign = "+" if change > 0 else ""
            verdict = ("inside each other's 95 % intervals: not a measurable difference"
                       if before is not None and inside_the_noise(metric, after, before)
                       else "an improvement" if improved else "a regression")
            sentence += (f", {'up' if change > 0 else 'down'} from {format_value(earlier)} before distillation "
                         f"({sign}{format_value(change)}, {verdict})")
    reference = teacher.get(metric) if teacher else None
    if is_finite(reference):
        sentence += f"; the teacher's is {format_value(reference)}"
    return sentence + "."


def _summary(models: Mapping[str, Mapping], scores: Sequence[str], primary: str | None) -> str:
    """One paragraph on the primary metric, bits-per-byte, the chunk gap to the teacher and bits-per-byte on the
    teacher's answers: the student after vs before (vs the teacher)."""
    if not models:
        return "The metrics file lists no models."
    focus = ([name for name in dict.fromkeys([primary, "bits_per_byte", "chunk_gap_bits_per_byte",
                                              "teacher_answers_bits_per_byte"])
              if name is not None and name in scores] or list(scores[:1]))
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


def _heldout_curves(history: Mapping[str, list[float]], before: Mapping[str, Any]
                    ) -> dict[str, dict[int, dict[str, float]]]:
    """series -> step -> bits-per-byte with its interval: the student's held-out learning curve during distillation,
    from the untrained student (`before`, the evaluation's scores) at step 0. Empty without a curve."""
    curves = {}
    for score, label in HELDOUT_SERIES.items():
        columns = {f"bits_per_byte{end}": f"{HELDOUT}{score}{end}" for end in SCORE_AND_INTERVAL}
        if columns["bits_per_byte"] not in history:
            continue
        points = {int(step): {name: history[column][row] for name, column in columns.items()}
                  for row, step in enumerate(history["step"]) if math.isfinite(history[columns["bits_per_byte"]][row])}
        if points and is_finite(before.get(score)):
            points[0] = {f"bits_per_byte{end}": before[f"{score}{end}"] for end in SCORE_AND_INTERVAL
                         if f"{score}{end}" in before}
        if points:
            curves[label] = points
    return curves


def _logged(history: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """The loss series (total, then each term) with at least one number (a term is empty while its weight is 0)."""
    names = [name for name in history if name == TOTAL_LOSS or name.endswith("_loss")]
    return {name: history[name] for name in names if any(math.isfinite(v) for v in history[name])}


def _loss_label(name: str) -> str:
    return "loss (total)" if name == TOTAL_LOSS else name


def _training(history: Mapping[str, list[float]]) -> list[Block]:
    steps = history["step"]
    if not steps:
        return [Paragraph("The distill history lists no steps.")]
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
    return [Paragraph(text + "."), Table(["series", "first", "last", "min"], rows, numbers=True)]


def _title(context: Mapping[str, Any]) -> str:
    if context.get("teacher") and context.get("student"):
        return f"tokenbridge report: {context['teacher']} → {context['student']}"
    return "tokenbridge report"


def _benchmarks(tasks: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[Block]:
    """One table across the `evaluate.tasks` suite: a row per model, a column per task (its headline metric with
    +-1.96 lm-eval standard errors); nothing when no model ran a task."""
    names = list(dict.fromkeys(task for per_model in tasks.values() for task in per_model))
    if not names:
        return []
    first = {task: next(per_model[task] for per_model in tasks.values() if task in per_model) for task in names}

    def cell(score: Mapping[str, Any] | None) -> str:
        return with_interval(TaskScore(**score).headline(), "value") if score else MISSING

    header = ["model", *(f"{task}: {first[task]['metric']} ({'higher' if first[task]['higher_is_better'] else 'lower'}"
                         " is better)" for task in names)]
    rows = [[model, *(cell(per_model.get(task)) for task in names)] for model, per_model in tasks.items()]
    sizes = "; ".join(f"{task} {format_value(first[task]['n'])}" for task in names)
    return [Heading("Benchmarks"), Table(header, rows, numbers=True),
            Paragraph(f"lm-eval's harness on each task of evaluate.tasks, in each model's chat format (documents per "
                      f"model: {sizes}); [low, high]: +-1.96 lm-eval standard errors. arithmetic: four-way choices "
                      "scored by log-likelihood, so chance is 0.25 (docs/evaluation.md#benchmark-suite).")]


def _document(models: Mapping[str, Mapping], metrics: Sequence[str], scores: Sequence[str], primary: str | None,
              history: Mapping[str, list[float]], context: Mapping[str, Any],
              tasks: Mapping[str, Mapping[str, Mapping[str, Any]]], heldout_curve: bool) -> list[Block]:
    """The report's content once, as blocks that both the Markdown and the HTML writer render."""
    marked = metrics.index(primary) + 1 if primary in metrics else None
    header = ["model", *(f"{name} {PRIMARY_MARK}" if name == primary else name for name in metrics)]
    rows = [[name, *(with_interval(values, metric) for metric in metrics)] for name, values in models.items()]
    notes = []
    if marked:
        notes.append(f"{PRIMARY_MARK} marks the primary metric ({primary}).")
    if any(interval(values, metric) for values in models.values() for metric in metrics):
        notes.append("[low, high]: the 95 % interval (bootstrap over the test answers for bits-per-byte; "
                     "+-1.96 standard errors over the questions for GSM).")
    if any(MISSING in row[1:] for row in rows):
        notes.append(f"{MISSING} marks a metric not measured for that model.")
    blocks: list[Block] = [Paragraph(_summary(models, scores, primary)),
                           Heading("Metrics"), Table(header, rows, numbers=True, marked_column=marked)]
    if notes:
        blocks.append(Paragraph(" ".join(notes)))
    blocks += [Image("metrics_by_model", "Each metric by model; one panel per metric, since their scales differ."),
               *_benchmarks(tasks),
               Paragraph(f"Do the methods do what their papers claim? Each claim is measured as its own sweep, with "
                         f"a verdict, in {CLAIMS_PAGE} of the project (`tokenbridge claim --name <claim>` runs one)."),
               Heading("Training"), *_training(history), Image("loss_curves", "Distillation losses per step.")]
    if heldout_curve:
        blocks.append(Image("heldout_curve", "The student's held-out bits-per-byte as it trains (on the evaluation's "
                                             "reference answers and the teacher's answers, every "
                                             "distill.heldout_every steps, with its 95 % interval), from the "
                                             "untrained student at step 0; the last point is the distilled student's "
                                             "evaluation."))
    facts = {key: value for key, value in context.items() if not (key in SECTIONS and isinstance(value, Mapping))}
    if facts:
        blocks += [Heading("Run"), key_values(facts, ["fact", "value"])]
    for key, heading in SECTIONS.items():
        if isinstance(context.get(key), Mapping):
            first = "key" if key == "registry" else "parameter"
            blocks += [Heading(heading), key_values(context[key], [first, "value"])]
    return blocks
