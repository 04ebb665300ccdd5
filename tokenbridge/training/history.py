"""The per-step history: one row per step, written as CSV (DVC plots it) and summarised by medians."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence


def history_csv(rows: list[dict], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")
