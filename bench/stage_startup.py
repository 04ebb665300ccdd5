"""Benchmark: what a stage command spends before and around its work, and what one shared Prefect API saves.

In a temporary copy of this checkout on the tiny profile (after `tokenbridge models`), it times:

- `import`: `python -c "import tokenbridge.flows.prepare"`, the imports every stage command pays (torch,
  transformers, Prefect, MLflow);
- `prepare, own API`: `tokenbridge prepare` as a bare `dvc repro` runs it, starting its own temporary Prefect API;
- `prepare, shared API`: the same with PREFECT_API_URL naming an API already running, as every stage of
  `tokenbridge pipeline` now gets (the pipeline starts one for the run).

The prepare stage's own work on the tiny profile is well under a second, so its time is almost all overhead.
Reported: the median of `--repeats` runs of each, and the saving per stage (own - shared).

Usage: python bench/stage_startup.py [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _project(root: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    project = root / "project"
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["profile"] = "tiny"
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return project


def _seconds(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tokenbridge.cli import ENVIRONMENT_DEFAULTS

    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(key, None)
    for key, value in ENVIRONMENT_DEFAULTS.items():  # as the `tokenbridge` command sets them, before Prefect loads
        os.environ.setdefault(key, value)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    stage = [sys.executable, "-m", "tokenbridge"]
    with tempfile.TemporaryDirectory() as temporary:
        project = _project(Path(temporary))
        subprocess.run([*stage, "models"], cwd=project, env=env, check=True, capture_output=True)
        times: dict[str, list[float]] = {"import": [], "prepare, own API": [], "prepare, shared API": []}
        for _ in range(args.repeats):
            times["import"].append(_seconds([sys.executable, "-c", "import tokenbridge.flows.prepare"], project, env))
            times["prepare, own API"].append(_seconds([*stage, "prepare"], project, env))
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        try:
            for _ in range(args.repeats):
                times["prepare, shared API"].append(
                    _seconds([*stage, "prepare"], project, env | {"PREFECT_API_URL": server.api_url}))
        finally:
            server.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<22} {value:6.2f} s   (runs: {', '.join(f'{v:.2f}' for v in times[name])})")
    saving = medians["prepare, own API"] - medians["prepare, shared API"]
    print(f"a shared API saves {saving:.2f} s per stage ({saving / medians['prepare, own API']:.0%})")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.machine(), "times": times,
                                         "medians": medians, "saving_per_stage": saving}, indent=2) + "\n")


if __name__ == "__main__":
    main()
