"""Render a (question, answer) pair with a model's own chat template and place its tokens on common bytes.

Teacher and student see the same content bytes but different template text. Every token gets a span on a
*common byte stream* shared by all models, or None when it covers template text:

    [0, P)        the question's UTF-8 bytes
    [P, P+R)      the answer's UTF-8 bytes
    [P+R, P+R+1)  one placeholder byte for the model's end-of-turn token (so both models' EOS align)

Tokens that cover template text (or straddle template and content) get no span; they are masked out of
cross-tokenizer losses rather than force-aligned (docs/algorithms/design.md#bytes-not-characters).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tokenbridge.token_bytes import byte_offsets


@dataclass(frozen=True)
class Encoded:
    """One example tokenized by one model."""

    input_ids: list[int]
    spans: list[tuple[int, int] | None]  # common-stream byte span of each token, None for template tokens
    loss_mask: list[bool]  # token is a training target: part of the answer or the end-of-turn token

    def to_json(self) -> dict:
        return {"input_ids": self.input_ids, "spans": [list(s) if s else None for s in self.spans],
                "loss_mask": [int(m) for m in self.loss_mask]}

    @classmethod
    def from_json(cls, record: dict) -> Encoded:
        return cls(record["input_ids"], [tuple(s) if s else None for s in record["spans"]],
                   [bool(m) for m in record["loss_mask"]])


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _byte_index(text: str, char_index: int) -> int:
    return len(text[:char_index].encode("utf-8"))


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
               add_generation_prompt: bool = False) -> str:
    """The messages rendered by the chat template, as text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str)  # tokenize=False renders text; transformers types every return form
    return text


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str, answer: str,
                   table: list[bytes] | None = None) -> Encoded:
    """Tokenize the chat-formatted example and map each token onto the common byte stream."""
    text = _chat_text(tokenizer, chat_messages(question, answer))
    q_char = text.find(question)
    a_char = text.find(answer, q_char + len(question))
    if q_char < 0 or a_char < 0:
        raise ValueError("the chat template changed the question or answer text; byte alignment needs it verbatim")
    return _encode_text(tokenizer, text, q_char, question, a_char, answer, table)


def generation_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The question rendered with the chat template up to where the model's answer starts."""
    return _chat_text(tokenizer, chat_messages(question), add_generation_prompt=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, question: str, table: list[bytes] | None = None) -> Encoded:
    """The generation prompt alone: what a model continues when it answers (on-policy sampling)."""
    return encode_continuation(tokenizer, question, "", False, table)


def encode_continuation(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, ended: bool,
                        table: list[bytes] | None = None) -> Encoded:
    """The generation prompt followed verbatim by `answer`, then the end-of-turn token when `ended`, tokenized
    as one text: how a model reads an answer another model sampled. Unlike `encode_example`, the chat template
    never sees the answer (some templates trim it, which would move its bytes)."""
    prompt = generation_prompt(tokenizer, question)
    q_char = prompt.find(question)
    if q_char < 0:
        raise ValueError("the chat template changed the question text; byte alignment needs it verbatim")
    text = prompt + answer + (tokenizer.eos_token if ended and tokenizer.eos_token else "")
    return _encode_text(tokenizer, text, q_char, question, len(prompt), answer, table)


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str, q_char: int, question: str, a_char: int, answer: str,
                 table: list[bytes] | None) -> Encoded:
    """Tokenize `text`, in which the question starts at character `q_char` and the answer at `a_char`, and
    place each token on the common byte stream; the end-of-turn token right after the answer is a target."""
    q0, q1 = _byte_index(text, q_char), _byte_index(text, q_char + len(question))
    a0, a1 = _byte_index(text, a_char), _byte_index(text, a_char + len(answer))
    eos = tokenizer.eos_token or ""
    eot = (a1, a1 + len(eos.encode("utf-8"))) if eos and text[a_char + len(answer):].startswith(eos) else None
    prompt_len, answer_len = q1 - q0, a1 - a0

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spans: list[tuple[int, int] | None] = []
    loss_mask: list[bool] = []
    for start, end in byte_offsets(tokenizer, ids, text, table):
        span: tuple[int, int] | None = None
        target = False
        if start == end:
            pass
        elif q0 <= start and end <= q1:
            span = (start - q0, end - q0)
        elif a0 <= start and end <= a1:
            span, target = (prompt_len + start - a0, prompt_len + end - a0), True
        elif eot and (start, end) == eot:
            span, target = (prompt_len + answer_len, prompt_len + answer_len + 1), True
        spans.append(span)
        loss_mask.append(target)
    return Encoded(ids, spans, loss_mask)
