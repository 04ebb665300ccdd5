"""ALM chunk alignment ("unconstrained" chunks, docs/algorithms/alm.md#chunk-alignment) on common byte spans.

A chunk is a minimal pair of contiguous token spans, one per tokenizer, that cover exactly the same bytes.
Every token carries its span on the common byte stream (`tokenbridge.data.chat`); tokens without one
(template text, dropped specials) belong to no chunk. A chunk starts where both sides start a token and
ends at the first byte offset where both sides end one, walking only over consecutive tokens whose spans
touch: a chunk never steps over a gap, so every chunk is byte-exact by construction (the reference
implementation's `check=True` validation cannot fail).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenbridge.data.chat import Encoded

Span = tuple[int, int] | None


@dataclass(frozen=True)
class Chunk:
    """Half-open token ranges `[t0, t1)` (teacher) and `[s0, s1)` (student) covering bytes `[b0, b1)`."""

    t0: int
    t1: int
    s0: int
    s1: int
    b0: int
    b1: int


def _starts(spans: list[Span]) -> dict[int, int]:
    """Byte offset -> index of the token starting there (spans are non-empty and ordered, so offsets are unique)."""
    return {span[0]: index for index, span in enumerate(spans) if span is not None}


def _next_contiguous(spans: list[Span], index: int) -> int | None:
    """The token after `index` when it continues the byte run without a gap, else None."""
    following = index + 1
    if following < len(spans) and spans[following] is not None and spans[following][0] == spans[index][1]:  # type: ignore[index]
        return following
    return None


def align_chunks(teacher_spans: list[Span], student_spans: list[Span]) -> list[Chunk]:
    """All minimal byte-exact chunks between two tokenizations of the same common byte stream, in order."""
    teacher_starts, student_starts = _starts(teacher_spans), _starts(student_spans)
    chunks: list[Chunk] = []
    # Chunks come out disjoint: a common start inside a chunk is a common end too, where the walk stops.
    for start in sorted(teacher_starts.keys() & student_starts.keys()):
        i, j = teacher_starts[start], student_starts[start]
        t_end, s_end = teacher_spans[i][1], student_spans[j][1]  # type: ignore[index]
        while t_end != s_end:
            step = _next_contiguous(teacher_spans, i) if t_end < s_end else _next_contiguous(student_spans, j)
            if step is None:
                break
            if t_end < s_end:
                i, t_end = step, teacher_spans[step][1]  # type: ignore[index]
            else:
                j, s_end = step, student_spans[step][1]  # type: ignore[index]
        if t_end == s_end:
            chunks.append(Chunk(teacher_starts[start], i + 1, student_starts[start], j + 1, start, t_end))
    return chunks


def counted_chunks(teacher: Encoded, student: Encoded) -> list[tuple[Chunk, bool]]:
    """The chunks of one example that count, in order, each with whether it is a training target.

    Every chunk counts except one holding either side's token 0, which no model predicts. A chunk is a target when
    all its tokens, on both sides, are (answer and end of turn)."""
    return [(chunk, all(teacher.loss_mask[chunk.t0 : chunk.t1]) and all(student.loss_mask[chunk.s0 : chunk.s1]))
            for chunk in align_chunks(teacher.spans, student.spans) if chunk.t0 != 0 and chunk.s0 != 0]


def example_chunks(teacher: Encoded, student: Encoded) -> tuple[list[int], list[int], list[bool]]:
    """Per-token chunk ids of one example (-1: in no chunk) and, per chunk, whether it is a training target; the
    chunks are `counted_chunks`', numbered densely in order."""
    teacher_ids = [-1] * len(teacher.input_ids)
    student_ids = [-1] * len(student.input_ids)
    is_target: list[bool] = []
    for index, (chunk, target) in enumerate(counted_chunks(teacher, student)):
        teacher_ids[chunk.t0 : chunk.t1] = [index] * (chunk.t1 - chunk.t0)
        student_ids[chunk.s0 : chunk.s1] = [index] * (chunk.s1 - chunk.s0)
        is_target.append(target)
    return teacher_ids, student_ids, is_target
