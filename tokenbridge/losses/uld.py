"""Universal Logit Distillation (docs/algorithms/uld-multilevel-ot.md#uld): next-token distributions over different
vocabularies, compared by their sorted probabilities.

At one position ULD is the L1 distance between the two probability vectors sorted in descending order, the
smaller vocabulary zero-padded. By the rearrangement inequality the sorted matching is the cheapest way to
move each teacher probability onto one student probability, so token identity does not matter and the
tokenizers may differ. Positions are paired by order within the answer (the t-th student target with the
t-th teacher target), not by text: a known limitation of the method.

Offline only the teacher's top-K is stored, so each side keeps its `k` largest probabilities plus one tail
term, the mass outside them:

    sum_{i <= k} |s_(i) - t_(i)| + |tail_S - tail_T|,   tail = 1 - sum_{i <= k} p_(i).

When k covers both vocabularies the tails vanish and this is ULD exactly; otherwise it is a lower bound,
because sum_{i > k} |s_(i) - t_(i)| >= |sum_{i > k} (s_(i) - t_(i))| (triangle inequality). Offline k is
capped at the stored K, past which the teacher's probabilities are unknown.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from tokenbridge.config import Strict
from tokenbridge.losses.base import Alignment, DistillLoss, LossOutput, StudentView, TeacherView, counted_mean, register
from tokenbridge.losses.positions import gather_rows, map_positions, paired_target_rows
from tokenbridge.losses.teacher_distribution import select_teacher_rows, teacher_probabilities


class UldParams(Strict):
    """Universal Logit Distillation (docs/algorithms/uld-multilevel-ot.md#uld): L1 between sorted next-token
    probabilities, index-paired."""

    top_k: int = Field(256, ge=1, description="sorted probabilities kept per side, the rest as one tail term: "
                       "exact when it covers both vocabularies, a lower bound otherwise; "
                       "offline capped at the stored top-k")
    skip_student_eos: bool = Field(True, description="drop the student's last answer target (its EOS) before pairing")


def sorted_with_tail(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """[..., V] probabilities -> [..., top_k + 1]: the `top_k` largest in descending order (zeros past V),
    then the tail 1 - sum(kept), clamped at 0 (rounding can push the kept sum above 1)."""
    head = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values
    head = F.pad(head, (0, top_k - head.shape[-1]))
    tail = (1 - head.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([head, tail], dim=-1)


def uld_distance(student_sorted: torch.Tensor, teacher_sorted: torch.Tensor) -> torch.Tensor:
    """Per-position ULD from both sides' `sorted_with_tail` vectors (same k): [..., k + 1] -> [...], in [0, 2]."""
    return (student_sorted - teacher_sorted).abs().sum(-1)


def _teacher_sorted(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, hidden: torch.Tensor | None,
                    teacher: TeacherView, top_k: int) -> torch.Tensor:
    return sorted_with_tail(teacher_probabilities(topk_ids, topk_logprobs, hidden, teacher, 1.0), top_k)


def _student_distance(hidden: torch.Tensor, teacher_sorted: torch.Tensor, student: StudentView, top_k: int
                      ) -> torch.Tensor:
    probs = student.head(hidden)[..., : student.vocab_size].float().softmax(-1)
    return uld_distance(sorted_with_tail(probs, top_k), teacher_sorted)


@register
class UldLoss(DistillLoss):
    """ULD between index-paired answer positions (temperature 1 on both sides): the mean over valid pairs."""

    name = "uld"
    params_model = UldParams
    needs_online_teacher = False
    same_tokenizer_only = False
    teacher_fields = ("topk_ids", "topk_logprobs")
    needs_student_boundary = False
    params: UldParams

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        student_rows, teacher_rows, valid = paired_target_rows(
            student.loss_mask, teacher.loss_mask, self.params.skip_student_eos)
        source = select_teacher_rows(teacher, teacher_rows)
        top_k = self.params.top_k if source.topk_ids is None else min(self.params.top_k, source.topk_ids.shape[-1])
        with torch.no_grad():
            (teacher_sorted,) = map_positions(_teacher_sorted, source.tensors(), student.chunk_size, teacher, top_k)
        hidden = gather_rows(student.hidden, student_rows)
        (distance,) = map_positions(_student_distance, [hidden, teacher_sorted], student.chunk_size, student, top_k)
        return LossOutput((counted_mean(distance, valid),))
