"""Resumable training state: model, trainable loss modules, optimizer, step and history, saved atomically under
a fingerprint of the configuration, so a rerun resumes only a run of the same configuration."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from components.io import atomic_path
from components.training.ranks import Ranks


class Checkpoint:
    """`directory/state.pt`, written by rank 0; modules are saved and restored by `state_dict`."""

    def __init__(self, directory: Path, fingerprint: str, modules: dict[str, torch.nn.Module | torch.optim.Optimizer],
                 ranks: Ranks):
        self.directory, self.fingerprint, self.modules, self.ranks = Path(directory), fingerprint, modules, ranks
        self.path = self.directory / "state.pt"

    def resume(self) -> tuple[int, list[dict]]:
        """Restore the last state of this configuration: (step to start at, history so far); (0, []) when there is
        none. Every rank reads it; then rank 0 clears checkpoints of another configuration."""
        start, history = 0, []
        if self.path.exists():
            state = torch.load(self.path, weights_only=False, map_location="cpu")
            if state["fingerprint"] == self.fingerprint:
                for name, module in self.modules.items():
                    module.load_state_dict(state[name])
                start, history = state["step"], state["history"]
        self.ranks.barrier()  # every rank has read the checkpoint before rank 0 may remove it
        if self.ranks.main:
            if start == 0:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        return start, history

    def save(self, step: int, history: list[dict]) -> None:
        if not self.ranks.main:
            return
        with atomic_path(self.path) as temporary:
            torch.save({"fingerprint": self.fingerprint, "step": step, "history": history,
                        **{name: module.state_dict() for name, module in self.modules.items()}}, temporary)
