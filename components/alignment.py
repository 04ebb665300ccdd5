"""ALM chunk alignment (spec section 1.5, "unconstrained" chunks) on common byte spans.

A chunk is a minimal pair of contiguous token spans, one per tokenizer, that cover exactly the same bytes.
We walk both token lists by their byte ends: when the ends agree, the tokens since the last agreement form
a chunk. Tokens without a span (template text, dropped specials) belong to no chunk; a chunk that would
have to step over such a gap on either side is discarded (the spec's `check=True` validation), so every
emitted chunk is byte-exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _spanned(spans: list[Span]) -> list[int]:
    return [index for index, span in enumerate(spans) if span is not None]


def _contiguous(spans: list[Span], indices: list[int]) -> bool:
    """The tokens are consecutive in the sequence and each starts where the previous one ended."""
    return all(
        b == a + 1 and spans[a][1] == spans[b][0]  # type: ignore[index]
        for a, b in zip(indices, indices[1:])
    )


def align_chunks(teacher_spans: list[Span], student_spans: list[Span]) -> list[Chunk]:
    """Minimal byte-exact chunks between two tokenizations of the same common byte stream, in order."""
    teacher, student = _spanned(teacher_spans), _spanned(student_spans)
    chunks: list[Chunk] = []
    i = j = 0
    i0 = j0 = 0
    while i < len(teacher) and j < len(student):
        t_end = teacher_spans[teacher[i]][1]  # type: ignore[index]
        s_end = student_spans[student[j]][1]  # type: ignore[index]
        if t_end == s_end:
            t_tokens, s_tokens = teacher[i0 : i + 1], student[j0 : j + 1]
            start = teacher_spans[t_tokens[0]][0]  # type: ignore[index]
            if (
                start == student_spans[s_tokens[0]][0]  # type: ignore[index]
                and _contiguous(teacher_spans, t_tokens)
                and _contiguous(student_spans, s_tokens)
            ):
                chunks.append(Chunk(t_tokens[0], t_tokens[-1] + 1, s_tokens[0], s_tokens[-1] + 1, start, t_end))
            i, j = i + 1, j + 1
            i0, j0 = i, j
        elif t_end < s_end:
            i += 1
        else:
            j += 1
    return chunks


def chunk_ids(chunks: list[Chunk], teacher_length: int, student_length: int,
              teacher_loss_mask: list[bool], student_loss_mask: list[bool]) -> tuple[list[int], list[int]]:
    """Per-token chunk index (-1 for none) for each side, keeping only chunks that are training targets.

    A chunk takes part in the loss when every token in it, on both sides, is a target and none of them is
    the sequence's first token (which no model predicts). Chunks are renumbered densely from 0.
    """
    teacher_ids = [-1] * teacher_length
    student_ids = [-1] * student_length
    kept = 0
    for chunk in chunks:
        if chunk.t0 == 0 or chunk.s0 == 0:
            continue
        if not (all(teacher_loss_mask[chunk.t0 : chunk.t1]) and all(student_loss_mask[chunk.s0 : chunk.s1])):
            continue
        teacher_ids[chunk.t0 : chunk.t1] = [kept] * (chunk.t1 - chunk.t0)
        student_ids[chunk.s0 : chunk.s1] = [kept] * (chunk.s1 - chunk.s0)
        kept += 1
    return teacher_ids, student_ids
