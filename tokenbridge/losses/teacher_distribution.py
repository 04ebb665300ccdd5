"""The teacher's next-token distribution at chosen rows, as losses that match distributions see it.

Two sources, one result: stored top-k log-probs (offline, normalised over the full vocabulary at the
extraction temperature) or the live teacher's hidden states and head (online, exact). Either way a slice
of rows becomes a dense [B, c, V_T] log-probability tensor with `-inf` outside the kept support, after
pre-training distillation's truncation (docs/algorithms/pretraining-distillation.md#truncation-and-temperature):
the smallest prefix whose probability reaches top-p
(the crossing token included), capped at top-k, renormalised as softmax(z / temperature) over what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenbridge.config import TeacherTruncation
from tokenbridge.losses.base import TeacherView
from tokenbridge.losses.positions import gather_rows


def truncate(log_probs: torch.Tensor, truncation: TeacherTruncation, source_temperature: float = 1.0) -> torch.Tensor:
    """Top-p then top-k truncation of full-vocabulary log-probs, then temperature; [..., V] -> [..., V].

    `log_probs` are normalised over the full vocabulary at `source_temperature` (entries may be -inf where
    unknown). The cut uses them as given; the temperature rescales the kept logits, so it never changes
    which ids are kept.
    """
    log_probs = log_probs.float()
    vocab = log_probs.shape[-1]
    k = min(truncation.top_k or vocab, vocab)
    if k < vocab or truncation.top_p < 1:
        values, ids = log_probs.topk(k, dim=-1)
        if truncation.top_p < 1:
            reached = values.exp().cumsum(-1) >= truncation.top_p
            # Keep up to and including the first entry whose cumulative probability reaches top-p.
            keep = torch.cumsum(reached.long(), -1) - reached.long() == 0
            values = values.masked_fill(~keep, float("-inf"))
        log_probs = torch.full_like(log_probs, float("-inf")).scatter(-1, ids, values)
    return (log_probs * (source_temperature / truncation.temperature)).log_softmax(-1)


@dataclass
class TeacherRows:
    """The teacher's distribution source at gathered rows, sliceable by `map_positions` (dim 1 = rows)."""

    topk_ids: torch.Tensor | None  # [B, P, k] offline
    topk_logprobs: torch.Tensor | None
    hidden: torch.Tensor | None  # [B, P, d_T] online

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.topk_ids, self.topk_logprobs, self.hidden]


def select_teacher_rows(teacher: TeacherView, rows: torch.Tensor) -> TeacherRows:
    """Gather the teacher's distribution source at `rows` ([B, P], -1 padded)."""
    if teacher.hidden is not None:  # a live teacher
        return TeacherRows(None, None, gather_rows(teacher.hidden, rows))
    if teacher.topk_ids is None or teacher.topk_logprobs is None:
        raise ValueError("this loss needs the teacher's top-k distribution, which the stored teacher data lacks: "
                         "rerun 'dvc repro teacher_logits'")
    return TeacherRows(gather_rows(teacher.topk_ids.long(), rows), gather_rows(teacher.topk_logprobs, rows), None)


@torch.no_grad()
def _known_log_probs(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, hidden: torch.Tensor | None,
                     teacher: TeacherView) -> tuple[torch.Tensor, float]:
    """One slice of `TeacherRows` -> log-probs [B, c, V_T] normalised over the full vocabulary (-inf where the
    stored top-k says nothing), and the temperature they are at."""
    if hidden is not None:
        assert teacher.head is not None  # a live teacher gives its hidden states and its head
        return teacher.head(hidden)[..., : teacher.vocab_size].float().log_softmax(-1), 1.0
    assert topk_ids is not None and topk_logprobs is not None  # a stored teacher gives both
    sparse = torch.full((*topk_ids.shape[:-1], teacher.vocab_size), float("-inf"), device=topk_ids.device)
    # Rows with fewer kept entries than the width are padded with (id 0, -inf): amax keeps a real id 0's value.
    return sparse.scatter_reduce(-1, topk_ids, topk_logprobs.float(), "amax"), teacher.stored_temperature


def teacher_log_probs(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, hidden: torch.Tensor | None,
                      teacher: TeacherView) -> torch.Tensor:
    """One slice of `TeacherRows` -> truncated, tempered teacher log-probs [B, c, V_T] (no gradient)."""
    known, source_temperature = _known_log_probs(topk_ids, topk_logprobs, hidden, teacher)
    return truncate(known, teacher.truncation, source_temperature)


def teacher_probabilities(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                          hidden: torch.Tensor | None, teacher: TeacherView, temperature: float) -> torch.Tensor:
    """The teacher's own next-token probabilities at `temperature`, untruncated: [B, c, V_T], no gradient.

    For losses that rank and truncate the teacher themselves (ULD, MultiLevelOT), so `teacher.truncation`
    does not apply. Live: softmax(z / temperature) over the full vocabulary. Offline at the extraction
    temperature: the stored probabilities as they are (entries outside the stored top-K read 0, so the
    missing mass stays missing). Offline at another temperature the full-vocabulary normaliser is unknown,
    so the stored support is renormalised at `temperature`.
    """
    known, source_temperature = _known_log_probs(topk_ids, topk_logprobs, hidden, teacher)
    if temperature == source_temperature:
        return known.exp()
    return (known * (source_temperature / temperature)).softmax(-1)
