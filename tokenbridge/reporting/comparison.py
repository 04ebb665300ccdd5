"""The loss comparison (`tokenbridge compare`): distillation methods side by side, each trained on equal terms,
with the teacher and the untrained student for reference."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenbridge.contracts import EvalMetrics
from tokenbridge.reporting.document import Block, Heading, Image, Paragraph, Table, format_value, is_finite, key_values
from tokenbridge.reporting.plots import plot_metrics
from tokenbridge.reporting.render import write_document

# The evaluation metrics a side-by-side table shows, where any model has them.
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
    plot_metrics(models, metrics, None, plot)
    blocks: list[Block] = [
        Paragraph(f"{len(methods)} distillation methods, each trained with the same data, steps and seed, then "
                  "evaluated on the same held-out questions. " + sentence),
        Table(header, rows, numbers=True),
        Paragraph("bits_per_byte: lower is better; gsm_exact_match: higher is better (n questions). "
                  "final loss values are not comparable across methods: each method has its own loss."),
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
