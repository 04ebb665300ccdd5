"""How a step's loss terms become one loss: fixed per-term weights (`tokenbridge.training.schedules`: alpha and
`loss_weights`), or GradMag balancing by last-layer gradient norm (docs/algorithms/alm.md#combining-losses)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SumOverRanks = Callable[[list[torch.Tensor]], None]  # sums tensors over the training processes, in place


def gradmag_weights(losses: Sequence[torch.Tensor], last_layer: Sequence[torch.Tensor],
                    sum_over_ranks: SumOverRanks | None = None) -> list[float]:
    """Weights 1 / ||d loss_i / d W|| normalised to sum to one, W = the last layer's parameters
    (docs/algorithms/alm.md#combining-losses; tokenkit's `approx_gradmag_preserve_mag`): every term then adds the
    same gradient norm to W, and any constant factor on a term cancels. Under several processes each `loss`
    is this rank's share of the term, so the term's gradient is the sum of the ranks' gradients
    (`sum_over_ranks`)."""
    inverse = []
    for loss in losses:
        grads = [g for g in torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
                 if g is not None]
        if sum_over_ranks is not None:
            sum_over_ranks(grads)
        norm = math.sqrt(sum(float((g.float() ** 2).sum()) for g in grads))
        inverse.append(1.0 / (norm + 1e-8))
    total = sum(inverse)
    return [value / total for value in inverse]


def combine(terms: dict[str, torch.Tensor], weights: dict[str, float], mode: str,
            last_layer: Sequence[torch.Tensor], sum_over_ranks: SumOverRanks | None = None
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss and the weights used. `fixed`: sum of weight * term; `gradmag`: the terms with a
    positive fixed weight, rebalanced by `gradmag_weights` (their fixed weights cancel, as in the paper)."""
    names = [name for name in terms if weights.get(name, 0) > 0]
    if mode == "gradmag" and len(names) > 1:
        weights = dict(zip(names, gradmag_weights([terms[n] for n in names], last_layer, sum_over_ranks), strict=True))
    weighted = [weights[name] * terms[name] for name in names]
    return sum(weighted[1:], weighted[0]), {name: weights[name] for name in names}
