"""The teacher_answers stage and bits-per-byte on the teacher's own greedy answers (docs/evaluation.md)."""

from __future__ import annotations

import pytest
import torch

from tokenbridge.contracts import ANSWERS, MANIFEST, TeacherAnswersManifest
from tokenbridge.evaluation.answers import greedy_answers, write_greedy_answers
from tokenbridge.io import read_jsonl
from tokenbridge.on_policy import valid_text
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import run_evaluate
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.token_bytes import special_ids, vocab_bytes


@pytest.fixture(scope="module")
def prepared(tiny_params, tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    run_prepare(tiny_dirs, out, tiny_params.prepare)
    return out


def test_batched_greedy_answers_are_what_transformers_generate_one_question_at_a_time(tiny_params, tiny_dirs,
                                                                                       prepared, tmp_path,
                                                                                       context_dependent_copy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = context_dependent_copy(tiny_dirs["teacher"], tmp_path / "teacher", seed=1)
    questions = [record["question"] for record in read_jsonl(prepared / "test.jsonl")[:3]]
    runtime = Runtime.resolve(tiny_params.runtime)
    answers = greedy_answers(teacher, questions, max_new_tokens=12, batch_size=3, runtime=runtime)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    table = vocab_bytes(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for question, answer in zip(questions, answers):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        padding_rows = list(range(len(tokenizer), model.config.vocab_size))  # a padded vocabulary's rows name no token
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False,
                                   suppress_tokens=padding_rows)[0, prompt["input_ids"].shape[1]:]
        ended = tokenizer.eos_token_id in generated.tolist()
        text = b"".join(table[token] for token in generated.tolist() if token not in special_ids(tokenizer))
        assert answer == {"question": question, "ended": ended, "answer": valid_text(text)}
    assert len({answer["answer"] for answer in answers}) == len(answers)  # they differ by question: the check has teeth


def test_every_model_is_scored_on_the_same_bytes_of_the_teachers_answers_and_on_its_own_answers(tiny_params, tiny_dirs,
                                                                                               prepared, tmp_path):
    runtime = Runtime.resolve(tiny_params.runtime)
    manifest = write_greedy_answers(prepared / "test.jsonl", tiny_dirs["teacher"], tiny_dirs["student"],
                                    tmp_path / "answers", count=3, max_new_tokens=16, batch_size=2, runtime=runtime)
    assert TeacherAnswersManifest.read(tmp_path / "answers" / MANIFEST) == manifest
    assert manifest.examples + manifest.unreadable == 3 and manifest.examples > 0
    scored = {role: run_evaluate(prepared, directory, tmp_path / role, tmp_path / f"{role}.json", tiny_params.evaluate,
                                 runtime, limit=0, teacher_dir=tiny_dirs["teacher"],
                                 teacher_answers=tmp_path / "answers" / ANSWERS)
              for role, directory in tiny_dirs.items()}
    answer_bytes = sum(len(record["answer"].encode()) + record["ended"]
                       for record in read_jsonl(tmp_path / "answers" / ANSWERS))
    for scores in scored.values():
        assert scores.teacher_answers_bytes == answer_bytes
        assert scores.teacher_answers_bits_per_byte_low < scores.teacher_answers_bits_per_byte
        assert scores.teacher_answers_bits_per_byte < scores.teacher_answers_bits_per_byte_high
    assert scored["teacher"].teacher_answers_bits_per_byte != scored["student"].teacher_answers_bits_per_byte
    # On its own answers, the teacher is exactly as far from itself as nothing; the student is not.
    assert scored["teacher"].own_answers_chunk_gap_bits_per_byte == 0
    assert scored["student"].own_answers_chunk_gap_bits_per_byte > 0
    assert len(read_jsonl(tmp_path / "student" / "own_answers.jsonl")) == manifest.examples
