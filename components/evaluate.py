"""Stage `evaluate@<model>`: one model (teacher, student before or after distillation) on equal terms.

Each model gets lm-eval's real harness on the local GSM-style test set (`evaluate.limit` questions,
generation in `evaluate.dtype`) and held-out bits-per-byte on the test answers (fp32), the test set
tokenized by the model's own tokenizer and chat template (so any model, transferred or an ensemble, is
measured the same way). One DVC stage per model, so a changed student re-evaluates only itself. Outputs:
`metrics/eval/<model>.json` (a DVC metrics file) and `data/eval/<model>/` (the generated lm-eval task,
the tokenized test set and per-question samples).
"""

from __future__ import annotations

from pathlib import Path

from components.config import EvaluateParams
from components.evaluation.bpb import bits_per_byte
from components.evaluation.gsm_lmeval import evaluate_gsm, write_gsm_task
from components.data.chat import encode_example
from components.io import read_json, read_jsonl, require_manifest, write_json, write_jsonl
from components.models import load_tokenizer
from components.models.token_bytes import vocab_bytes


def tokenize_test_set(test_jsonl: Path, model_dir: Path, out_path: Path) -> Path:
    """The test records in the model's own tokenization, on the common byte stream (as `prepare` writes)."""
    tokenizer = load_tokenizer(model_dir)
    table = vocab_bytes(tokenizer)
    write_jsonl(out_path, (encode_example(tokenizer, r["question"], r["answer"], table).to_json()
                           for r in read_jsonl(test_jsonl)))
    return out_path


def run_evaluate(prepared_dir: Path, model_dir: Path, out_dir: Path, metrics_path: Path, params: EvaluateParams) -> dict:
    require_manifest(prepared_dir, "prepare")
    task_dir = out_dir / "task"
    write_gsm_task(task_dir, prepared_dir / "test.jsonl", prepared_dir / "train.jsonl")
    encoded = tokenize_test_set(prepared_dir / "test.jsonl", model_dir, out_dir / "test.encoded.jsonl")
    scores = bits_per_byte(model_dir, encoded, params.bpb_examples)
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
