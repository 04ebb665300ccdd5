"""How a step's loss terms become one loss: the KD / next-token mix `alpha` and its schedules (spec 2.4),
fixed per-loss weights, or GradMag balancing by last-layer gradient norm (spec 1.14)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from components.config import DistillParams


def alpha_at(step: int, params: DistillParams) -> float:
    """The distillation share alpha at `step` (0-based): constant, linear 0 -> alpha or alpha -> 0 over the run,
    or warmup-stable-decay (0 -> alpha over `alpha_warmup` of the steps, alpha, then -> 0 over `alpha_decay`)."""
    last = max(params.steps - 1, 1)
    if params.alpha_schedule == "constant":
        return params.alpha
    if params.alpha_schedule == "linear_increase":
        return params.alpha * step / last
    if params.alpha_schedule == "linear_decrease":
        return params.alpha * (1 - step / last)
    warmup = round(params.alpha_warmup * params.steps)
    decay = round(params.alpha_decay * params.steps)
    if step < warmup:
        return params.alpha * step / warmup
    if decay and step >= params.steps - decay:
        return params.alpha * (params.steps - 1 - step) / decay
    return params.alpha


def term_weights(params: DistillParams, step: int, on_policy: bool = False) -> dict[str, float]:
    """Fixed weight of each term at `step`: alpha * loss_weights[name] per distillation loss, 1 - alpha for `sft`.

    On a batch the student sampled (`on_policy`) alpha is 1: next-token CE on the student's own samples would
    only reinforce them, and GKD's objective is the divergence alone."""
    if params.losses == ["sft"]:
        return {"sft": 1.0}
    alpha = 1.0 if on_policy else alpha_at(step, params)
    weights = {name: alpha * params.loss_weights.get(name, 1.0) for name in params.losses}
    weights["sft"] = 1.0 - alpha
    return {name: weight for name, weight in weights.items() if weight > 0}


SumOverRanks = Callable[[list[torch.Tensor]], None]  # sums tensors over the training processes, in place


def gradmag_weights(losses: Sequence[torch.Tensor], last_layer: Sequence[torch.Tensor],
                    sum_over_ranks: SumOverRanks | None = None) -> list[float]:
    """Weights 1 / ||d loss_i / d W|| normalised to sum to one, W = the last layer's parameters (spec 1.14,
    `approx_gradmag_preserve_mag`): every term then adds the same gradient norm to W, and any constant
    factor on a term cancels. Under several processes each `loss` is this rank's share of the term, so the
    term's gradient is the sum of the ranks' gradients (`sum_over_ranks`)."""
    inverse = []
    for loss in losses:
        grads = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        grads = [g for g in grads if g is not None]
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
    positive fixed weight, rebalanced by `gradmag_weights` (their fixed weights cancel, as in the spec)."""
    names = [name for name in terms if weights.get(name, 0) > 0]
    if mode == "gradmag" and len(names) > 1:
        weights = dict(zip(names, gradmag_weights([terms[n] for n in names], last_layer, sum_over_ranks)))
    total = sum(weights[name] * terms[name] for name in names)
    return total, {name: weights[name] for name in names}
