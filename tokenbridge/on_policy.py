"""On-policy batches (GKD; docs/algorithms/gkd.md): the student samples each response, the teacher scores it.

On a share `distill.on_policy.fraction` (GKD's lambda) of the steps, the batch's questions are rendered with
the student's chat template, the student samples a response (no gradient through sampling), and the
training example becomes prompt + sample. For the teacher:

- same tokenizer: the very same token ids (the teacher scores the student's own tokens);
- different tokenizers: the student's text is re-tokenized by the teacher's tokenizer and chat template.
  Both sides' tokens are placed on the common byte stream (question bytes, then answer bytes, then one
  end-of-turn byte), so ALM (or any cross-tokenizer loss) aligns them by byte offsets, as on the dataset.

A sample is text only as far as its bytes decode: the teacher reads the longest prefix of the sample made
of non-special tokens that is valid UTF-8 (a byte-level student can stop inside a character), followed by
its end-of-turn token only when the sample ended there. Student tokens past that prefix align with nothing, and
so does the whole sample when the teacher's vocabulary cannot spell it (SmolLM2 has no token for some bytes).
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

from tokenbridge.config import OnPolicyParams
from tokenbridge.data.chat import Encoded, UnalignableExample, encode_continuation, encode_prompt
from tokenbridge.data.padding import left_pad
from tokenbridge.sampling import completions, decode, sample_next
from tokenbridge.token_bytes import special_ids, vocab_bytes


def is_on_policy_step(step: int, fraction: float, seed: int) -> bool:
    """Whether `step` (0-based) uses student samples: u < fraction with u ~ U[0, 1) seeded per step, so a
    resumed run makes the same choices and fraction 0 never (1 always) samples."""
    return random.Random(f"{seed}-on-policy-{step}").random() < fraction


def completion_example(prompt: Encoded, question_bytes: int, completion: list[int], table: list[bytes],
                       eos_ids: set[int], specials: set[int]) -> tuple[Encoded, bytes, bool]:
    """Prompt + sampled tokens as a training example: every sampled token is a target; each gets its span on
    the common stream from its bytes (the end-of-sequence token: the end-of-turn byte; other specials: none).

    Also returns the sample's text bytes (its leading run of non-special tokens) and whether the end-of-turn
    token follows that run directly."""
    spans, offset, text, plain = list(prompt.spans), question_bytes, [], True
    ended = False
    for token in completion:
        if token in eos_ids:
            spans.append((offset, offset + 1))
            ended = plain
            break
        if token in specials or not table[token]:
            spans.append(None)
            plain = False
            continue
        spans.append((offset, offset + len(table[token])))
        offset += len(table[token])
        if plain:
            text.append(table[token])
    example = Encoded(prompt.input_ids + completion, spans, prompt.loss_mask + [True] * len(completion))
    return example, b"".join(text), ended


def valid_text(data: bytes) -> str:
    """The longest prefix of `data` that is valid UTF-8, decoded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data[: error.start].decode("utf-8")


class OnPolicySampler:
    """Turns questions into on-policy training pairs (student example, teacher example) for one model pair."""

    def __init__(self, student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase | None,
                 eos_ids: set[int], params: OnPolicyParams, seed: int):
        """`teacher_tokenizer` None: the teacher shares the student's tokenizer and scores its token ids."""
        self.tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.table = vocab_bytes(student_tokenizer)
        self.teacher_table = vocab_bytes(teacher_tokenizer) if teacher_tokenizer is not None else None
        self.specials = special_ids(student_tokenizer)
        self.eos_ids = eos_ids | {student_tokenizer.eos_token_id} - {None}
        self.params, self.seed = params, seed

    def __call__(self, model: torch.nn.Module, questions: list[str], step: int) -> tuple[list[Encoded], list[Encoded]]:
        prompts = [encode_prompt(self.tokenizer, question, self.table) for question in questions]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        device = next(model.parameters()).device
        ids, mask = (tensor.to(device) for tensor in left_pad([p.input_ids for p in prompts], pad))
        generator = torch.Generator(device).manual_seed(random.Random(f"{self.seed}-sample-{step}").getrandbits(63))
        vocab, temperature = len(self.tokenizer), self.params.temperature
        sequences = decode(model, ids, mask, self.params.max_new_tokens,
                           lambda scores: sample_next(scores[:, :vocab], temperature, generator=generator),
                           self.eos_ids, pad)
        students, teachers = [], []
        for question, prompt, completion in zip(questions, prompts, completions(sequences, ids.shape[1], self.eos_ids)):
            example, text, ended = completion_example(prompt, len(question.encode("utf-8")), completion, self.table,
                                                      self.eos_ids, self.specials)
            students.append(example)
            if self.teacher_tokenizer is None:
                teachers.append(example)
            else:
                answer = valid_text(text)
                complete = ended and len(answer.encode("utf-8")) == len(text)
                try:
                    teachers.append(encode_continuation(self.teacher_tokenizer, question, answer, complete,
                                                        self.teacher_table))
                except UnalignableExample:  # the teacher's vocabulary cannot spell the sample: it aligns with nothing
                    teachers.append(encode_prompt(self.teacher_tokenizer, question, self.teacher_table))
        return students, teachers
