"""Alignment invariants (docs/algorithms/alm.md#invariants, items 1, 2, 3, 5, 6, 10) on real, deliberately
different tokenizers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tokenbridge.alignment import align_chunks, example_chunks
from tokenbridge.data.chat import Encoded, encode_example
from tokenbridge.losses.alm import word_chunks
from tokenbridge.models.tiny import PLAIN_TEMPLATE
from tokenbridge.token_bytes import boundary_mask, byte_offsets, vocab_bytes

TEXTS = [
    "Tom has 3 apples and buys 12 more. How many?",
    "Café crème costs 4,50 € — naïve résumé 😀 中文 🇫🇷\t tabs\n\nnewlines   spaces",
    "x" * 40 + " 1234567890 ×÷≠ ∑ literal markers",
]
FRAGMENTS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "😀", "👍🏽", "🇫🇷", "中文", "é", "ß", "€", "∑",
             "0", "42", "3.14", "1,000,000", "x", "the", " word", "####", ".", "?", ",", ";", "\n.", " ."]
# Any character but surrogates, control characters and "▁" (SentencePiece's space symbol, which the
# SentencePiece-style tokenizer could not give back as bytes).
CHARACTERS = st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="▁")
RANDOM_TEXT = st.lists(st.one_of(st.text(CHARACTERS, min_size=1, max_size=4), st.sampled_from(FRAGMENTS)),
                       max_size=12).map("".join)
# The prefixes keep each text findable in the rendered chat template (a bare "s" would match "user").
QUESTIONS = RANDOM_TEXT.map(lambda text: "Q: " + text)
ANSWERS = RANDOM_TEXT.map(lambda text: "A: " + text)
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _token_bytes(table: list[bytes], encoded: Encoded, start: int, end: int) -> bytes:
    return b"".join(table[index] for index in encoded.input_ids[start:end])


def _chain_ends(spans, start_index: int) -> list[int]:
    """Byte ends reachable from a token by walking consecutive tokens whose spans touch."""
    ends, index = [], start_index
    while True:
        ends.append(spans[index][1])
        following = index + 1
        if following >= len(spans) or spans[following] is None or spans[following][0] != spans[index][1]:
            return ends
        index = following


def _all_minimal_chunks(teacher_spans, student_spans) -> list[tuple[int, int]]:
    """Oracle: from every byte where both sides start a token, the nearest byte both contiguous runs reach."""
    teacher_starts = {span[0]: i for i, span in enumerate(teacher_spans) if span}
    student_starts = {span[0]: i for i, span in enumerate(student_spans) if span}
    chunks = []
    for start in sorted(teacher_starts.keys() & student_starts.keys()):
        common = (set(_chain_ends(teacher_spans, teacher_starts[start]))
                  & set(_chain_ends(student_spans, student_starts[start])))
        if common:
            chunks.append((start, min(common)))
    return chunks


@pytest.fixture(scope="module")
def tables(tiny_tokenizers):
    return {role: vocab_bytes(tokenizer) for role, tokenizer in tiny_tokenizers.items()}


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level student: one token per byte, no merges, plain chat format."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<bos>", "<eot>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eot>", bos_token="<bos>",
                                        pad_token="<pad>")
    tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


def _check_byte_exact_ordered_chunks(teacher_tokenizer, student_tokenizer, teacher_table, student_table,
                                     question: str, answer: str) -> tuple[Encoded, Encoded, list]:
    """Every chunk's two token spans spell the same bytes of the common stream, in order, without overlap,
    and the chunks are exactly all the minimal byte-exact chunks there are."""
    teacher, student = (encode_example(teacher_tokenizer, question, answer),
                        encode_example(student_tokenizer, question, answer))
    stream = (question + answer).encode("utf-8")
    chunks = align_chunks(teacher.spans, student.spans)
    previous = None
    for chunk in chunks:
        assert teacher.spans[chunk.t0][0] == student.spans[chunk.s0][0] == chunk.b0
        assert teacher.spans[chunk.t1 - 1][1] == student.spans[chunk.s1 - 1][1] == chunk.b1
        if chunk.b0 < len(stream):
            spelled = stream[chunk.b0 : chunk.b1]
            assert _token_bytes(teacher_table, teacher, chunk.t0, chunk.t1) == spelled
            assert _token_bytes(student_table, student, chunk.s0, chunk.s1) == spelled
        else:  # the end-of-turn placeholder byte: each side's own end-of-turn token
            assert teacher.input_ids[chunk.t0 : chunk.t1] == [teacher_tokenizer.eos_token_id]
            assert student.input_ids[chunk.s0 : chunk.s1] == [student_tokenizer.eos_token_id]
        if previous:
            assert chunk.b0 >= previous.b1 and chunk.t0 >= previous.t1 and chunk.s0 >= previous.s1
        previous = chunk
    assert [(c.b0, c.b1) for c in chunks] == _all_minimal_chunks(teacher.spans, student.spans)
    return teacher, student, chunks


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_identical_tokenizers_give_one_chunk_per_spanned_token(tiny_tokenizers, role):
    tokenizer = tiny_tokenizers[role]
    for question in TEXTS:
        encoded = encode_example(tokenizer, question, "It is 15.\n#### 15")
        teacher_ids, student_ids, is_target = example_chunks(encoded, encoded)
        spanned = [i for i, span in enumerate(encoded.spans) if span is not None and i > 0]
        assert teacher_ids == student_ids
        assert [teacher_ids[i] for i in spanned] == list(range(len(spanned)))
        assert all(teacher_ids[i] == -1 for i in range(len(encoded.spans)) if i not in spanned)
        assert is_target == [encoded.loss_mask[i] for i in spanned]


@PROPERTY
@given(question=QUESTIONS, answer=ANSWERS)
def test_chunks_are_byte_exact_ordered_disjoint_and_all_minimal_chunks(tiny_tokenizers, tables, question, answer):
    _check_byte_exact_ordered_chunks(tiny_tokenizers["teacher"], tiny_tokenizers["student"], tables["teacher"],
                                     tables["student"], question, answer)


@pytest.mark.parametrize("question", TEXTS)
def test_chunks_cover_all_content_bytes_of_ordinary_texts(tiny_tokenizers, tables, question):
    answer = "3 × 4 = 12 apples 🍎\n#### 12"
    *_, chunks = _check_byte_exact_ordered_chunks(tiny_tokenizers["teacher"], tiny_tokenizers["student"],
                                                  tables["teacher"], tables["student"], question, answer)
    covered = sum(chunk.b1 - chunk.b0 for chunk in chunks)
    # Only a token straddling template text and content (at the 4 edges of question and answer) loses its span.
    assert covered >= len((question + answer).encode("utf-8")) + 1 - 4


@PROPERTY
@given(question=QUESTIONS, answer=ANSWERS)
def test_byte_level_student_chunks_are_whole_teacher_tokens(tiny_tokenizers, tables, byte_tokenizer, question, answer):
    teacher_tokenizer = tiny_tokenizers["teacher"]
    teacher, student, chunks = _check_byte_exact_ordered_chunks(
        teacher_tokenizer, byte_tokenizer, tables["teacher"], vocab_bytes(byte_tokenizer), question, answer)
    assert all(chunk.t1 - chunk.t0 == 1 for chunk in chunks)
    assert all(chunk.s1 - chunk.s0 == chunk.b1 - chunk.b0 for chunk in chunks)  # one student token per byte
    assert len(chunks) <= len(teacher.input_ids)


def test_a_prefix_space_added_by_one_tokenizer_still_aligns(tiny_tokenizers):
    """Invariant 5: a dummy prefix space (SentencePiece `add_prefix_space`) is absorbed into the first token."""
    text = "Hello world"
    teacher, student = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    teacher_ids = teacher(text, add_special_tokens=False)["input_ids"]
    prefixed_ids = student(" " + text, add_special_tokens=False)["input_ids"]  # what a prefix-adding tokenizer emits
    teacher_spans = byte_offsets(teacher, teacher_ids, text)
    student_spans = byte_offsets(student, prefixed_ids, text)
    chunks = align_chunks(teacher_spans, student_spans)
    assert chunks[0].b0 == 0 and chunks[-1].b1 == len(text)
    assert sum(chunk.b1 - chunk.b0 for chunk in chunks) == len(text)


def test_a_chunk_never_steps_over_a_byte_gap():
    """Bytes 2-3 are missing on the teacher side (a span-less token), so no chunk can contain them."""
    teacher_spans = [(0, 2), (3, 5), (5, 6)]
    student_spans = [(0, 5), (5, 6)]
    assert [(c.b0, c.b1) for c in align_chunks(teacher_spans, student_spans)] == [(5, 6)]


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


def test_example_chunks_number_all_chunks_and_mark_exactly_the_answer_ones_as_targets(tiny_tokenizers):
    teacher, student = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    question, answer = "How many legs do 3 cats have?", "3 × 4 = 12\n#### 12"
    t, s = encode_example(teacher, question, answer), encode_example(student, question, answer)
    chunks = align_chunks(t.spans, s.spans)
    teacher_ids, student_ids, is_target = example_chunks(t, s)
    kept = [chunk for chunk in chunks if chunk.t0 > 0 and chunk.s0 > 0]
    assert len(is_target) == len(kept) and max(teacher_ids) == max(student_ids) == len(kept) - 1
    assert is_target == [chunk.b0 >= len(question.encode("utf-8")) for chunk in kept]
    for index, chunk in enumerate(kept):
        assert teacher_ids[chunk.t0 : chunk.t1] == [index] * (chunk.t1 - chunk.t0)
        assert student_ids[chunk.s0 : chunk.s1] == [index] * (chunk.s1 - chunk.s0)


def test_example_chunks_leave_out_token_zero_on_either_side_and_need_targets_on_both_sides():
    """Token 0 is never predicted, so a chunk holding either side's token 0 has no likelihood there."""
    teacher = Encoded([10, 11, 12, 13], [None, (0, 2), (2, 3), (3, 5)], [False, True, True, True])
    student = Encoded([20, 21, 22, 23], [(0, 1), (1, 2), (2, 3), (3, 5)], [True, True, False, True])
    # Chunks: bytes [0, 2) holds the student's token 0; [2, 3) is no target on the student side; [3, 5) is.
    assert example_chunks(teacher, student) == ([-1, -1, 0, 1], [-1, -1, 0, 1], [False, True])


def test_space_chunks_merge_unless_both_next_tokens_start_a_word_and_count_only_all_target_words():
    chunks = torch.tensor([[-1, 0, 1, 2, 3]])
    teacher_word_start = torch.tensor([[False, True, False, True, True]])
    student_word_start = torch.tensor([[False, True, False, False, True]])  # token 3 starts a word for one side only
    counted = torch.tensor([[True, False, True, True]])
    teacher_words, student_words, word_counted = word_chunks(chunks, chunks, teacher_word_start, student_word_start,
                                                             counted)
    assert teacher_words.tolist() == student_words.tolist() == [[-1, 0, 0, 0, 1]]
    assert word_counted.tolist() == [[False, True, False, False]]


@PROPERTY
@given(question=QUESTIONS, answer=ANSWERS)
def test_space_chunks_end_only_where_both_sides_start_a_word_or_the_run_breaks(tiny_tokenizers, question, answer):
    """Invariant 6: a word column ends after a minimal chunk exactly when the next teacher token and the
    next student token both start a word (whitespace-initial or special), or the next chunk does not follow
    directly on both sides (template text between)."""
    sides = {}
    for role in ("teacher", "student"):
        tokenizer = tiny_tokenizers[role]
        encoded = encode_example(tokenizer, question, answer)
        word_start = boundary_mask(tokenizer, len(tokenizer))[torch.tensor(encoded.input_ids)].tolist()
        sides[role] = (encoded, word_start)
    (teacher, teacher_ws), (student, student_ws) = sides["teacher"], sides["student"]
    teacher_ids, student_ids, is_target = example_chunks(teacher, student)
    columns_t, columns_s, column_counted = word_chunks(
        torch.tensor([teacher_ids]), torch.tensor([student_ids]), torch.tensor([teacher_ws]),
        torch.tensor([student_ws]), torch.tensor([is_target]))
    columns_t, columns_s, column_counted = columns_t[0].tolist(), columns_s[0].tolist(), column_counted[0].tolist()

    def tokens_of(ids, chunk):
        return [i for i, value in enumerate(ids) if value == chunk]

    column_of = []  # the column of each minimal chunk, read back from the relabelled tokens
    for chunk in range(len(is_target)):
        t_tokens, s_tokens = tokens_of(teacher_ids, chunk), tokens_of(student_ids, chunk)
        assert {columns_t[i] for i in t_tokens} | {columns_s[i] for i in s_tokens} == {columns_t[t_tokens[0]]}
        column_of.append(columns_t[t_tokens[0]])
    assert column_of == sorted(column_of) and sorted(set(column_of)) == list(range(len(set(column_of))))
    for chunk in range(len(is_target) - 1):
        t_last, s_last = tokens_of(teacher_ids, chunk)[-1], tokens_of(student_ids, chunk)[-1]
        follows = teacher_ids[t_last + 1] == chunk + 1 and student_ids[s_last + 1] == chunk + 1
        both_start_words = teacher_ws[t_last + 1] and student_ws[s_last + 1]
        assert (column_of[chunk + 1] != column_of[chunk]) == (both_start_words or not follows)
    for column in set(column_of):
        members = [chunk for chunk, value in enumerate(column_of) if value == column]
        assert column_counted[column] == all(is_target[chunk] for chunk in members)
    assert not any(column_counted[len(set(column_of)):])
