"""bench/device_check.sh, the GPU checks in one script, runs on the CPU with tiny shapes (`--cpu --quick`) and
writes every result it promises, so it cannot rot between GPU runs; and the code the GPU checks import needs no
package the GPU machine lacks beyond the wheels `make device-wheels` carries."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
OUTPUTS = ("pytest-cuda.xml", "pytest-cuda.txt", "logits.json", "logits.md", "step.json", "step.md", "results.json",
           "results.md")
# Our dependencies that the GPU machine's image does not hold and `make device-wheels` does not carry
# (/work/.library/device/KINDS.md lists the image; pydantic, zstandard and rapidfuzz travel as wheels).
ABSENT_ON_DEVICE = ("prefect", "prefect_dask", "mlflow", "dvc", "datasets", "lm_eval", "gguf", "reasoning_gym", "trl",
                    "psycopg2", "fastapi", "sqlalchemy")
GPU_CHECK_MODULES = ("tests/conftest.py", "tests/test_cuda.py", "bench/step.py", "bench/logits.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("device_check")
    completed = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), str(out), "--cpu", "--quick"],
                               cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                               timeout=900)
    return out, completed


@pytest.fixture(scope="module")
def results(quick_run) -> dict:
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_quick_cpu_run_exits_cleanly_and_writes_every_result_file(quick_run):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert all((out / name).stat().st_size > 0 for name in OUTPUTS)


def test_the_results_name_the_run_and_every_part_exits_zero(results):
    assert set(results) == {"date", "git_commit", "mode", "machine", "exit_codes", "seconds", "pytest", "logits",
                            "step", "goals_met"}
    assert results["mode"] == {"device": "cpu", "quick": True}
    assert results["machine"]["cpu"] and results["machine"]["torch"] == torch.__version__
    assert results["exit_codes"] == {"pytest": 0, "logits": 0, "step": 0}
    assert all(seconds >= 0 for seconds in results["seconds"].values())


def test_the_cuda_tests_are_collected_and_skipped_without_a_gpu(results):
    summary = results["pytest"]
    assert summary["tests"] >= 20 and summary["failures"] == summary["errors"] == 0
    if not torch.cuda.is_available():
        assert summary["skipped"] == summary["tests"]


def test_the_logits_bench_reports_its_throughput_ratio_and_codec_table(results):
    logits = results["logits"]
    assert logits["shape"] == "tiny-qwen2" and logits["vocab_size"] == 2000, "the tokenizer grown to the shape's size"
    assert logits["tokens"] > 4 * 32
    assert all(_positive(logits[key]) for key in ("forward_tokens_per_second", "extract_tokens_per_second",
                                                  "throughput_ratio", "stage_shard_bytes_per_token_at_k128"))
    assert logits["throughput_ratio"] == pytest.approx(
        logits["extract_tokens_per_second"] / logits["forward_tokens_per_second"])
    assert len(logits["settings"]) == 6
    for row in logits["settings"]:
        assert 0 < row["mean_kept"] <= row["top_k"] and _positive(row["bytes_per_token"])
        assert row["bytes_per_token"] < row["naive_bytes_per_token"]
        assert all(0 <= row[key] < 0.1 for key in ("kl_tau1", "kl_tau2"))


def test_the_step_bench_times_alm_against_ce_for_each_student(results):
    step = results["step"]
    assert step["runtime"]["device"] == "cpu" and step["runtime"]["precision"] == "fp32"
    assert set(step["students"]) == {"tiny-llama", "tiny-qwen2"}
    assert step["peak_memory"] is None, "no peak memory on the CPU"
    for row in step["students"].values():
        ce, alm = row["ce"], row["alm"]
        assert set(ce["terms"]) == {"sft"} and set(alm["terms"]) == {"alm", "sft"}
        assert all(math.isfinite(value) for value in [*ce["terms"].values(), *alm["terms"].values()])
        assert ce["tokens_per_second"] == pytest.approx(step["student_tokens"] / ce["seconds_per_step"])
        assert row["step_ratio"] == pytest.approx(alm["seconds_per_step"] / ce["seconds_per_step"])
        assert row["live_step_ratio"] == pytest.approx(alm["live_seconds_per_step"] / ce["seconds_per_step"])
        assert _positive(alm["teacher_seconds"]) and alm["live_seconds_per_step"] >= alm["seconds_per_step"]
        assert ce["peak_memory_bytes"] is None and row["memory_ratio"] is None
    assert step["student_tokens"] > 2 * 32 and step["teacher_tokens"] > 2 * 32


def test_the_goals_are_judged_and_the_markdown_holds_every_table(quick_run, results):
    out, _ = quick_run
    assert set(results["goals_met"]) == {"logits throughput ratio >= 0.9", "tiny-llama: ALM / CE step <= 1.1",
                                         "tiny-qwen2: ALM / CE step <= 1.1"}
    assert all(isinstance(met, bool) for met in results["goals_met"].values())
    report = (out / "results.md").read_text()
    assert "pytest -m cuda: 0 passed, 0 failed, 0 errors" in report or torch.cuda.is_available()
    assert "## stored teacher logits" in report and "## Distill step" in report and "| goal | met |" in report


def test_the_gpu_checks_import_nothing_the_gpu_machine_lacks():
    """Import the GPU checks' modules with our dependencies that the GPU machine lacks made unimportable."""
    script = (  # a None in sys.modules makes `import` fail and `importlib.util.find_spec` answer None
        "import importlib.util, sys\n"
        f"sys.modules.update(dict.fromkeys({ABSENT_ON_DEVICE!r}))\n"
        "for path in sys.argv[1:]:\n"
        "    spec = importlib.util.spec_from_file_location(path.replace('/', '_')[:-3], path)\n"
        "    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, *GPU_CHECK_MODULES], cwd=ROOT, capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
