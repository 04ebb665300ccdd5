"""Alignment invariants of spec section 1.23 (items 1, 2, 10) on real, deliberately different tokenizers."""

from __future__ import annotations

import random

import pytest

from components.alignment import align_chunks, chunk_ids
from components.data.chat import encode_example
from components.models.token_bytes import byte_offsets

TEXTS = [
    "Tom has 3 apples and buys 12 more. How many?",
    "Café crème costs 4,50 € — naïve résumé 😀 中文 🇫🇷\t tabs\n\nnewlines   spaces",
    "x" * 40 + " 1234567890 ×÷≠ ∑ <|im_end|> <eot> literal markers",
]


def _random_text(rng: random.Random) -> str:
    alphabet = list("abcdefghij XYZ0123456789.,;\n\t") + ["é", "ß", "€", "中", "文", "😀", "👍🏽", "∑", "  ", "\n\n"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))


def _concat(spans, start, end):
    return spans[start][0], spans[end - 1][1]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_identical_tokenizers_give_one_chunk_per_token(tiny_tokenizers, role):
    tokenizer = tiny_tokenizers[role]
    for question in TEXTS:
        encoded = encode_example(tokenizer, question, "It is 15.\n#### 15")
        chunks = align_chunks(encoded.spans, encoded.spans)
        spanned = [i for i, span in enumerate(encoded.spans) if span is not None]
        assert len(chunks) == len(spanned)
        assert all(c.t1 - c.t0 == 1 and c.s1 - c.s0 == 1 and c.t0 == c.s0 for c in chunks)


def test_chunks_are_byte_exact_ordered_and_cover_the_content(tiny_tokenizers):
    """Property test over random unicode text: every chunk's teacher and student bytes are identical."""
    teacher, student = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    rng = random.Random(0)
    for question in TEXTS + [_random_text(rng) for _ in range(150)]:
        answer = _random_text(rng)
        t, s = encode_example(teacher, question, answer), encode_example(student, question, answer)
        content = (question + answer).encode("utf-8") + b"\x00"  # the common stream, with the EOT placeholder
        chunks = align_chunks(t.spans, s.spans)
        assert chunks, "no chunk at all"
        previous_end = 0
        covered = 0
        for chunk in chunks:
            assert _concat(t.spans, chunk.t0, chunk.t1) == (chunk.b0, chunk.b1) == _concat(s.spans, chunk.s0, chunk.s1)
            assert chunk.b0 >= previous_end, "chunks overlap or are out of order"
            previous_end = chunk.b1
            covered += chunk.b1 - chunk.b0
        # Tokens only lose their span where they straddle template text, so almost all content is covered.
        assert covered >= len(content) - 8


def test_end_of_turn_special_tokens_align_to_each_other(tiny_tokenizers):
    teacher, student = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    t = encode_example(teacher, "What is 2+2?", "4\n#### 4")
    s = encode_example(student, "What is 2+2?", "4\n#### 4")
    last = align_chunks(t.spans, s.spans)[-1]
    assert teacher.convert_ids_to_tokens(t.input_ids[last.t0 : last.t1]) == ["<|im_end|>"]
    assert student.convert_ids_to_tokens(s.input_ids[last.s0 : last.s1]) == ["<eot>"]
    assert t.loss_mask[last.t0] and s.loss_mask[last.s0]


def test_template_tokens_have_no_span_and_are_not_targets(tiny_tokenizers):
    student = tiny_tokenizers["student"]
    encoded = encode_example(student, "Q?", "A.\n#### 1")
    tokens = student.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[0] == "<bos>" and encoded.spans[0] is None and not encoded.loss_mask[0]
    assert not any(encoded.loss_mask[i] for i, span in enumerate(encoded.spans) if span and span[1] <= 2)


def test_byte_offsets_cover_multibyte_characters_split_across_tokens(tiny_tokenizers):
    for tokenizer in tiny_tokenizers.values():
        text = "😀中文€"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        spans = byte_offsets(tokenizer, ids, text)
        assert spans[0][0] == 0 and spans[-1][1] == len(text.encode("utf-8"))
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(ids) > len(text), "expected byte pieces inside characters for this tiny vocabulary"


def test_masking_the_prompt_removes_exactly_the_prompt_chunks(tiny_tokenizers):
    teacher, student = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    question, answer = "How many legs do 3 cats have?", "3 × 4 = 12\n#### 12"
    t, s = encode_example(teacher, question, answer), encode_example(student, question, answer)
    chunks = align_chunks(t.spans, s.spans)
    prompt_bytes = len(question.encode("utf-8"))
    t_ids, s_ids = chunk_ids(chunks, len(t.input_ids), len(s.input_ids), t.loss_mask, s.loss_mask)
    kept = max(t_ids) + 1
    assert kept == sum(1 for c in chunks if c.b0 >= prompt_bytes)
    assert max(s_ids) + 1 == kept
    everything = [True] * len(t.input_ids), [True] * len(s.input_ids)
    t_all, _ = chunk_ids(chunks, len(t.input_ids), len(s.input_ids), *everything)
    assert max(t_all) + 1 == sum(1 for c in chunks if c.t0 > 0 and c.s0 > 0)
