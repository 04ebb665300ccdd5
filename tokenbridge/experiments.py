"""Arms of a sweep as DVC experiments in this workspace: what `compare` and `claim` share.

Each arm runs once per seed as `dvc exp run -n <prefix>-<arm>[-s<seed>]-<stamp> -S <override> ...`, so the stages
upstream of what the overrides change are shared and not rerun, every run stays in `dvc exp show`, and a rerun
with the same params is restored from DVC's run cache. params.yaml is restored afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tokenbridge.contracts import HELDOUT, DistillMetrics, EvalMetrics
from tokenbridge.io import read_json
from tokenbridge.paths import DISTILL_HISTORY, DISTILL_METRICS, EVAL_DIR, EVAL_METRICS_DIR, PER_EXAMPLE
from tokenbridge.reporting.comparison import across_seeds


def run(command: list[str]) -> None:
    print("running:", " ".join(command))
    subprocess.run(command, check=True)


@contextlib.contextmanager
def params_restored(params_file: Path) -> Iterator[None]:
    """params.yaml as it was when the block started, whatever the experiments (or an error) left in it."""
    saved = Path(params_file).read_text()
    try:
        yield
    finally:
        Path(params_file).write_text(saved)


def loss_curve(history_csv: Path) -> dict[str, Any]:
    """A training history's step and total-loss columns (one arm's training curve) and, where the history has one,
    its held-out learning curve (`heldout`: the steps it was measured at, and each score there with its interval,
    under the evaluation's names: `bits_per_byte`, `bits_per_byte_low`, ...)."""
    with open(history_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = [column for column in reader.fieldnames or [] if column.startswith(HELDOUT)]
    curve: dict[str, Any] = {"step": [float(row["step"]) for row in rows], "loss": [float(row["loss"]) for row in rows]}
    measured = [row for row in rows if columns and row[columns[0]]]
    if measured:
        curve["heldout"] = {"step": [int(row["step"]) for row in measured],
                            **{column.removeprefix(HELDOUT): [float(row[column]) for row in measured]
                               for column in columns}}
    return curve


def distilled() -> dict[str, Any]:
    """The distilled student's scores (every number of metrics/eval/student_after.json), the distill summary, its
    training curve (`history`) and its scores' per-example parts (`per_example`, for paired comparisons): what an arm
    of a distillation sweep yields."""
    return {**EvalMetrics.read(EVAL_METRICS_DIR / "student_after.json").numbers(),
            **DistillMetrics.read(DISTILL_METRICS).model_dump(exclude_none=True),
            "history": loss_curve(DISTILL_HISTORY), "per_example": read_json(EVAL_DIR / "student_after" / PER_EXAMPLE)}


def profile_setting(raw: dict[str, Any], key: str) -> str | None:
    """The active profile's name when it sets the dotted `key` (its value then wins over the top level's), else
    None. `raw`: params.yaml as parsed."""
    profile = raw.get("profile", "default")
    node: Any = raw.get("profiles", {}).get(profile, {}) if profile != "default" else {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return profile


def aimed_at_the_profile(override: str, params_file: Path = Path("params.yaml")) -> str:
    """`key=value` as `dvc exp run -S` must set it to take effect: `profiles.<active>.<key>` when the active
    profile sets that key, else the top-level key."""
    profile = profile_setting(yaml.safe_load(params_file.read_text()), override.split("=", 1)[0])
    return override if profile is None else f"profiles.{profile}.{override}"


def run_arms(arms: Mapping[str, Sequence[str]], seeds: Sequence[int], prefix: str, targets: Sequence[str] = (),
             read: Callable[[], dict[str, Any]] = distilled,
             seed_key: str = "distill.seed") -> dict[str, dict[str, Any]]:
    """arm -> what `read` finds after its experiment (default: the distilled student's scores) with the experiment's
    seconds, over its seeds (`across_seeds`), with `runs` (seed -> that run's). `targets`: the stages each
    experiment brings up to date (default: all); `seed_key`: the param each seed sets. Each override is set where
    the active profile reads it (`aimed_at_the_profile`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    for arm, overrides in arms.items():
        runs = {}
        for seed in seeds:
            sets = [aimed_at_the_profile(item) for item in (*overrides, f"{seed_key}={seed}")]
            name = f"{prefix}-{arm.replace('_', '-')}-s{seed}-{stamp}"
            started = time.perf_counter()
            run(["dvc", "exp", "run", "-n", name, *(arg for item in sets for arg in ("-S", item)), *targets])
            runs[seed] = {**read(), "experiment_seconds": time.perf_counter() - started}
        results[arm] = {**across_seeds(runs), "runs": runs}
    return results
