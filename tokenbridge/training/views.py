"""The student's side of a micro-batch, as every loss reads it (`StudentView`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenbridge.losses.base import LossOutput, StudentView, TeacherView
from tokenbridge.losses.token_stats import hidden_states, next_token_stats, output_head
from tokenbridge.training.batching import Batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def student_view(student: PreTrainedModel, batch: Batch, vocab_size: int, boundary: torch.Tensor | None,
                 chunk_size: int, counts_only: bool) -> StudentView:
    """The student's hidden states (with gradient) and per-row statistics; the boundary log-probs only when
    `boundary` is given. `counts_only`: zeros in place of the student's values and no decoder forward, for the
    engine's counting pass (a loss's units never depend on the student's values)."""
    head = output_head(student)
    if counts_only:
        width = student.get_output_embeddings().weight.shape[1]  # the output head reads hidden states this wide
        hidden = torch.zeros(*batch.student_ids.shape, width, device=batch.student_ids.device)
        rows = torch.zeros(batch.student_ids.shape, device=batch.student_ids.device)
        token_rows, boundary_rows = rows, rows if boundary is not None else None
    else:
        hidden = hidden_states(student, batch.student_ids, batch.student_attention)
        stats = next_token_stats(hidden, batch.student_ids, head, vocab_size, boundary, chunk_size=chunk_size)
        token_rows, boundary_rows = stats.token_logprobs, stats.boundary_logprobs
    return StudentView(student, hidden, head, vocab_size, batch.student_ids, batch.student_attention,
                       batch.student_loss_mask, token_rows, boundary_rows, chunk_size)


def student_forward(student: PreTrainedModel, losses: torch.nn.ModuleDict, vocab_size: int,
                    boundary: torch.Tensor, chunk_size: int):
    """The training forward (distill's and transfer's): the student's view of a micro-batch and each named loss
    term on it, with the student's boundary log-probs only when a term needs them."""
    def forward(batch: Batch, teacher: TeacherView, names: list[str], counts_only: bool) -> dict[str, LossOutput]:
        needs_boundary = any(losses[name].needs_student_boundary for name in names)
        view = student_view(student, batch, vocab_size, boundary if needs_boundary else None, chunk_size, counts_only)
        return {name: losses[name](view, teacher, batch.alignment) for name in names}

    return forward
