"""The training processes `torchrun` (or `accelerate launch`) starts, and the sums they share.

`distill.batch_size` stays the global batch: each rank takes its contiguous share of every step's examples.
A loss term is a mean over its own units (target rows, chunks, paired positions), and shares hold different
numbers of them, so the engine scales each share's mean by its count over the global count (`Ranks.sum_floats`
of the counts) before backward: the shares' gradients, summed over the ranks, are the global batch's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: rank 0 of 1 unless `process_group` joined several."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The process group `process_group` joined, or rank 0 of 1."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0 alone writes outputs (model, history, checkpoints) and logs."""
        return self.rank == 0

    def share(self, indices: list[int]) -> list[int]:
        """This rank's contiguous share of a step's examples; shares differ in size by at most one."""
        count = len(indices)
        return indices[self.rank * count // self.size : (self.rank + 1) * count // self.size]

    def sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` over the ranks in place, through one flat buffer (one all-reduce, not one per tensor).
        Every rank passes the same shapes: the same terms run on every rank, so the same parameters get gradients."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat)
        for tensor, part in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
            tensor.copy_(part.view_as(tensor))

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sum numbers over the ranks, in float64 (counts and logged values)."""
        if self.size == 1:
            return values
        totals = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(totals)
        return totals.tolist()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere: the ranks start equal (as DDP does), then take the same summed steps."""
        for tensor in tensors if self.size > 1 else []:
            dist.broadcast(tensor, 0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """Join the processes `torchrun` started, when its WORLD_SIZE is above 1: NCCL for CUDA tensors (one GPU per
    process, `LOCAL_RANK`) and gloo for CPU tensors (counts, logged values, CPU training)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield Ranks()
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cuda:nccl,cpu:gloo")
    else:
        dist.init_process_group("gloo")
    try:
        yield Ranks.current()
    finally:
        dist.destroy_process_group()
