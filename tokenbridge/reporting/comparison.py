"""The loss comparison (`tokenbridge compare`): distillation methods side by side, each trained on equal terms
(over one seed or several), with the teacher and the untrained student for reference."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenbridge.contracts import UNCERTAINTY_SUFFIXES, EvalMetrics
from tokenbridge.reporting.document import (
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
from tokenbridge.reporting.plots import plot_metrics
from tokenbridge.reporting.render import write_document

# The evaluation metrics a side-by-side table shows, where any model has them.
COMPARED = ("bits_per_byte", "chunk_gap_bits_per_byte", "teacher_answers_bits_per_byte",
            "original_answers_bits_per_byte", "own_answers_chunk_gap_bits_per_byte", "gsm_exact_match",
            "gsm_exact_match_flexible")


def across_seeds(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One method's scores over its seeds (seed -> that run's scores). One seed: its run as it is. Several: each
    number's mean (a count the runs share stays as it is), and for each compared metric its standard deviation over
    the seeds (`<metric>_seed_sd`) and the 95 % t-interval of the mean (`<metric>_low`/`_high`), which replaces the
    runs' own intervals; `seeds` lists them."""
    scores = list(runs.values())
    if len(scores) == 1:
        return {**scores[0], "seeds": list(runs)}
    from scipy.stats import t

    shared = [key for key in scores[0] if all(is_number(run.get(key)) for run in scores)
              and not any(key.endswith(suffix) for suffix in UNCERTAINTY_SUFFIXES)]
    merged: dict[str, Any] = {}
    for key in shared:
        values = [run[key] for run in scores]
        same_count = all(isinstance(value, int) for value in values) and len(set(values)) == 1
        merged[key] = values[0] if same_count else statistics.fmean(values)
    for metric in COMPARED:
        if metric in merged:
            spread = statistics.stdev([run[metric] for run in scores])
            half = float(t.ppf(0.975, len(scores) - 1)) * spread / math.sqrt(len(scores))
            merged |= {f"{metric}_seed_sd": spread, f"{metric}_low": merged[metric] - half,
                       f"{metric}_high": merged[metric] + half}
    return {**merged, "seeds": list(runs)}


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
    rows = [[name, *(with_interval(scores, metric) for metric in metrics), format_value(scores.get("gsm_n")),
             format_value(scores.get("final_loss")), format_value(scores.get("median_seconds_per_step"))]
            for name, scores in models.items()]
    sentence = " ".join(filter(None, (_best_sentence(methods, metric) for metric in metrics)))
    seeds = {len(scores.get("seeds", [])) for scores in methods.values()}
    plot = out_dir / "plots" / f"{stem}.png"
    plot_metrics(models, metrics, None, plot)
    blocks: list[Block] = [
        Paragraph(f"{len(methods)} distillation methods, each trained with the same data, steps and "
                  f"{'seeds' if seeds - {0, 1} else 'seed'}, then evaluated on the same held-out questions. "
                  + sentence),
        Table(header, rows, numbers=True),
        Paragraph("bits_per_byte: lower is better; gsm_exact_match: higher is better (n questions). [low, high]: "
                  "the 95 % interval: over the test answers for one seed (bootstrap for bits-per-byte, +-1.96 "
                  "standard errors for GSM); over seeds for several (the t-interval of the mean; sd: the standard "
                  "deviation over seeds, means in the table). final loss values are not comparable across "
                  "methods: each method has its own loss."),
        Image(stem, "Each metric by method; teacher and untrained student for reference."),
        Heading("Run"), key_values(context, ["fact", "value"]),
    ]
    paths = write_document(out_dir, stem, "tokenbridge: distillation methods compared", blocks, {stem: plot})
    return {**paths, "plot": plot}


def _best(methods: Mapping[str, Mapping[str, Any]], metric: str) -> list[str]:
    """The methods tied for the best value of `metric`."""
    values = {name: scores[metric] for name, scores in methods.items() if is_finite(scores.get(metric))}
    if not values:
        return []
    target = (min if EvalMetrics.better(metric) == "lower" else max)(values.values())
    return [name for name, value in values.items() if value == target]


def _best_sentence(methods: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """`Best bits_per_byte: alm (0.5712).`, naming the methods whose values lie inside the best one's noise."""
    names = _best(methods, metric)
    if not names:
        return ""
    best = methods[names[0]]
    close = [name for name, scores in methods.items()
             if name not in names and is_finite(scores.get(metric)) and inside_the_noise(metric, best, scores)]
    noise = f"; inside each other's 95 % intervals with {', '.join(close)}" if close else ""
    return f"Best {metric}: {', '.join(names)} ({format_value(best[metric])}{noise})."
