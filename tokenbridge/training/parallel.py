"""How the trainable module spreads over the training processes (`runtime.strategy`), and its layout-free state.

- one process: the module as it is;
- `ddp`: PyTorch's DistributedDataParallel: every process holds a replica, and gradients are all-reduced in
  buckets while backward runs (overlapping communication with compute);
- `fsdp`: FSDP2 (`fully_shard`) on every decoder layer and on the root: parameters, gradients and optimizer
  state are sharded over the processes, each layer all-gathered before it runs and its gradients
  reduce-scattered during backward.

Both average gradients over the processes; the engine's loss shares are built so that the *sum* over ranks is
the global batch's gradient, so the engine scales its backward by the number of processes.

Checkpoints hold full (unsharded) state keyed by parameter names, whatever the layout: a run saved by one
process resumes under DDP or FSDP2 and back (`full_state`, `load_full_state`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from tokenbridge.runtime import Runtime
from tokenbridge.training.ranks import Ranks

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TrainingModule(torch.nn.Module):
    """Everything backward reaches, the student and the losses' own parameters (DSKD's projectors), behind one
    forward, so DDP and FSDP2 see every trainable parameter and every forward of a step."""

    def __init__(self, student: PreTrainedModel, losses: torch.nn.ModuleDict, forward: Callable):
        super().__init__()
        self.student: PreTrainedModel = student
        self.losses = losses
        self._forward = forward

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


def parallelize(module: TrainingModule, runtime: Runtime, ranks: Ranks) -> torch.nn.Module:
    """The module as the strategy runs it: unchanged outside a process group, else DDP- or FSDP2-wrapped (also in
    a group of one, which is how FSDP2 is checked on a single GPU)."""
    if not dist.is_initialized():
        return module
    if runtime.strategy == "ddp":
        devices = [runtime.device] if runtime.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=devices)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(runtime.device.type, (ranks.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if runtime.mixed_bf16 \
        else MixedPrecisionPolicy()
    for layer in module.student.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)  # the rest: embeddings, norm, head, the losses' parameters
    return module


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Let backward communicate gradients (the step's last micro-batch) or keep them local (the others)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """The full parameters in place, for calling the student outside the training forward (sampling)."""
    if isinstance(model, FSDPModule):  # the root's parameters; each layer gathers its own when it runs
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, unsharded, on the CPU, keyed by parameter names; a collective under several processes
    (every rank calls it), complete on rank 0."""
    # torch types any state dict's values as its ValueType union; a model's full state holds tensors only
    return get_model_state_dict(model, options=_FULL)  # type: ignore[return-value]


def student_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's full weights as `save_pretrained` takes them, a tied weight once (gathered full tensors no
    longer share storage, so transformers could not tell they are tied)."""
    training = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    assert isinstance(training, TrainingModule)  # what `parallelize` wraps
    student = training.student
    every_name = {name for name, _ in student.named_parameters(remove_duplicate=False)}
    tied = every_name - dict(student.named_parameters()).keys()
    weights = ((key.removeprefix("student."), value) for key, value in full_weights(model).items()
               if key.startswith("student."))
    return {name: tensor for name, tensor in weights if name not in tied}


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`full_weights` and the optimizer state, keyed alike."""
    return {"model": full_weights(model), "optimizer": get_optimizer_state_dict(model, optimizer, options=_FULL)}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore `full_state`'s output into any layout (every rank passes the full state)."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    if dist.is_initialized():
        dist.barrier()
