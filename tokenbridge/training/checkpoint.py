"""Resumable training state: model, optimizer, step and history, saved atomically under a fingerprint of the
configuration, so a rerun resumes only a run of the same configuration. The state is full (unsharded) and keyed
by parameter names (`parallel.full_state`), so a checkpoint of one layout (one process, DDP, FSDP2) resumes in
any other."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tokenbridge.io import atomic_path
from tokenbridge.stopping import Stopped, requested
from tokenbridge.training.parallel import full_state, load_full_state
from tokenbridge.training.ranks import Ranks

FORMAT = "tokenbridge.checkpoint/v2"


class Checkpoint:
    """`directory/state.pt`, written by rank 0."""

    def __init__(self, directory: Path, fingerprint: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ranks: Ranks):
        self.directory, self.fingerprint, self.ranks = Path(directory), fingerprint, ranks
        self.model, self.optimizer = model, optimizer
        self.path = self.directory / "state.pt"

    def resume(self) -> tuple[int, list[dict]]:
        """Restore the last state of this configuration: (step to start at, history so far); (0, []) when there is
        none. Every rank reads it; then rank 0 clears checkpoints of another configuration."""
        start, history = 0, []
        if self.path.exists():
            state = torch.load(self.path, weights_only=False, map_location="cpu")
            if state.get("format") == FORMAT and state["fingerprint"] == self.fingerprint:
                load_full_state(self.model, self.optimizer, state)
                start, history = state["step"], state["history"]
        self.ranks.barrier()  # every rank has read the checkpoint before rank 0 may remove it
        if self.ranks.main:
            if start == 0:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        return start, history

    def save(self, step: int, history: list[dict]) -> None:
        """Every rank calls this (gathering sharded state is collective); rank 0 writes."""
        state = full_state(self.model, self.optimizer)
        if self.ranks.main:
            with atomic_path(self.path) as temporary:
                torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "step": step, "history": history,
                            **state}, temporary)

    def at_step_end(self, step: int, history: list[dict], due: bool) -> None:
        """After a step: save when `due`; when a signal asked this run to stop (on any rank), save and raise
        `Stopped`, so a rerun resumes here."""
        asked = requested()
        stop = asked is not None if self.ranks.size == 1 else self.ranks.sum_floats([float(asked is not None)])[0] > 0
        if due or stop:
            self.save(step, history)
        if stop:
            raise Stopped(asked or "a signal to another rank", f"checkpoint saved after step {step}; rerun to resume")
