"""ALM: approximate likelihood matching across tokenizers (spec section 1, default configuration 1.12).

For each aligned chunk, both models' chunk log-likelihoods (sums of their token log-probs over the chunk)
are compared through a binarised divergence of the tempered probabilities `exp(l / tau)`. With
`merge_by_space_prob`, consecutive chunks are merged until the teacher puts more than `gamma` of its mass
on a word boundary next; with `append_space`, each (merged) chunk's likelihood is multiplied by the
probability that a boundary follows, which removes most tokenization bias.

All inputs follow the row convention of `token_stats`: row `j` is the distribution after token `j`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-6


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


def chunk_divergence(teacher: torch.Tensor, student: torch.Tensor, diff_fn: str, tau: float) -> torch.Tensor:
    """Per-chunk distance between chunk log-likelihoods `teacher`, `student` (both <= 0), spec 1.10."""
    log_a, log_b = teacher / tau - EPS, student / tau - EPS
    a, b = log_a.exp(), log_b.exp()
    if diff_fn == "binary_ce":
        return -(a * log_b + (1 - a) * log1mexp(log_b))
    if diff_fn == "reverse_binary_kl":
        return b * (log_b - log_a) + (1 - b) * (log1mexp(log_b) - log1mexp(log_a))
    if diff_fn == "abs_exp":
        return (a - b).abs()
    if diff_fn == "abs":
        return (teacher - student).abs()
    if diff_fn == "binary_kl_temp_limit":
        t, s = teacher - EPS, student - EPS
        return (t - s) + t * torch.log(s / t)
    raise ValueError(f"unknown ALM diff_fn {diff_fn!r}; allowed: binary_ce, reverse_binary_kl, abs_exp, abs, binary_kl_temp_limit")


def rows_to_tokens(rows: torch.Tensor) -> torch.Tensor:
    """Shift row-convention values (after token j) to token convention (token i's own log-prob)."""
    return torch.cat([torch.zeros_like(rows[:, :1]), rows[:, :-1]], dim=1)


def _chunk_sums(values: torch.Tensor, chunks: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Sum of `values` per chunk id; tokens with id -1 go to a discarded extra slot."""
    slots = torch.where(chunks < 0, num_chunks, chunks)
    out = torch.zeros(values.shape[0], num_chunks + 1, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, slots, values)[:, :num_chunks]


def _chunk_last(chunks: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Index of each chunk's last token ([B, C]); 0 for empty chunk slots."""
    slots = torch.where(chunks < 0, num_chunks, chunks)
    positions = torch.arange(chunks.shape[1], device=chunks.device).expand_as(chunks)
    out = torch.zeros(chunks.shape[0], num_chunks + 1, dtype=torch.long, device=chunks.device)
    return out.scatter_reduce(1, slots, positions, reduce="amax", include_self=True)[:, :num_chunks]


def _merge_groups(boundary: torch.Tensor) -> torch.Tensor:
    """Group index per chunk: a group ends at (and includes) each chunk followed by a boundary."""
    ends = boundary.long()
    return torch.cumsum(ends, dim=1) - ends


@dataclass
class AlmResult:
    loss: torch.Tensor
    num_chunks: torch.Tensor  # valid (merged) chunks in the batch
    teacher_chunk_logprob: torch.Tensor  # mean over valid chunks (diagnostic)
    student_chunk_logprob: torch.Tensor


def alm_loss(
    teacher_token_rows: torch.Tensor, teacher_boundary_rows: torch.Tensor,
    student_token_rows: torch.Tensor, student_boundary_rows: torch.Tensor,
    teacher_chunks: torch.Tensor, student_chunks: torch.Tensor, options: AlmOptions = AlmOptions(),
) -> AlmResult:
    """ALM loss for a batch. `*_chunks` hold each token's chunk id (-1: in no chunk), [B, L_T] / [B, L_S]."""
    num_chunks = int(max(teacher_chunks.max().item(), student_chunks.max().item(), -1)) + 1
    if num_chunks == 0:
        zero = student_token_rows.sum() * 0.0
        return AlmResult(zero, torch.tensor(0), zero.detach(), zero.detach())
    teacher_token_rows, teacher_boundary_rows = teacher_token_rows.detach().float(), teacher_boundary_rows.detach().float()
    student_token_rows, student_boundary_rows = student_token_rows.float(), student_boundary_rows.float()

    counts = _chunk_sums(torch.ones_like(teacher_token_rows), teacher_chunks, num_chunks)
    valid = counts > 0
    chunk_lp_t = _chunk_sums(rows_to_tokens(teacher_token_rows), teacher_chunks, num_chunks).clamp(max=0.0)
    chunk_lp_s = _chunk_sums(rows_to_tokens(student_token_rows), student_chunks, num_chunks).clamp(max=0.0)
    boundary_t = teacher_boundary_rows.gather(1, _chunk_last(teacher_chunks, num_chunks))
    boundary_s = student_boundary_rows.gather(1, _chunk_last(student_chunks, num_chunks))

    if options.merge_by_space_prob:
        is_boundary = (boundary_t.exp() > options.boundary_threshold) & valid
        groups = _merge_groups(is_boundary)
        zeros = torch.zeros_like(chunk_lp_t)
        chunk_lp_t = zeros.scatter_add(1, groups, torch.where(valid, chunk_lp_t, 0.0))
        chunk_lp_s = zeros.scatter_add(1, groups, torch.where(valid, chunk_lp_s, 0.0))
        # Boundary log-prob of a merged chunk = that of its last valid constituent.
        position = torch.arange(num_chunks, device=valid.device).expand_as(valid)
        last = torch.zeros_like(groups).scatter_reduce(1, groups, torch.where(valid, position, 0), reduce="amax", include_self=True)
        boundary_t, boundary_s = boundary_t.gather(1, last), boundary_s.gather(1, last)
        valid = torch.zeros_like(groups).scatter_reduce(1, groups, valid.long(), reduce="amax", include_self=True) > 0

    if options.append_space:
        chunk_lp_t = chunk_lp_t + boundary_t
        chunk_lp_s = chunk_lp_s + boundary_s
    chunk_lp_t, chunk_lp_s = chunk_lp_t.clamp(max=0.0), chunk_lp_s.clamp(max=0.0)

    # Invalid slots get a harmless stand-in value so no NaN can leak through the `where` below.
    safe_t = torch.where(valid, chunk_lp_t, -1.0)
    safe_s = torch.where(valid, chunk_lp_s, -1.0)
    divergence = chunk_divergence(safe_t, safe_s, options.diff_fn, options.binarization_temp)
    total = valid.sum()
    loss = torch.where(valid, divergence, 0.0).sum() / total.clamp(min=1)
    return AlmResult(
        loss, total,
        torch.where(valid, chunk_lp_t, 0.0).sum().detach() / total.clamp(min=1),
        torch.where(valid, chunk_lp_s, 0.0).sum().detach() / total.clamp(min=1),
    )
