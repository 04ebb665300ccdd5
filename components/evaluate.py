"""Stage `evaluate@<model>`: one model (teacher, student before or after distillation) on equal terms.

Each model gets lm-eval's real harness on the local GSM-style test set (`evaluate.limit` questions,
generation in `evaluate.dtype`) and held-out bits-per-byte on the test answers (fp32). One DVC stage per
model, so a changed student re-evaluates only itself. Outputs: `metrics/eval/<model>.json` (a DVC
metrics file) and `data/eval/<model>/` (the generated lm-eval task and per-question samples).
"""

from __future__ import annotations

from pathlib import Path

from components.config import EvaluateParams
from components.evaluation.bpb import bits_per_byte
from components.evaluation.gsm_lmeval import evaluate_gsm, write_gsm_task
from components.io import read_json, require_manifest, write_json


def run_evaluate(prepared_dir: Path, model_dir: Path, tokenization: str, out_dir: Path, metrics_path: Path,
                 params: EvaluateParams) -> dict:
    require_manifest(prepared_dir, "prepare")
    task_dir = out_dir / "task"
    write_gsm_task(task_dir, prepared_dir / "test.jsonl", prepared_dir / "train.jsonl")
    scores = bits_per_byte(model_dir, prepared_dir / f"test.{tokenization}.jsonl", params.bpb_examples)
    scores.update(evaluate_gsm(model_dir, task_dir, params.limit, params.num_fewshot, params.max_gen_toks,
                               params.batch_size, params.dtype, samples_path=out_dir / "samples.jsonl"))
    write_json(metrics_path, scores)
    return scores


def collect_metrics(metrics_dir: Path, names: list[str]) -> dict[str, dict]:
    """Every evaluated model's scores, in the given order; fails naming the stage that has not run."""
    missing = [name for name in names if not (metrics_dir / f"{name}.json").exists()]
    if missing:
        raise FileNotFoundError(f"no metrics for {missing}: run 'dvc repro' (stages evaluate@<model>) first")
    return {name: read_json(metrics_dir / f"{name}.json") for name in names}
