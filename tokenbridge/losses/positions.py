"""Positions: which rows a loss compares, gathering them, and mapping work over them in memory-safe slices.

Vocabularies reach 262k entries, so any loss that needs a whole next-token distribution runs its
vocabulary work on a slice of positions at a time (`map_positions`). With gradients on, each slice is
checkpointed: its logits are recomputed in the backward pass instead of being kept, so at most one
slice's [B, c, V] tensors are alive at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint


def map_positions(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], sliced: Sequence[torch.Tensor | None],
                  chunk_size: int, *static: object) -> tuple[torch.Tensor, ...]:
    """Apply `fn(*slices, *static)` to slices `[:, start:start + chunk_size]` of every tensor in `sliced`
    (dim 1 is positions; None passes through) and concatenate each output along dim 1."""
    length = next(t.shape[1] for t in sliced if t is not None)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sliced)
    parts = []
    for start in range(0, max(length, 1), chunk_size):
        args = [None if t is None else t[:, start : start + chunk_size] for t in sliced]
        out = checkpoint(fn, *args, *static, use_reentrant=False) if grad else fn(*args, *static)
        parts.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(items, dim=1) for items in zip(*parts))


def rows_to_tokens(rows: torch.Tensor) -> torch.Tensor:
    """Shift row-convention values (after token j) to token convention (token i's own log-prob); token 0 gets 0."""
    return torch.cat([torch.zeros_like(rows[:, :1]), rows[:, :-1]], dim=1)


def gather_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values[b, rows[b, p], ...] -> [B, P, ...]; rows of -1 (padding) read row 0 and must be masked."""
    index = rows.clamp(min=0)
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, index)


def target_rows(loss_mask: torch.Tensor, drop_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows predicting each target token, in order: ([B, A] rows, -1 padded; [B, A] valid).

    Token 0 is never predicted. `drop_last` skips each example's last target (e.g. the student's EOS in ULD).
    """
    mask = loss_mask.bool().clone()
    mask[:, 0] = False
    if drop_last:
        last = torch.where(mask.any(1), mask.shape[1] - 1 - mask.flip(1).long().argmax(1), -1)
        has = last >= 0
        mask[has.nonzero().squeeze(1), last[has]] = False
    counts = mask.sum(1)
    width = int(counts.max().item()) if mask.numel() else 0
    rows = torch.full((mask.shape[0], width), -1, dtype=torch.long, device=mask.device)
    for b in range(mask.shape[0]):
        positions = mask[b].nonzero().squeeze(1) - 1
        rows[b, : len(positions)] = positions
    return rows, rows >= 0


def paired_target_rows(student_mask: torch.Tensor, teacher_mask: torch.Tensor, drop_student_last: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the t-th target of the student with the t-th target of the teacher (ULD, MultiLevelOT).

    Returns (student_rows, teacher_rows, valid), each [B, A]: position t counts when both sides have a t-th
    target. Index pairing is by order within the answer, not by text (a known limitation of these methods).
    """
    s_rows, s_valid = target_rows(student_mask, drop_student_last)
    t_rows, t_valid = target_rows(teacher_mask)
    width = min(s_rows.shape[1], t_rows.shape[1])
    valid = s_valid[:, :width] & t_valid[:, :width]
    return s_rows[:, :width], t_rows[:, :width], valid
