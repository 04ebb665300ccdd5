"""Stage `teacher_answers`: the teacher's own greedy answers to the first held-out questions, generated once.

The evaluate stages score every model's bits-per-byte on these answers beside the reference answers: how
likely a student finds what its teacher would say, the quantity distillation moves and next-token training on
the references does not target (docs/evaluation.md#distance-from-the-teacher). Greedy decoding in the
teacher's chat template, in batches (left-padded, KV cache), in the runtime's inference dtype. An answer is its
text up to the end-of-turn token (or `max_new_tokens`), decoded from the tokens' bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tokenbridge.contracts import MANIFEST, ModelCard, TeacherAnswersManifest
from tokenbridge.data.chat import UnalignableExample, encode_continuation
from tokenbridge.data.padding import left_pad
from tokenbridge.io import atomic_path, read_jsonl, write_jsonl
from tokenbridge.models import load_model, load_tokenizer
from tokenbridge.on_policy import valid_text
from tokenbridge.runtime import Runtime
from tokenbridge.sampling import completions, decode, generation_end_ids
from tokenbridge.token_bytes import special_ids, vocab_bytes

ANSWERS = "answers.jsonl"


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


def _readable(record: dict, tokenizers: list[PreTrainedTokenizerBase]) -> bool:
    """Whether every tokenizer can place the answer on the byte stream (some vocabularies lack some bytes)."""
    try:
        for tokenizer in tokenizers:
            encode_continuation(tokenizer, record["question"], record["answer"], record["ended"])
    except UnalignableExample:
        return False
    return True


def run_teacher_answers(test_jsonl: Path, teacher_dir: Path, student_dir: Path, out_dir: Path, count: int,
                        max_new_tokens: int, batch_size: int, runtime: Runtime) -> TeacherAnswersManifest:
    """Writes `out_dir/answers.jsonl` (the first `count` test questions, each with the teacher's greedy answer) and
    its manifest, atomically. An answer the student's tokenizer cannot spell is left out (and counted), so every
    evaluated model is scored on the same answers."""
    questions = [record["question"] for record in read_jsonl(test_jsonl)[:count]]
    generated = greedy_answers(teacher_dir, questions, max_new_tokens, batch_size, runtime)
    readers = [load_tokenizer(teacher_dir), load_tokenizer(student_dir)]
    records = [record for record in generated if _readable(record, readers)]
    manifest = TeacherAnswersManifest(teacher=ModelCard.of(teacher_dir).name, examples=len(records),
                                      unreadable=len(generated) - len(records),
                                      ended=sum(record["ended"] for record in records),
                                      max_new_tokens=max_new_tokens, dtype=runtime.inference_dtype_name)
    with atomic_path(out_dir) as staging:
        staging.mkdir(parents=True)
        write_jsonl(staging / ANSWERS, records)
        manifest.write(staging / MANIFEST)
    return manifest
