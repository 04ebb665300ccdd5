"""Stage `teacher_answers`: the teacher's own greedy answers to the first held-out questions, generated once.

The evaluate stages score every model's bits-per-byte on these answers beside the reference answers: how
likely a student finds what its teacher would say, the quantity distillation moves and next-token training on
the references does not target (docs/evaluation.md#distance-from-the-teacher). Decoding: `greedy_answers`.
"""

from __future__ import annotations

from pathlib import Path

from tokenbridge.contracts import MANIFEST, ModelCard, TeacherAnswersManifest
from tokenbridge.evaluation.answers import greedy_answers, spelled_by
from tokenbridge.io import atomic_path, read_jsonl, write_jsonl
from tokenbridge.runtime import Runtime

ANSWERS = "answers.jsonl"


def run_teacher_answers(test_jsonl: Path, teacher_dir: Path, student_dir: Path, out_dir: Path, count: int,
                        max_new_tokens: int, batch_size: int, runtime: Runtime) -> TeacherAnswersManifest:
    """Writes `out_dir/answers.jsonl` (the first `count` test questions, each with the teacher's greedy answer) and
    its manifest, atomically. An answer the student's tokenizer cannot spell is left out (and counted), so every
    evaluated model is scored on the same answers."""
    questions = [record["question"] for record in read_jsonl(test_jsonl)[:count]]
    generated = greedy_answers(teacher_dir, questions, max_new_tokens, batch_size, runtime)
    records = spelled_by(generated, [teacher_dir, student_dir])
    manifest = TeacherAnswersManifest(teacher=ModelCard.of(teacher_dir).name, examples=len(records),
                                      unreadable=len(generated) - len(records),
                                      ended=sum(record["ended"] for record in records),
                                      max_new_tokens=max_new_tokens, dtype=runtime.inference_dtype_name)
    with atomic_path(out_dir) as staging:
        staging.mkdir(parents=True)
        write_jsonl(staging / ANSWERS, records)
        manifest.write(staging / MANIFEST)
    return manifest
