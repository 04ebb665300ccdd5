"""A report's content as blocks that every renderer reads, and the one way each value is written."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from tokenbridge.contracts import interval

MISSING = "–"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    numbers: bool = False  # right-align every column but the first
    marked_column: int | None = None


@dataclass(frozen=True)
class Image:
    name: str  # the plot's file stem under plots/
    caption: str


Block = Heading | Paragraph | Table | Image


def format_value(value: Any) -> str:
    """The one way every value is written in a report, so tables, sentences and tests agree."""
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


def is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite(value: Any) -> TypeGuard[int | float]:
    """A number a sentence can compare: NaN or infinity is shown in a table but never called up or down."""
    return is_number(value) and math.isfinite(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys (`alm.temperature`), so a table of any depth stays two columns wide."""
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def key_values(data: Mapping[str, Any], header: Sequence[str]) -> Table:
    """A two-column table of any (nested) mapping."""
    return Table(header, [[key, format_value(value)] for key, value in _flatten(data)])


def with_interval(scores: Mapping[str, Any], metric: str) -> str:
    """`0.5712 [0.5536, 0.5893]`: the value and its 95 % interval where the scores hold one; over several seeds
    also their standard deviation, `0.5712 [0.5601, 0.5823] sd 0.0045`."""
    bounds = interval(scores, metric)
    text = format_value(scores.get(metric))
    if bounds:
        text += f" [{format_value(bounds[0])}, {format_value(bounds[1])}]"
    if scores.get(f"{metric}_seed_sd") is not None:
        text += f" sd {format_value(scores[f'{metric}_seed_sd'])}"
    return text


def inside_the_noise(metric: str, first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    """Whether each value lies inside the other's 95 % interval: a difference the measurement cannot tell."""
    a, b = interval(first, metric), interval(second, metric)
    return a is not None and b is not None and a[0] <= second[metric] <= a[1] and b[0] <= first[metric] <= b[1]
