"""What changes with the step: the learning rate, the distillation share alpha
(docs/algorithms/pretraining-distillation.md#mixing-and-schedules) and each loss term's
fixed weight."""

from __future__ import annotations

from tokenbridge.params import DistillParams


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then linear decay to zero at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, 1 - (step - warmup) / max(1, steps - warmup))


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
