"""Render a (question, answer) pair with a model's own chat template and place its tokens on common bytes.

Teacher and student see the same content bytes but different template text. Every token gets a span on a
*common byte stream* shared by all models, or None when it covers template text:

    [0, P)        the question's UTF-8 bytes
    [P, P+R)      the answer's UTF-8 bytes
    [P+R, P+R+1)  one placeholder byte for the model's end-of-turn token (so both models' EOS align)

Where the content sits comes from the template's structure, never from a text search: the template renders
private-use sentinels in place of the question and the answer, and the text between them is the template's own
(`chat_layout`). The real rendering must be exactly that layout with the content put back; a template that
rewrites content (trims it, for example) makes the example unalignable for that model (`UnalignableExample`),
and `prepare` skips and counts it.

Each piece is tokenized on its own, as torchtune does: template text with its special tokens, and the question
and the answer as plain text, so a special-token string inside them (`<|im_end|>` typed by a user) is text,
never a control token, and no token straddles template and content. On the real models' templates this gives
the same ids as tokenizing the whole rendered text (docs/stages.md#prepare).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tokenbridge.token_bytes import byte_offsets

# Private-use characters: no template writes them, and whitespace trimming leaves them alone.
QUESTION_SENTINEL = "\ue000question\ue001"
ANSWER_SENTINEL = "\ue000answer\ue001"


class UnalignableExample(ValueError):
    """This model cannot read this example's content byte for byte: its template rewrites the text, or its
    tokenizer normalises it. Such an example is skipped (and counted), not force-aligned."""


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


@dataclass(frozen=True)
class ChatLayout:
    """A rendered chat as template text around the content: `before + question + between + answer + after`
    (with a generation prompt: `before + question + between`, which ends where the model's answer starts)."""

    before: str
    between: str
    after: str


def _messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _chat_text(tokenizer: PreTrainedTokenizerBase, question: str, answer: str | None) -> str:
    """The messages rendered by the chat template, as text; without an answer, up to the generation prompt."""
    text = tokenizer.apply_chat_template(_messages(question, answer), tokenize=False,
                                         add_generation_prompt=answer is None)
    assert isinstance(text, str)  # tokenize=False renders text; transformers types every return form
    return text


def chat_layout(tokenizer: PreTrainedTokenizerBase, with_answer: bool) -> ChatLayout:
    """The template's text around the question and the answer, found by rendering sentinels in their place."""
    text = _chat_text(tokenizer, QUESTION_SENTINEL, ANSWER_SENTINEL if with_answer else None)
    sentinels = [QUESTION_SENTINEL, ANSWER_SENTINEL] if with_answer else [QUESTION_SENTINEL]
    counts = [text.count(sentinel) for sentinel in sentinels]
    if counts != [1] * len(sentinels) or (with_answer and text.index(QUESTION_SENTINEL) > text.index(ANSWER_SENTINEL)):
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not render the user's and the "
                         f"assistant's content once each, in order (rendered {counts} times); tokenbridge needs a "
                         "template that writes each message's content verbatim")
    before, rest = text.split(QUESTION_SENTINEL)
    between, after = rest.split(ANSWER_SENTINEL) if with_answer else (rest, "")
    return ChatLayout(before, between, after)


def _layout_for(tokenizer: PreTrainedTokenizerBase, question: str, answer: str | None) -> ChatLayout:
    """The layout, checked against the real rendering: the template must keep the content verbatim."""
    layout = chat_layout(tokenizer, answer is not None)
    expected = layout.before + question + layout.between + (answer or "") + layout.after
    if _chat_text(tokenizer, question, answer) != expected:
        raise UnalignableExample(f"the chat template of {tokenizer.name_or_path!r} rewrites this example's question "
                                 "or answer (for example, trims its whitespace), so its bytes cannot be aligned")
    return layout


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str, answer: str,
                   table: list[bytes] | None = None) -> Encoded:
    """Tokenize the chat-formatted example and map each token onto the common byte stream."""
    layout = _layout_for(tokenizer, question, answer)
    return _encode_pieces(tokenizer, question, answer, [layout.before, layout.between, layout.after], table)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, question: str, table: list[bytes] | None = None) -> Encoded:
    """The generation prompt alone: what a model continues when it answers (on-policy sampling)."""
    return encode_continuation(tokenizer, question, "", False, table)


def encode_continuation(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, ended: bool,
                        table: list[bytes] | None = None) -> Encoded:
    """The generation prompt followed verbatim by `answer`, then the end-of-turn token when `ended`: how a model
    reads an answer another model sampled. Unlike `encode_example`, the chat template never sees the answer
    (some templates trim it, which would move its bytes)."""
    layout = _layout_for(tokenizer, question, None)
    end = tokenizer.eos_token if ended and tokenizer.eos_token else ""
    return _encode_pieces(tokenizer, question, answer, [layout.before, layout.between, end], table)


def _encode_pieces(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, template: list[str],
                   table: list[bytes] | None) -> Encoded:
    """Tokenize `template[0] + question + template[1] + answer + template[2]` piece by piece and place each token
    on the common byte stream; the end-of-turn token that opens `template[2]` is a target."""
    question_bytes, answer_bytes = len(question.encode("utf-8")), len(answer.encode("utf-8"))
    turn_end = question_bytes + answer_bytes
    eos = (tokenizer.eos_token or "").encode("utf-8")
    # (text, where its bytes start on the common stream or None for template text, whether its tokens are targets)
    pieces = [(template[0], None, False), (question, 0, False), (template[1], None, False),
              (answer, question_bytes, True), (template[2], None, False)]
    ids: list[int] = []
    spans: list[tuple[int, int] | None] = []
    loss_mask: list[bool] = []
    for index, (text, base, target) in enumerate(pieces):
        piece_ids = tokenizer(text, add_special_tokens=False, split_special_tokens=base is not None)["input_ids"]
        try:
            offsets = byte_offsets(tokenizer, piece_ids, text, table)
        except ValueError as error:
            raise UnalignableExample(str(error)) from None
        opens_with_eos = index == len(pieces) - 1 and bool(eos) and text.encode("utf-8").startswith(eos)
        for position, (token, (start, end)) in enumerate(zip(piece_ids, offsets)):
            span: tuple[int, int] | None = None
            is_target = False
            if base is not None and end > start:
                span, is_target = (base + start, base + end), target
            elif opens_with_eos and position == 0 and (start, end) == (0, len(eos)):
                span, is_target = (turn_end, turn_end + 1), True
            ids.append(token)
            spans.append(span)
            loss_mask.append(is_target)
    return Encoded(ids, spans, loss_mask)
