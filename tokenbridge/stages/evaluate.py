"""Stage `evaluate@<model>`: one model (teacher, student before or after distillation) on equal terms.

Each model gets held-out bits-per-byte on the test answers (fp32) and lm-eval's real harness on the
`evaluate.tasks` suite (GSM-style maths on the local test set, generated arithmetic choices, any other lm-eval
task: `evaluation/suite.py`; generation greedy, in batches of `evaluate.batch_size`, in the runtime's inference
dtype: bf16 where the hardware computes it natively, else fp32), in the model's own tokenizer and chat template
(so any model, transferred or an ensemble, is measured the same way). All on `runtime.device`. One DVC stage per
model, so a changed student re-evaluates only itself. Outputs: `metrics/eval/<model>.json` (a DVC metrics file)
and `data/eval/<model>/` (the generated lm-eval tasks, the tokenized test set, per-document samples
(`samples.jsonl` for GSM, `samples.<task>.jsonl` for the others), `lm_eval_config.json`: the harness's own record
of each task's run, and `run.json`: the resolved runtime and each part's wall and CPU seconds).

`run_evaluate` also scores the transfer stage's models (`evaluate_transfer`), which by default get
bits-per-byte alone (`limit=0`): docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenbridge.config import EvaluateParams
from tokenbridge.contracts import MANIFEST, EvalMetrics, PreparedManifest
from tokenbridge.data.chat import Encoded
from tokenbridge.evaluation.answers import continuations, greedy_answers, references, spelled_by
from tokenbridge.evaluation.bpb import EXAMPLES, bits_per_byte_of, chunk_gap, token_logprobs
from tokenbridge.evaluation.gsm_lmeval import gsm_scores
from tokenbridge.evaluation.harness import Task, document_samples, generates, run_harness, task_score
from tokenbridge.evaluation.suite import resolve_tasks
from tokenbridge.io import read_jsonl, write_json, write_jsonl
from tokenbridge.models import load_tokenizer
from tokenbridge.paths import PER_EXAMPLE
from tokenbridge.runtime import Runtime


def tokenize_test_set(test_jsonl: Path, model_dir: Path, out_path: Path) -> Path:
    """The test records in the model's own tokenization, on the common byte stream (as `prepare` writes)."""
    encoded = references(read_jsonl(test_jsonl), load_tokenizer(model_dir))
    write_jsonl(out_path, (example.to_json() for example in encoded))
    return out_path


def _test_answers(prepared_dir: Path, model_dir: Path, out_path: Path, count: int) -> list[Encoded]:
    tokenize_test_set(prepared_dir / "test.jsonl", model_dir, out_path)
    return [Encoded.from_json(record) for record in read_jsonl(out_path)[:count]]


def _own_answers_gap(model_dir: Path, teacher_dir: Path, questions: list[dict], params: EvaluateParams,
                     runtime: Runtime, out_path: Path) -> dict[str, float]:
    """The chunk gap to the teacher on the model's own greedy answers to the teacher_answers questions: how close
    the two models' likelihoods are on what the student itself says (GKD's on-policy distribution). An answer
    either tokenizer cannot spell is left out (`own_answers_unreadable`)."""
    own = greedy_answers(model_dir, [record["question"] for record in questions], params.max_gen_toks,
                         params.batch_size, runtime)
    write_jsonl(out_path, own)
    kept = spelled_by(own, [model_dir, teacher_dir])
    teacher, student = (continuations(kept, load_tokenizer(teacher_dir)),
                        continuations(kept, load_tokenizer(model_dir)))
    gap = chunk_gap(teacher, token_logprobs(teacher_dir, teacher, runtime.device), student,
                    token_logprobs(model_dir, student, runtime.device), "own_answers_chunk_gap_bits_per_byte")
    return {**gap, "own_answers_unreadable": len(own) - len(kept)}


def _apart(part: dict[str, Any], examples: dict[str, list[list[float]]]) -> dict[str, Any]:
    """A scorer's numbers, its per-example parts moved into `examples` (they go to their own file, not to the
    metrics file DVC and MLflow show)."""
    examples.update(part.pop(EXAMPLES, {}))
    return part


def run_evaluate(prepared_dir: Path, model_dir: Path, out_dir: Path, metrics_path: Path, params: EvaluateParams,
                 runtime: Runtime, limit: int | None = None, teacher_dir: Path | None = None,
                 teacher_answers: Path | None = None, original_answers: Path | None = None) -> EvalMetrics:
    """Bits-per-byte; with `teacher_dir`, the chunk gap to that teacher on the same answers; with `teacher_answers`
    (the teacher_answers stage's answers.jsonl), bits-per-byte on those answers; with both, the chunk gap on the
    model's own greedy answers to those questions; with `original_answers` (a moved model's source's own answers,
    written by the transfer stage), bits-per-byte on those; then the `params.tasks` suite,
    generation tasks on `limit` documents each (default `params.limit`; 0: no task at all, bits-per-byte alone),
    log-likelihood tasks on `params.choice_limit`. Writes the scores to `metrics_path` (and each ratio score's parts
    per example to out_dir/per_example.json) and returns them."""
    PreparedManifest.read(Path(prepared_dir) / MANIFEST)  # fails naming the stage to run when data is missing
    limit = params.limit if limit is None else limit
    # Each task loaded before any work, so a bad entry fails at once; generation tasks get `limit` documents.
    suite = [(task, limit if generates(task) else params.choice_limit)
             for task in (resolve_tasks(params.tasks, out_dir / "task", prepared_dir) if limit > 0 else [])]
    answers = _test_answers(prepared_dir, model_dir, out_dir / "test.encoded.jsonl", params.bpb_examples)
    seconds: dict[str, float] = {}
    examples: dict[str, list[list[float]]] = {}  # score -> per example [bits, bytes] (PER_EXAMPLE)
    with _timed("bpb", seconds):
        logprobs = token_logprobs(model_dir, answers, runtime.device)
        scores: dict[str, Any] = _apart(bits_per_byte_of(answers, logprobs), examples)
    if teacher_dir is not None:
        with _timed("chunk_gap", seconds):
            teacher = _test_answers(prepared_dir, teacher_dir, out_dir / "teacher.encoded.jsonl", params.bpb_examples)
            scores.update(_apart(chunk_gap(teacher, token_logprobs(teacher_dir, teacher, runtime.device), answers,
                                           logprobs), examples))
    for name, generated in (("teacher_answers", teacher_answers), ("original_answers", original_answers)):
        if generated is not None:
            with _timed(name, seconds):
                scored = continuations(read_jsonl(generated), load_tokenizer(model_dir))
                scores.update(_apart(bits_per_byte_of(scored, token_logprobs(model_dir, scored, runtime.device),
                                                      f"{name}_bits_per_byte", f"{name}_bytes"), examples))
    if teacher_dir is not None and teacher_answers is not None:
        with _timed("own_answers", seconds):
            scores.update(_apart(_own_answers_gap(model_dir, teacher_dir, read_jsonl(teacher_answers), params,
                                                  runtime, out_dir / "own_answers.jsonl"), examples))
    if suite:
        scores.update(_benchmark_suite(suite, model_dir, out_dir, params, runtime, seconds))
    write_json(out_dir / PER_EXAMPLE, examples)
    write_json(out_dir / "run.json", {"runtime": runtime.describe(), "batch_size": params.batch_size, **seconds})
    metrics = EvalMetrics(**scores)
    metrics.write(metrics_path)
    return metrics


def _benchmark_suite(suite: list[tuple[Task, int]], model_dir: Path, out_dir: Path, params: EvaluateParams,
                     runtime: Runtime, seconds: dict[str, float]) -> dict[str, Any]:
    """Each (task, documents) through lm-eval's harness: `tasks` (name -> its scores) and GSM's `gsm_*` scores; each
    task's samples, the harness's record of each run (`lm_eval_config.json`) and its seconds per document."""
    scores: dict[str, Any] = {"tasks": {}}
    configs = {}
    for task, documents in suite:
        with _timed(task.name, seconds):
            results = run_harness(model_dir, task, documents, params.num_fewshot, params.batch_size,
                                  params.max_gen_toks, runtime.inference_dtype_name, str(runtime.device))
        scores["tasks"][task.name], configs[task.name] = task_score(results, task), results["config"]
        seconds[f"{task.name}_seconds_per_document"] = round(seconds[f"{task.name}_seconds"]
                                                             / max(scores["tasks"][task.name].n, 1), 2)
        if task.name == "gsm":
            scores.update(gsm_scores(results, out_dir / "samples.jsonl"))
        else:
            write_jsonl(out_dir / f"samples.{task.name}.jsonl", document_samples(results, task))
    write_json(out_dir / "lm_eval_config.json", configs)
    return scores


@contextlib.contextmanager
def _timed(part: str, seconds: dict[str, float]) -> Iterator[None]:
    """Adds the block's wall and process CPU seconds to `seconds` as `<part>_seconds`, `<part>_cpu_seconds` (CPU:
    all threads; on a busy machine it is the part that does not depend on other jobs)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    seconds[f"{part}_seconds"] = round(time.perf_counter() - wall, 2)
    seconds[f"{part}_cpu_seconds"] = round(time.process_time() - cpu, 2)
