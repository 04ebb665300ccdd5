"""Hidden-state alignment at chunk ends (tokenkit's `alm_latents`): the auxiliary loss of byte-level
tokenizer transfer (docs/algorithms/tokenizer-transfer.md#hidden-state-loss), where chunk likelihoods alone
carry too few bits per text.

At the last token of every aligned chunk, both models have read exactly the same bytes, so in
self-distillation (the identity projection) their final hidden states should agree. The squared difference
is normalised per channel by the teacher's mean square over the chunks (`l2_channelwise`), so channels of
large magnitude do not dominate. Chunks are the unconstrained ones, without loss masking.
"""

from __future__ import annotations

import torch

from tokenbridge.losses.alm import chunk_extent
from tokenbridge.losses.base import Alignment, LossOutput, Mean, StudentView, TeacherView


def hidden_state_loss(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, teacher_chunks: torch.Tensor,
                      student_chunks: torch.Tensor) -> Mean:
    """Mean over chunks and channels of (h_S - h_T)^2 / E_chunks[h_T^2], at each chunk's last token, with the
    number of chunks. The per-channel scale is the batch's (a micro-batch's under gradient accumulation).

    `*_hidden`: [B, L, d] final hidden states (same d); `*_chunks`: per-token chunk ids (-1: in no chunk).
    """
    num_chunks = int(max(teacher_chunks.max(), student_chunks.max()).clamp(min=-1)) + 1
    if num_chunks == 0:
        return Mean(student_hidden.sum() * 0.0, 0)
    _, teacher_last = chunk_extent(teacher_chunks, num_chunks)
    _, student_last = chunk_extent(student_chunks, num_chunks)
    valid = (teacher_last >= 0) & (student_last >= 0)

    def at_ends(hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        index = last.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.float().gather(1, index)[valid]  # [N_valid, d]

    target = at_ends(teacher_hidden, teacher_last).detach()
    scale = target.square().mean(0) + 1e-8
    return Mean(((at_ends(student_hidden, student_last) - target).square() / scale).mean(), int(valid.sum()))


class HiddenStateTerm(torch.nn.Module):
    """`hidden_state_loss` as a training term beside a registered loss (the transfer stage's byte targets): the
    live teacher's final hidden states against the student's, at the aligned chunks' ends."""

    needs_student_boundary = False

    @classmethod
    def reads_teacher(cls) -> bool:
        """True, as every registered loss but `sft` (DistillLoss.reads_teacher): its step runs the teacher."""
        return True

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        assert teacher.hidden is not None, "the hidden-state loss reads the live teacher's hidden states"
        return LossOutput((hidden_state_loss(teacher.hidden, student.hidden, alignment.teacher_chunks,
                                             alignment.student_chunks),))
