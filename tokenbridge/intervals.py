"""Bootstrap intervals of bits-per-byte-like scores (a ratio of sums over examples), for one model or for the
difference between two scored on the same examples. Low in the package: evaluation computes them, and the claims'
verdicts use them without loading models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(nats: list[float], n_bytes: list[int], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of bits-per-byte over examples: whole examples resampled with
    replacement, each resample's summed bits over its summed bytes (the metric is a ratio of sums, so examples
    are the unit). Seeded, so the same scores give the same interval."""
    picks = torch.randint(len(nats), (resamples, len(nats)), generator=torch.Generator().manual_seed(seed))
    bits = torch.tensor(nats, dtype=torch.float64)[picks].sum(1) / math.log(2)
    values = bits / torch.tensor(n_bytes, dtype=torch.float64)[picks].sum(1).clamp(min=1)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def paired_bootstrap_interval(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]],
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of first's bits-per-byte minus second's, both scored on the same
    examples (per example: [bits, bytes]), each resample drawing the same examples for both: what the two differ by,
    without the examples' shared difficulty, which dominates each one's own interval."""
    picks = torch.randint(len(first), (resamples, len(first)), generator=torch.Generator().manual_seed(seed))
    ratios = [(parts[picks, 0].sum(1) / parts[picks, 1].sum(1).clamp(min=1))
              for parts in (torch.tensor(first, dtype=torch.float64), torch.tensor(second, dtype=torch.float64))]
    low, high = torch.quantile(ratios[0] - ratios[1], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high
