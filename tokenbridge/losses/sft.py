"""Next-token cross-entropy on the student's own targets (docs/algorithms/alm.md#next-token-cross-entropy), from
row-convention log-probs.

Registered as `sft`: alone it is the next-token-only baseline; it is also the term `alpha` mixes with any
distillation loss.
"""

from __future__ import annotations

import torch

from tokenbridge.losses.base import (
    Alignment,
    DistillLoss,
    LossOutput,
    Mean,
    StudentView,
    TeacherView,
    counted_mean,
    register,
)
from tokenbridge.losses.positions import rows_to_tokens


def sft_mean(student_token_rows: torch.Tensor, loss_mask: torch.Tensor) -> Mean:
    """Mean negative log-likelihood of the target tokens (`loss_mask`, token convention; token 0 never counts)."""
    targets = loss_mask.clone()
    targets[:, 0] = False
    return counted_mean(-rows_to_tokens(student_token_rows.float()), targets)


def sft_loss(student_token_rows: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return sft_mean(student_token_rows, loss_mask).value


@register
class NextTokenLoss(DistillLoss):
    name = "sft"
    params_model = None
    needs_online_teacher = False
    same_tokenizer_only = False
    teacher_fields = ()
    needs_student_boundary = False

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        return LossOutput((sft_mean(student.token_logprobs, student.loss_mask),))
