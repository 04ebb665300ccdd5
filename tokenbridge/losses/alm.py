"""ALM: approximate likelihood matching across tokenizers (docs/algorithms/alm.md#the-loss-in-one-formula).

For each aligned chunk, both models' chunk log-likelihoods (sums of their token log-probs over the chunk)
are compared through a binarised divergence of the tempered probabilities `exp(l / tau)`. With
`merge_by_space_prob`, consecutive chunks are merged until the teacher puts more than `gamma` of its mass
on a word boundary next; with `append_space`, each (merged) chunk's likelihood is multiplied by the
probability that a boundary follows, which removes most tokenization bias. The `space` chunk variant first
merges minimal chunks into whole words (docs/algorithms/alm.md#chunk-variants).

Chunks arrive as per-token ids (-1: in no chunk), so chunk sums are scatter-adds, O(B * L) rather than the
reference's dense [B, L, C] matrices. Log-prob inputs follow the row convention: row `j` is the distribution
after token `j`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from tokenbridge.config import Strict
from tokenbridge.losses.base import (
    Alignment,
    DistillLoss,
    LossOutput,
    LossSetup,
    Mean,
    StudentView,
    TeacherView,
    masked_mean,
    register,
)
from tokenbridge.losses.positions import rows_to_tokens

EPS = 1e-6  # kept inside the exponent: tempered probabilities stay below 1, so log(1 - b) is finite


class AlmParams(Strict):
    """ALM loss options (docs/algorithms/alm.md#binarised-divergence); defaults are the paper's recommended
    configuration (docs/algorithms/alm.md#defaults)."""

    binarization_temp: float = Field(100.0, gt=0, description="tau: chunk probabilities are raised to 1/tau")
    diff_fn: Literal["binary_ce", "binary_kl", "reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit",
                     "joschu_k2", "joschu_k3"] = Field(
        "binary_ce", description="per-chunk distance; binary_ce has binary_kl's gradient")
    chunks: Literal["unconstrained", "space"] = Field(
        "unconstrained", description="unconstrained: minimal byte-exact chunks; space: merged into whole words")
    merge_by_space_prob: bool = Field(True, description="merge chunks until the teacher's boundary prob > gamma")
    append_space: bool = Field(True, description="debias: multiply each chunk's likelihood by P(a boundary follows)")
    boundary_threshold: float = Field(0.1, ge=0, le=1, description="gamma of merge_by_space_prob: a probability")
    mask_prompt: bool = Field(True, description="only answer chunks count; false: prompt chunks count too")


@dataclass(frozen=True)
class AlmOptions:
    binarization_temp: float = 100.0
    diff_fn: str = "binary_ce"
    merge_by_space_prob: bool = True
    append_space: bool = True
    boundary_threshold: float = 0.1


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_complement_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log((1 - a) / (1 - b)) for a = exp(log_a), b = exp(log_b), both < 1, to within a few ulps of its own size.

    The difference log1mexp(log_a) - log1mexp(log_b) cancels when the two are close and large (a, b near 1:
    log(1e-6) - log(2e-6) loses five of fp32's seven digits). Where the ratio is within 1/2 of 1 this takes
    log1p((b - a) / (1 - b)) instead, with b - a as the larger probability times expm1 of the (non-positive) log
    difference, so no cancellation is left; elsewhere the log of the ratio, whose terms -expm1 computes exactly
    enough."""
    not_a, not_b = -torch.expm1(log_a), -torch.expm1(log_b)
    gap = log_b - log_a
    b_minus_a = torch.where(gap <= 0, log_a.exp() * torch.expm1(gap.clamp(max=0)),
                            -log_b.exp() * torch.expm1((-gap).clamp(max=0)))
    relative = b_minus_a / not_b  # (1 - a) / (1 - b) - 1
    close = relative.abs() < 0.5
    return torch.where(close, torch.log1p(relative.clamp(-0.5, 0.5)), torch.log(not_a / not_b))


def chunk_divergence(teacher: torch.Tensor, student: torch.Tensor, diff_fn: str, tau: float) -> torch.Tensor:
    """Per-chunk distance between chunk log-likelihoods `teacher`, `student` (both <= 0),
    docs/algorithms/alm.md#binarised-divergence.

    The binarised divergences compare Bernoulli(a) with Bernoulli(b), a = exp(teacher / tau - eps),
    b = exp(student / tau - eps); the teacher is always the first argument. At tau = 100 most chunks have a, b
    near 1, so 1 - a is computed as -expm1(log a): in fp32, 1 - exp(log a) would lose most of its digits.
    """
    log_a, log_b = teacher / tau - EPS, student / tau - EPS
    a, b = log_a.exp(), log_b.exp()
    not_a, not_b = -torch.expm1(log_a), -torch.expm1(log_b)
    if diff_fn == "binary_ce":
        return -(a * log_b + not_a * log1mexp(log_b))
    if diff_fn == "binary_kl":
        return a * (log_a - log_b) + not_a * log_complement_ratio(log_a, log_b)
    if diff_fn == "reverse_binary_kl":
        return b * (log_b - log_a) + not_b * log_complement_ratio(log_b, log_a)
    if diff_fn == "abs_exp":
        return b * torch.expm1(log_a - log_b).abs()
    if diff_fn == "abs":
        return (teacher - student).abs()
    if diff_fn == "binary_kl_temp_limit":
        t, s = teacher - EPS, student - EPS
        return (t - s) + t * torch.log(s / t)
    if diff_fn == "joschu_k2":
        return (log_a - log_b).square() / 2
    if diff_fn == "joschu_k3":
        ratio = log_a - log_b
        return torch.expm1(ratio) - ratio
    raise ValueError(f"unknown ALM diff_fn {diff_fn!r}; allowed: binary_ce, binary_kl, reverse_binary_kl, abs_exp, "
                     "abs, binary_kl_temp_limit, joschu_k2, joschu_k3")


def _chunk_sums(values: torch.Tensor, chunks: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Sum of `values` per chunk id ([B, C]); tokens with id -1 go to a discarded extra slot."""
    slots = torch.where(chunks < 0, num_chunks, chunks)
    out = torch.zeros(values.shape[0], num_chunks + 1, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, slots, values)[:, :num_chunks]


def chunk_extent(chunks: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each chunk's first and last token ([B, C] each); a chunk without tokens gets (L, -1)."""
    batch, length = chunks.shape
    slots = torch.where(chunks < 0, num_chunks, chunks)
    positions = torch.arange(length, device=chunks.device).expand_as(chunks)
    first = torch.full((batch, num_chunks + 1), length, dtype=torch.long, device=chunks.device)
    last = torch.full((batch, num_chunks + 1), -1, dtype=torch.long, device=chunks.device)
    first = first.scatter_reduce(1, slots, positions, reduce="amin", include_self=True)
    last = last.scatter_reduce(1, slots, positions, reduce="amax", include_self=True)
    return first[:, :num_chunks], last[:, :num_chunks]


def _runs(ends: torch.Tensor) -> torch.Tensor:
    """Run index per slot, where a run ends at (and includes) every slot flagged in `ends`."""
    ends = ends.long()
    return torch.cumsum(ends, dim=1) - ends


def _group_any(flags: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(groups).scatter_reduce(1, groups, flags.long(), reduce="amax", include_self=True) > 0


def word_chunks(
    teacher_chunks: torch.Tensor, student_chunks: torch.Tensor, teacher_word_start: torch.Tensor,
    student_word_start: torch.Tensor, counted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `space` variant (docs/algorithms/alm.md#chunk-variants): consecutive minimal chunks merged into whole words.

    A word ends after a chunk when the next teacher token and the next student token both start a word
    (whitespace-initial or special), or when the next chunk does not follow directly on both sides (template
    text lies between: the reference closes a chunk at every special token). Returns relabelled per-token
    ids and, per word, whether it counts: all its chunks count.
    """
    num_chunks = counted.shape[1]
    teacher_first, teacher_last = chunk_extent(teacher_chunks, num_chunks)
    student_first, student_last = chunk_extent(student_chunks, num_chunks)

    def starts_word_after(word_start: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        after_end = torch.ones_like(word_start[:, :1])  # the sequence end is a boundary
        return torch.cat([word_start, after_end], dim=1).gather(1, last + 1)

    word_after = starts_word_after(teacher_word_start.bool(), teacher_last) & starts_word_after(
        student_word_start.bool(), student_last)
    adjacent = (teacher_first[:, 1:] == teacher_last[:, :-1] + 1) & (student_first[:, 1:] == student_last[:, :-1] + 1)
    follows = torch.cat([adjacent, torch.zeros_like(adjacent[:, :1])], dim=1)
    words = _runs(word_after | ~follows)

    present = teacher_last >= 0
    slots = torch.where(present, words, num_chunks)
    all_counted = torch.ones(counted.shape[0], num_chunks + 1, dtype=torch.long, device=counted.device)
    all_counted = all_counted.scatter_reduce(1, slots, counted.long(), reduce="amin", include_self=True)[:, :num_chunks]
    word_counted = (all_counted > 0) & _group_any(present, words)

    def relabel(chunks: torch.Tensor) -> torch.Tensor:
        return torch.where(chunks < 0, -1, words.gather(1, chunks.clamp(min=0)))

    return relabel(teacher_chunks), relabel(student_chunks), word_counted


@dataclass
class AlmResult:
    loss: torch.Tensor
    num_chunks: torch.Tensor  # valid (merged) chunks in the batch
    teacher_chunk_logprob: torch.Tensor  # mean over valid chunks (diagnostic)
    student_chunk_logprob: torch.Tensor


def alm_loss(
    teacher_token_rows: torch.Tensor, teacher_boundary_rows: torch.Tensor,
    student_token_rows: torch.Tensor, student_boundary_rows: torch.Tensor,
    teacher_chunks: torch.Tensor, student_chunks: torch.Tensor, counted: torch.Tensor,
    options: AlmOptions = AlmOptions(),
) -> AlmResult:
    """ALM loss for a batch, the mean over counted (merged) chunks of `chunk_divergence`.

    `*_chunks`: each token's chunk id ([B, L_T] / [B, L_S], -1: in no chunk). `counted` [B, C]: the chunks
    whose divergence is averaged; the others (e.g. prompt chunks) still end merged chunks at teacher
    boundaries, as in the reference, but add nothing to a merged chunk's likelihood.
    """
    num_chunks = counted.shape[1]
    teacher_token_rows = teacher_token_rows.detach().float()
    teacher_boundary_rows = teacher_boundary_rows.detach().float()
    student_token_rows, student_boundary_rows = student_token_rows.float(), student_boundary_rows.float()

    _, teacher_last = chunk_extent(teacher_chunks, num_chunks)
    _, student_last = chunk_extent(student_chunks, num_chunks)
    present = teacher_last >= 0
    valid = counted.bool() & present
    # Log-probs are clipped at 0 (bf16 rounding can push them above), so every chunk log-likelihood is <= 0.
    chunk_lp_t = _chunk_sums(rows_to_tokens(teacher_token_rows).clamp(max=0.0), teacher_chunks, num_chunks)
    chunk_lp_s = _chunk_sums(rows_to_tokens(student_token_rows).clamp(max=0.0), student_chunks, num_chunks)
    boundary_t = teacher_boundary_rows.gather(1, teacher_last.clamp(min=0)).clamp(max=0.0)
    boundary_s = student_boundary_rows.gather(1, student_last.clamp(min=0)).clamp(max=0.0)

    if options.merge_by_space_prob:
        groups = _runs(present & (boundary_t.exp() > options.boundary_threshold))
        zeros = torch.zeros_like(chunk_lp_t)
        chunk_lp_t = zeros.scatter_add(1, groups, torch.where(valid, chunk_lp_t, 0.0))
        chunk_lp_s = zeros.scatter_add(1, groups, torch.where(valid, chunk_lp_s, 0.0))
        # A merged chunk's boundary log-prob is that of its last valid constituent.
        position = torch.arange(num_chunks, device=valid.device).expand_as(valid)
        last = torch.zeros_like(groups).scatter_reduce(1, groups, torch.where(valid, position, 0), reduce="amax",
                                                       include_self=True)
        boundary_t, boundary_s = boundary_t.gather(1, last), boundary_s.gather(1, last)
        valid = _group_any(valid, groups)

    if options.append_space:
        chunk_lp_t = chunk_lp_t + boundary_t
        chunk_lp_s = chunk_lp_s + boundary_s

    # Invalid slots get a harmless stand-in value so no NaN can leak through the masking below.
    safe_t = torch.where(valid, chunk_lp_t, -1.0)
    safe_s = torch.where(valid, chunk_lp_s, -1.0)
    divergence = chunk_divergence(safe_t, safe_s, options.diff_fn, options.binarization_temp)
    return AlmResult(
        masked_mean(divergence, valid), valid.sum(),
        masked_mean(chunk_lp_t, valid).detach(), masked_mean(chunk_lp_s, valid).detach(),
    )


@register
class AlmLoss(DistillLoss):
    """ALM on the batch's byte-exact chunks, from both models' observed-token and boundary log-probs: works
    across tokenizers and within one (identical tokenizers give one chunk per token)."""

    name = "alm"
    params_model = AlmParams
    needs_online_teacher = False
    same_tokenizer_only = False
    teacher_fields = ("token_logprobs", "boundary_logprobs")
    needs_student_boundary = True
    params: AlmParams

    def __init__(self, params: AlmParams, setup: LossSetup):
        super().__init__(params, setup)
        self.options = AlmOptions(
            binarization_temp=params.binarization_temp, diff_fn=params.diff_fn,
            merge_by_space_prob=params.merge_by_space_prob, append_space=params.append_space,
            boundary_threshold=params.boundary_threshold,
        )

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        teacher_chunks, student_chunks = alignment.teacher_chunks, alignment.student_chunks
        counted = alignment.chunk_is_target if self.params.mask_prompt else torch.ones_like(alignment.chunk_is_target)
        if self.params.chunks == "space":
            teacher_chunks, student_chunks, counted = word_chunks(
                teacher_chunks, student_chunks, alignment.teacher_word_start, alignment.student_word_start, counted)
        assert student.boundary_logprobs is not None  # computed: this loss declares needs_student_boundary
        assert teacher.token_logprobs is not None and teacher.boundary_logprobs is not None  # read: reads_teacher()
        result = alm_loss(teacher.token_logprobs, teacher.boundary_logprobs, student.token_logprobs,
                          student.boundary_logprobs, teacher_chunks, student_chunks, counted, self.options)
        return LossOutput((Mean(result.loss, result.num_chunks),), {
            "chunks": float(result.num_chunks),
            "teacher_chunk_logprob": float(result.teacher_chunk_logprob),
            "student_chunk_logprob": float(result.student_chunk_logprob),
        })
