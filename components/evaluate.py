"""Stage `evaluate`: the teacher, the student before and the student after distillation, on equal terms.

Each model gets lm-eval's real harness on the local GSM-style test set (`evaluate.limit` questions) and
held-out bits-per-byte on the test answers. Output: `metrics/eval.json` (a DVC metrics file),
`data/eval/` (the generated lm-eval task and per-question samples).
"""

from __future__ import annotations

from pathlib import Path

from components.config import EvaluateParams
from components.evaluation.bpb import bits_per_byte
from components.evaluation.gsm_lmeval import evaluate_gsm, write_gsm_task
from components.io import require_manifest, write_json

# model name in the report -> which tokenization of the test set it reads
TOKENIZATION = {"teacher": "teacher", "student_before": "student", "student_after": "student"}


def run_evaluate(prepared_dir: Path, model_dirs: dict[str, Path], out_dir: Path, metrics_path: Path,
                 params: EvaluateParams) -> dict:
    require_manifest(prepared_dir, "prepare")
    task_dir = out_dir / "task"
    write_gsm_task(task_dir, (prepared_dir / "test.jsonl").resolve(), (prepared_dir / "train.jsonl").resolve())
    results: dict[str, dict] = {}
    for name, model_dir in model_dirs.items():
        print(f"evaluate: {name} ({model_dir})")
        scores = bits_per_byte(model_dir, prepared_dir / f"test.{TOKENIZATION[name]}.jsonl", params.bpb_examples)
        scores.update(evaluate_gsm(model_dir, task_dir, params.limit, params.num_fewshot, params.max_gen_toks,
                                   params.batch_size, samples_path=out_dir / f"samples.{name}.jsonl"))
        results[name] = scores
    metrics = {"models": results}
    write_json(metrics_path, metrics)
    return metrics
