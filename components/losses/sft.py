"""Next-token cross-entropy on the student's own targets (spec 1.13a), from row-convention log-probs."""

from __future__ import annotations

import torch

from components.losses.alm import rows_to_tokens


def sft_loss(student_token_rows: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (`loss_mask`, token convention; token 0 never counts)."""
    targets = loss_mask.clone()
    targets[:, 0] = False
    nll = -rows_to_tokens(student_token_rows.float())
    return torch.where(targets, nll, 0.0).sum() / targets.sum().clamp(min=1)
