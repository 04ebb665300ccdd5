"""One optimizer step, the same for every trainer: forward, loss terms, combine, backward, clip, non-finite
guard, optimizer step; over one micro-batch or several (gradient accumulation), on one process or several
(`tokenbridge.training.parallel`: DDP or FSDP2 communicate gradients during the last micro-batch's backward).

Exactness. A loss term is a mean over its own units (target rows, chunks, paired positions), and micro-batches
(and ranks) hold different numbers of them. Each micro-batch's mean is scaled by its count over the step's
global count before backward, so the accumulated gradients are the global batch's, exactly: 4 micro-batches of
2 give what one batch of 8 gives. With one micro-batch the counts come from the forward itself; with several
they must be known before the first backward, so a counting pass runs each micro-batch's losses under no
gradient on a placeholder student (`Forward(..., counts_only=True)`: the units depend on the batch and the
teacher, never on the student's outputs, which a test checks for every registered loss). Under several
processes the counts are summed over the ranks too, and DDP / FSDP2's gradient average is undone by scaling the
backward by the number of processes, so the ranks' gradients add up to the global batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenbridge.losses.base import LossOutput, TeacherView
from tokenbridge.losses.combine import combine
from tokenbridge.runtime import Runtime
from tokenbridge.training.batching import Batch
from tokenbridge.training.parallel import gradient_sync
from tokenbridge.training.ranks import Ranks

# (micro-batch, its teacher view, the terms to compute, counts_only) -> each term's output. With counts_only,
# only the parts' counts are read, so the student's forward may be skipped.
Forward = Callable[[Batch, TeacherView, list[str], bool], dict[str, LossOutput]]


@dataclass
class StepResult:
    loss: float  # the combined loss on the global batch
    values: dict[str, float]  # each term's value on the global batch
    weights: dict[str, float]  # the weights that combined them
    metrics: dict[str, float]  # the losses' diagnostics (this rank's last micro-batch)
    grad_norm: float  # before clipping


class Engine:
    """The model (a `Forward` module, as `parallel.parallelize` wrapped it), optimizer and settings every step
    shares."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, ranks: Ranks,
                 max_grad_norm: float, combine_mode: str = "fixed", last_layer: Sequence[torch.Tensor] = ()):
        self.model, self.optimizer, self.runtime, self.ranks = model, optimizer, runtime, ranks
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.max_grad_norm, self.combine_mode, self.last_layer = max_grad_norm, combine_mode, list(last_layer)

    def _global_counts(self, micro_batches: list[Batch], views: list[TeacherView], names: list[str]) -> list[float]:
        """Every part's unit count summed over the step's micro-batches and ranks (the counting pass)."""
        totals: list[float] = []
        with torch.no_grad(), self.runtime.autocast():
            for batch, view in zip(micro_batches, views):
                outputs = self.model(batch, view, names, True)
                counts = [float(part.count) for output in outputs.values() for part in output.parts]
                totals = [a + b for a, b in zip(totals, counts)] if totals else counts
        return self.ranks.sum_floats(totals)

    def step(self, micro_batches: list[Batch], views: list[TeacherView], weights: dict[str, float],
             learning_rate: float, where: str) -> StepResult:
        """Accumulate the gradients of the weighted terms over `micro_batches` (this rank's share of the step),
        sum them over the ranks, clip, and step. `where` names the run in errors ("distill step 12")."""
        if len(micro_batches) > 1 and self.combine_mode == "gradmag":
            raise ValueError("combine: gradmag weighs each term by its gradient on the whole batch, which gradient "
                             "accumulation never holds at once: set runtime.micro_batch_size to null (or at least "
                             "the per-process batch), or use combine: fixed")
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.zero_grad(set_to_none=True)
        names = [name for name, weight in weights.items() if weight > 0]
        known = self._global_counts(micro_batches, views, names) if len(micro_batches) > 1 else None
        contributions: dict[str, float] = {}  # this rank's share of each term's global value
        metrics: dict[str, float] = {}
        used: dict[str, float] = {}
        for index, (batch, view) in enumerate(zip(micro_batches, views)):
            with gradient_sync(self.model, index == len(micro_batches) - 1):
                with self.runtime.autocast():
                    outputs = self.model(batch, view, names, False)
                parts = [(name, part) for name, output in outputs.items() for part in output.parts]
                counts = [float(part.count) for _, part in parts]
                totals = known if known is not None else self.ranks.sum_floats(counts)
                shares: dict[str, torch.Tensor] = {}
                for (name, part), count, total in zip(parts, counts, totals):
                    scale = count / max(total, 1.0)
                    shares[name] = shares[name] + part.value * scale if name in shares else part.value * scale
                    contributions[name] = contributions.get(name, 0.0) + float(part.value.detach()) * scale
                loss, used = combine(shares, weights, self.combine_mode, self.last_layer, self.ranks.sum)
                (loss * self.ranks.size).backward()  # DDP / FSDP2 average over the ranks; the shares add up
            for name, output in outputs.items():
                metrics.update({f"{name}.{key}": value for key, value in output.metrics.items()})

        terms = list(contributions)
        values = dict(zip(terms, self.ranks.sum_floats([contributions[name] for name in terms])))
        total = sum(used[name] * values[name] for name in used)
        if not math.isfinite(total):
            raise FloatingPointError(f"{where}: loss is {total}; lower the learning rate")
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"{where}: gradient norm is {grad_norm}; lower the learning rate")
        self.optimizer.step()
        return StepResult(total, values, used, metrics, grad_norm)
