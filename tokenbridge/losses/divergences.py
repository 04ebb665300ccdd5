"""Divergences between two next-token distributions given as log-probs over the same support [..., V].

`teacher` (P) may hold `-inf` outside a truncated support; `student` (Q) is a full log-softmax. Each
function returns per-position values [...] (summed over the vocabulary), in fp32.
See docs/algorithms/README.md#divergences.
"""

from __future__ import annotations

import math

import torch


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q), with 0 where p = 0 (so -inf entries of P contribute nothing)."""
    return torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0).sum(-1)


def forward_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(P || Q): mode-covering; with a truncated P, a dense KL with P zero-filled off its support."""
    return _plogp_ratio(teacher, student)


def reverse_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(Q || P): mode-seeking; infinite where P = 0 < Q, so it needs the teacher's full support."""
    return _plogp_ratio(student, teacher)


def jsd(teacher: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.

    The endpoints are the exact KLs (beta = 0: forward KL, beta = 1: reverse KL), as in GKD and TRL.
    """
    if beta == 0:
        return forward_kl(teacher, student)
    if beta == 1:
        return reverse_kl(teacher, student)
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1 - beta))
    return beta * _plogp_ratio(teacher, mixture) + (1 - beta) * _plogp_ratio(student, mixture)


def tvd(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Total variation distance 1/2 sum_v |p - q|."""
    return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)


def skew_forward_kl(teacher: torch.Tensor, student: torch.Tensor, weight: float) -> torch.Tensor:
    """KL(P || w P + (1 - w) Q): forward KL against a mixture, finite even where Q is tiny."""
    return _plogp_ratio(teacher, torch.logaddexp(teacher + math.log(weight), student + math.log(1 - weight)))


def skew_reverse_kl(teacher: torch.Tensor, student: torch.Tensor, weight: float) -> torch.Tensor:
    """KL(Q || w Q + (1 - w) P): reverse KL against a mixture, finite where a truncated P is zero."""
    return _plogp_ratio(student, torch.logaddexp(student + math.log(weight), teacher + math.log(1 - weight)))
