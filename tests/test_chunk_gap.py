"""The student's distance from its teacher on held-out answers: the chunk gap, comparable across tokenizers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tokenbridge.data.chat import Encoded
from tokenbridge.evaluation.bpb import chunk_gap
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import run_evaluate
from tokenbridge.stages.prepare import run_prepare

# "ab" + "cd" after a template token: the teacher reads ab|cd, the student a|b|cd.
TEACHER = Encoded([9, 1, 2], [None, (0, 2), (2, 4)], [False, True, True])
STUDENT = Encoded([9, 1, 2, 3], [None, (0, 1), (1, 2), (2, 4)], [False, True, True, True])


def test_the_gap_is_the_absolute_chunk_log_likelihood_difference_per_byte_of_the_answer():
    teacher_logprobs = [[0.0, -1.0, -2.0]]
    student_logprobs = [[0.0, -0.4, -0.6, -2.5]]  # "ab": -1.0 on both sides; "cd": 0.5 nats apart
    gap = chunk_gap([TEACHER], teacher_logprobs, [STUDENT], student_logprobs)
    assert gap["chunk_gap_bits_per_byte"] == pytest.approx(0.5 / math.log(2) / 4)
    same = chunk_gap([TEACHER], teacher_logprobs, [STUDENT], [[0.0, -0.3, -0.7, -2.0]])
    assert same["chunk_gap_bits_per_byte"] == 0.0, "the same likelihood on every chunk, however split"


def test_chunks_outside_the_answer_do_not_count():
    question = Encoded([9, 1, 2], [None, (0, 2), (2, 4)], [False, False, True])
    gap = chunk_gap([question], [[0.0, -5.0, -2.0]], [STUDENT], [[0.0, -0.4, -0.6, -2.0]])
    assert gap["chunk_gap_bits_per_byte"] == 0.0


@pytest.fixture(scope="module")
def prepared(tiny_params, tiny_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunk_gap")
    run_prepare(tiny_dirs, root / "prepared", tiny_params.prepare)
    return root / "prepared"


def test_a_model_is_no_distance_from_itself_and_a_student_on_another_tokenizer_is_some(tiny_params, tiny_dirs,
                                                                                        prepared, tmp_path):
    runtime = Runtime.resolve(tiny_params.runtime)

    def gap(model: str) -> dict:
        return run_evaluate(prepared, tiny_dirs[model], tmp_path / model, tmp_path / f"{model}.json",
                            tiny_params.evaluate, runtime, limit=0, teacher_dir=tiny_dirs["teacher"]).scores()

    itself, student = gap("teacher"), gap("student")
    assert itself["chunk_gap_bits_per_byte"] == 0.0
    parts = json.loads((tmp_path / "student" / "per_example.json").read_text())  # what paired comparisons resample
    assert set(parts) == {"bits_per_byte", "chunk_gap_bits_per_byte"}
    bits, n_bytes = zip(*parts["chunk_gap_bits_per_byte"])
    assert math.isclose(sum(bits) / sum(n_bytes), student["chunk_gap_bits_per_byte"])
    assert student["chunk_gap_bits_per_byte_low"] < student["chunk_gap_bits_per_byte"]
    assert 0 < student["chunk_gap_bits_per_byte"] < student["chunk_gap_bits_per_byte_high"]
