"""MultiLevelOT (Cui et al., AAAI 2025; docs/algorithms/uld-multilevel-ot.md), paper semantics: optimal transport
between next-token distributions over different vocabularies, at the token level and at the sequence level.

Per example, over its T index-paired answer positions (t-th student target with t-th teacher target):

1. Ranking. `sequence` (default): the vocabulary dimensions are ordered once per example by their mass
   summed over the answer, so one order (one diagonal transport plan) serves every position. The teacher's
   order is by its own mass; the student's by *its own* mass too, a cheap stand-in for the optimal
   permutation Q*. `token`: each position is sorted on its own, as in ULD. Either way the order is a
   constant: gradients reach the values, never the permutation.
2. Top-k truncation of both sides, without renormalisation (k is capped at the smaller vocabulary).
3. Holistic absolute difference  HAD = sum_t sum_{i<=k} |t_i(t) - s_i(t)|.
4. Sequential log loss  SL = -sum_t sum_{i<=k} t_i(t) log s_i(t): teacher weights, student log-probs taken from
   its log-softmax at the kept ids (never the log of a probability), temperature 1.
5. Sinkhorn distance  SD = sum_ij P_ij C_ij, with C_ij the L1 distance between the teacher's top-k vector at
   position i and the student's at position j, both at `sd_temperature` (ranked by the same ids as the
   temperature-1 vectors), and P from `sinkhorn_iterations` row-then-column normalisations of exp(-C / lambda),
   in the log domain; gradients flow through the unrolled iterations and through C.

Reduction: L_b = (HAD_b + sl_weight * SL_b + sd_weight * SD_b) / T_b, i.e. the paper's per-example total
(each term a sum over positions: SD's plan has T_b unit columns) divided by the example's valid positions;
the loss is the mean of L_b over examples with at least one pair. The paper's overall factor alpha and the
CE term belong to the training loop's weights.

The teacher's probabilities come from `teacher_distribution.teacher_probabilities`: offline at temperature 1 the
stored ones (dimensions outside a position's stored top-K read 0, so keep the stored K at least `top_k`); at
`sd_temperature` the stored support renormalised, since the full-vocabulary normaliser is unknown offline.
The reference code's deviations (docs/algorithms/uld-multilevel-ot.md#multilevelot-reference-code: double
softmax, swapped SL, logit-std normalisation, batch-wide ranking, 0.001 SD scale, means over positions) are
deliberately not reproduced.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tokenbridge.config import Strict
from tokenbridge.losses.base import (
    Alignment,
    DistillLoss,
    LossOutput,
    Mean,
    StudentView,
    TeacherView,
    masked_mean,
    register,
)
from tokenbridge.losses.positions import gather_rows, map_positions, paired_target_rows
from tokenbridge.losses.teacher_distribution import select_teacher_rows, teacher_probabilities


class MultiLevelOtParams(Strict):
    """MultiLevelOT (docs/algorithms/uld-multilevel-ot.md#our-multilevelot), paper semantics:
    L = HAD + sl_weight * SL + sd_weight * SD."""

    top_k: int = Field(50, ge=1, description="ranked vocabulary dimensions kept per side, not renormalised")
    ranking: Literal["sequence", "token"] = Field(
        "sequence", description="sequence: one order per example by mass summed over its answer (the student's "
        "by its own mass); token: each position sorted on its own, as ULD")
    sl_weight: float = Field(0.1, ge=0, description="beta: weight of the sequential log loss")
    sd_weight: float = Field(0.1, ge=0, description="gamma: weight of the Sinkhorn distance")
    sinkhorn_iterations: int = Field(20, ge=1, description="N: alternating row/column normalisations")
    sinkhorn_lambda: float = Field(0.1, gt=0, description="lambda: kernel exp(-C / lambda)")
    sd_temperature: float = Field(2.0, gt=0,
                                  description="softmax temperature of the vectors the Sinkhorn term compares")
    skip_student_eos: bool = Field(True, description="drop the student's last answer target (its EOS) before pairing")


def column_mass(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Probability mass per vocabulary dimension summed over the valid positions: [B, c, V] -> [B, 1, V]."""
    return torch.where(valid.unsqueeze(-1), probs, 0.0).sum(1, keepdim=True)


def sequence_order(mass: torch.Tensor, top_k: int) -> torch.Tensor:
    """The `top_k` vocabulary ids of largest summed mass, heaviest first: [B, V] -> [B, top_k]."""
    return mass.topk(top_k, dim=-1).indices


def ranked_ids(probs: torch.Tensor, top_k: int, order: torch.Tensor | None) -> torch.Tensor:
    """The ids kept at each position, in rank order: [B, c, V] -> [B, c, top_k].

    `order` [B, top_k] (sequence ranking) gives every position of an example the same ids; None (token
    ranking) sorts each position by its own probabilities, largest first.
    """
    if order is None:
        return probs.topk(top_k, dim=-1).indices
    return order.unsqueeze(1).expand(-1, probs.shape[1], -1)


def holistic_absolute_difference(teacher_k: torch.Tensor, student_k: torch.Tensor) -> torch.Tensor:
    """sum_i |t_i - s_i| over the ranked top-k: [..., k] -> [...]."""
    return (teacher_k - student_k).abs().sum(-1)


def sequential_log_loss(teacher_k: torch.Tensor, student_log_k: torch.Tensor) -> torch.Tensor:
    """-sum_i t_i log s_i over the ranked top-k: [..., k] -> [...]; dimensions where t = 0 add nothing."""
    return -torch.where(teacher_k > 0, teacher_k * student_log_k, 0.0).sum(-1)


def sinkhorn_plan(cost: torch.Tensor, lam: float, iterations: int) -> torch.Tensor:
    """P from `iterations` rounds of normalising the rows of exp(-cost / lam) to 1, then its columns: [..., n, m].

    In the log domain, so exp(-C / lam) cannot underflow; the columns sum to 1 exactly, the rows converge to 1.
    """
    log_plan = -cost / lam
    for _ in range(iterations):
        log_plan = log_plan - log_plan.logsumexp(-1, keepdim=True)
        log_plan = log_plan - log_plan.logsumexp(-2, keepdim=True)
    return log_plan.exp()


def sinkhorn_distance(teacher_k: torch.Tensor, student_k: torch.Tensor, lam: float, iterations: int) -> torch.Tensor:
    """SD = sum_ij P_ij C_ij between positions, C_ij = ||t(i) - s(j)||_1: [..., n, k] x [..., m, k] -> [...].

    Entropic: SD(x, x) > 0, since P is not the identity."""
    cost = torch.cdist(teacher_k, student_k, p=1)
    return (sinkhorn_plan(cost, lam, iterations) * cost).sum((-2, -1))


def multilevel_ot_loss(teacher_k: torch.Tensor, student_log_k: torch.Tensor, teacher_sd: torch.Tensor,
                       student_sd: torch.Tensor, valid: torch.Tensor, params: MultiLevelOtParams
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss from the ranked top-k vectors of both sides ([B, T, k]; `valid` [B, T]), with its three terms
    per valid position as metrics. See the module docstring for the reduction."""
    had = torch.where(valid, holistic_absolute_difference(teacher_k, student_log_k.exp()), 0.0).sum(1)
    sl = torch.where(valid, sequential_log_loss(teacher_k, student_log_k), 0.0).sum(1)
    sd = torch.stack([
        sinkhorn_distance(teacher_sd[b][valid[b]], student_sd[b][valid[b]], params.sinkhorn_lambda,
                          params.sinkhorn_iterations)
        for b in range(valid.shape[0])
    ])
    counts = valid.sum(1).clamp(min=1)
    has_pairs = valid.any(1)
    total = (had + params.sl_weight * sl + params.sd_weight * sd) / counts
    metrics = {name: masked_mean(term / counts, has_pairs).detach() for name, term in
               (("had", had), ("sl", sl), ("sd", sd))}
    return masked_mean(total, has_pairs), metrics


def _student_mass(hidden: torch.Tensor, valid: torch.Tensor, student: StudentView) -> torch.Tensor:
    return column_mass(student.head(hidden)[..., : student.vocab_size].float().softmax(-1), valid)


def _teacher_mass(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, hidden: torch.Tensor | None,
                  valid: torch.Tensor, teacher: TeacherView) -> torch.Tensor:
    return column_mass(teacher_probabilities(topk_ids, topk_logprobs, hidden, teacher, 1.0), valid)


def _teacher_ranked(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, hidden: torch.Tensor | None,
                    teacher: TeacherView, order: torch.Tensor | None, top_k: int, sd_temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    probs = teacher_probabilities(topk_ids, topk_logprobs, hidden, teacher, 1.0)
    ids = ranked_ids(probs, top_k, order)
    sd_probs = teacher_probabilities(topk_ids, topk_logprobs, hidden, teacher, sd_temperature)
    return probs.gather(-1, ids), sd_probs.gather(-1, ids)


def _student_ranked(hidden: torch.Tensor, student: StudentView, order: torch.Tensor | None, top_k: int,
                    sd_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = student.head(hidden)[..., : student.vocab_size].float()
    log_probs = logits.log_softmax(-1)
    ids = ranked_ids(log_probs.detach(), top_k, order)
    sd_log_probs = (logits / sd_temperature).log_softmax(-1)
    return log_probs.gather(-1, ids), sd_log_probs.gather(-1, ids).exp()


@register
class MultiLevelOtLoss(DistillLoss):
    """MultiLevelOT between index-paired answer positions: HAD + sl_weight * SL + sd_weight * SD."""

    name = "multilevel_ot"
    params_model = MultiLevelOtParams
    needs_online_teacher = False
    same_tokenizer_only = False
    teacher_fields = ("topk_ids", "topk_logprobs")
    needs_student_boundary = False
    params: MultiLevelOtParams

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        params = self.params
        student_rows, teacher_rows, valid = paired_target_rows(
            student.loss_mask, teacher.loss_mask, params.skip_student_eos)
        source = select_teacher_rows(teacher, teacher_rows)
        hidden = gather_rows(student.hidden, student_rows)
        top_k = min(params.top_k, student.vocab_size, teacher.vocab_size)
        chunk = student.chunk_size
        student_order = teacher_order = None
        with torch.no_grad():
            if params.ranking == "sequence":
                (student_mass,) = map_positions(_student_mass, [hidden, valid], chunk, student)
                (teacher_mass,) = map_positions(_teacher_mass, [*source.tensors(), valid], chunk, teacher)
                student_order = sequence_order(student_mass.sum(1), top_k)
                teacher_order = sequence_order(teacher_mass.sum(1), top_k)
            teacher_k, teacher_sd = map_positions(
                _teacher_ranked, source.tensors(), chunk, teacher, teacher_order, top_k, params.sd_temperature)
        student_log_k, student_sd = map_positions(
            _student_ranked, [hidden], chunk, student, student_order, top_k, params.sd_temperature)
        loss, metrics = multilevel_ot_loss(teacher_k, student_log_k, teacher_sd, student_sd, valid, params)
        examples = valid.any(1).sum()  # the loss is a mean over the examples with at least one pair
        return LossOutput((Mean(loss, examples),), {name: value.item() for name, value in metrics.items()})
