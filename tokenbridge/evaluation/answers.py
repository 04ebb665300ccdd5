"""A model's own greedy answers to questions, and reading another model's answers: the text both models score.

Greedy decoding in the model's chat template (tokenized whole, as lm-eval and users tokenize it), in batches
(left-padded, KV cache), in the runtime's inference dtype; rows of a padded vocabulary are never chosen. An answer
is the text of its tokens' bytes (the longest valid UTF-8 prefix) up to the end-of-turn token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tokenbridge.contracts import ANSWERS, MANIFEST, ModelCard, TeacherAnswersManifest
from tokenbridge.data.chat import Encoded, UnalignableExample, encode_continuation, encode_example
from tokenbridge.data.padding import left_pad
from tokenbridge.io import atomic_path, read_jsonl, write_jsonl
from tokenbridge.models import load_model, load_tokenizer
from tokenbridge.on_policy import valid_text
from tokenbridge.runtime import Runtime
from tokenbridge.sampling import completions, decode, generation_end_ids
from tokenbridge.token_bytes import special_ids, vocab_bytes


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The question as the user turn, then the assistant's turn opened: the chat template tokenized whole, as a
    user's generation (and lm-eval's) tokenizes it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy_answers(model_dir: Path, questions: list[str], max_new_tokens: int, batch_size: int,
                   runtime: Runtime) -> list[dict]:
    """Per question: `{"question", "answer", "ended"}`, the model's greedy answer in its own chat template;
    `ended` when it stopped at its end-of-turn token rather than at `max_new_tokens`."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, runtime.inference_dtype).eval().to(runtime.device)
    table, specials = vocab_bytes(tokenizer), special_ids(tokenizer)
    eos_ids = generation_end_ids(model) | {tokenizer.eos_token_id} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    vocab = len(tokenizer)
    records = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        ids, mask = (tensor.to(runtime.device) for tensor in
                     left_pad([_prompt_ids(tokenizer, question) for question in batch], pad))
        sequences = decode(model, ids, mask, max_new_tokens, lambda scores: scores[:, :vocab].argmax(-1), eos_ids, pad)
        for question, completion in zip(batch, completions(sequences, ids.shape[1], eos_ids)):
            ended = bool(completion) and completion[-1] in eos_ids
            text = b"".join(table[token] for token in completion[: len(completion) - ended] if token not in specials)
            records.append({"question": question, "answer": valid_text(text), "ended": ended})
    return records


def spelled_by(records: list[dict], model_dirs: list[Path]) -> list[dict]:
    """The answers every model's tokenizer can place on the byte stream after its own prompt (some vocabularies
    lack some bytes), in order."""
    readers = [(tokenizer, vocab_bytes(tokenizer)) for tokenizer in map(load_tokenizer, model_dirs)]

    def readable(record: dict) -> bool:
        try:
            for tokenizer, table in readers:
                encode_continuation(tokenizer, record["question"], record["answer"], record["ended"], table)
        except UnalignableExample:
            return False
        return True

    return [record for record in records if readable(record)]


def references(records: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Test records (`question`, `answer`) in `tokenizer`'s chat template, on the common byte stream (as `prepare`
    writes them): the reference answer and its end of turn are the targets."""
    table = vocab_bytes(tokenizer)
    return [encode_example(tokenizer, record["question"], record["answer"], table) for record in records]


def continuations(records: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Answers (`question`, `answer`, `ended`) as `tokenizer` reads another model's answer after its own prompt: the
    answer's text, then its end-of-turn token where the answer ended."""
    table = vocab_bytes(tokenizer)
    return [encode_continuation(tokenizer, record["question"], record["answer"], record["ended"], table)
            for record in records]


def write_greedy_answers(test_jsonl: Path, teacher_dir: Path, student_dir: Path, out_dir: Path, count: int,
                         max_new_tokens: int, batch_size: int, runtime: Runtime) -> TeacherAnswersManifest:
    """Writes `out_dir/answers.jsonl` (the first `count` test questions, each with the teacher's greedy answer) and
    its manifest, atomically. An answer the student's tokenizer cannot spell is left out (and counted), so every
    evaluated model is scored on the same answers. Stage teacher_answers writes the teacher's (data/teacher_answers);
    the transfer stage the original model's, with the moved model as the student (data/original_answers/<source>)."""
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
