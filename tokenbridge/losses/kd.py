"""Same-tokenizer knowledge distillation: a divergence between the teacher's and the student's next-token
distributions at every target row (docs/algorithms/pretraining-distillation.md).

The teacher's distribution is truncated top-p then top-k and tempered (`distill.teacher`), from stored top-k
log-probs (offline) or the live teacher (online). Values are summed over the vocabulary and averaged over
target rows (TRL's `batchmean`). Refused when the tokenizers differ: rows would not describe the same event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from tokenbridge.config import Strict
from tokenbridge.losses import divergences
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
from tokenbridge.losses.positions import gather_rows, map_positions, target_rows
from tokenbridge.losses.teacher_distribution import select_teacher_rows, teacher_log_probs

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class JsdParams(Strict):
    """Generalised JSD: the teacher and the student mixed with weight beta."""

    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL, 1: reverse KL (exact endpoints)")


class SkewParams(Strict):
    """Skew KL (both directions share this section)."""

    weight: float = Field(0.1, gt=0, lt=1, description="lambda: mix of the own distribution into the other")


def _slice_divergence(hidden: torch.Tensor, topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                      teacher_hidden: torch.Tensor | None, student: StudentView, teacher: TeacherView,
                      divergence: Divergence) -> torch.Tensor:
    student_log_probs = student.head(hidden)[..., : student.vocab_size].float().log_softmax(-1)
    return divergence(teacher_log_probs(topk_ids, topk_logprobs, teacher_hidden, teacher), student_log_probs)


def divergence_mean(student: StudentView, teacher: TeacherView, divergence: Divergence) -> Mean:
    """Mean per-row `divergence(teacher, student)` over the student's target rows, chunked over rows."""
    rows, valid = target_rows(student.loss_mask)
    teacher_rows = select_teacher_rows(teacher, rows)
    (values,) = map_positions(_slice_divergence, [gather_rows(student.hidden, rows), *teacher_rows.tensors()],
                              student.chunk_size, student, teacher, divergence)
    return counted_mean(values, valid)


class SameTokenizerLoss(DistillLoss):
    params_model: ClassVar[type[BaseModel] | None] = None
    needs_online_teacher = False
    same_tokenizer_only = True
    teacher_fields = ("topk_ids", "topk_logprobs")
    needs_student_boundary = False

    def divergence(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        if student.input_ids.shape != teacher.input_ids.shape or not torch.equal(student.input_ids, teacher.input_ids):
            raise ValueError(f"{self.name} compares the two models row by row and needs identical token sequences, "
                             "which only one shared tokenizer gives; use a cross-tokenizer loss")
        return LossOutput((divergence_mean(student, teacher, self.divergence),))


@register
class ForwardKL(SameTokenizerLoss):
    name = "forward_kl"

    def divergence(self, teacher, student):
        return divergences.forward_kl(teacher, student)


@register
class ReverseKL(SameTokenizerLoss):
    name = "reverse_kl"

    @classmethod
    def needs_full_teacher(cls, params: BaseModel | None) -> bool:
        return True

    def divergence(self, teacher, student):
        return divergences.reverse_kl(teacher, student)


@register
class GeneralizedJSD(SameTokenizerLoss):
    name = "jsd"
    params_model = JsdParams
    params: JsdParams

    @classmethod
    def needs_full_teacher(cls, params: BaseModel | None) -> bool:
        return isinstance(params, JsdParams) and params.beta == 1  # beta 1 is the reverse KL

    def divergence(self, teacher, student):
        return divergences.jsd(teacher, student, self.params.beta)


@register
class TotalVariation(SameTokenizerLoss):
    name = "tvd"

    def divergence(self, teacher, student):
        return divergences.tvd(teacher, student)


@register
class SkewForwardKL(SameTokenizerLoss):
    name = "skew_forward_kl"
    params_model = SkewParams
    params_section = "skew"
    params: SkewParams

    def divergence(self, teacher, student):
        return divergences.skew_forward_kl(teacher, student, self.params.weight)


@register
class SkewReverseKL(SameTokenizerLoss):
    name = "skew_reverse_kl"
    params_model = SkewParams
    params_section = "skew"
    params: SkewParams

    def divergence(self, teacher, student):
        return divergences.skew_reverse_kl(teacher, student, self.params.weight)
