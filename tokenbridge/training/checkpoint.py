"""Resumable training state: model, optimizer, step and history, saved atomically with what shaped it (the run's
identity: params, data, models, code), so a rerun resumes only a run whose every part is unchanged. The state is
full (unsharded) and keyed by parameter names (`parallel.full_state`), so a checkpoint of one layout (one process,
DDP, FSDP2) resumes in any other.

A checkpoint can come from a shared DVC remote, so it is loaded with `weights_only=True`: a file that would run
code on load is refused (and discarded), never executed. Weights that are no longer finite are never saved: the
run stops with the last good checkpoint in place."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from tokenbridge.io import atomic_path, fingerprint
from tokenbridge.stopping import Stopped, requested
from tokenbridge.training.parallel import full_state, load_full_state
from tokenbridge.training.ranks import Ranks

FORMAT = "tokenbridge.checkpoint/v3"
PACKAGE = Path(__file__).resolve().parents[1]
# The library parts a training step runs through: editing one discards checkpoints; editing a report or a flow
# does not.
SHAPING_CODE = ("alignment.py", "data", "losses", "models", "on_policy.py", "runtime.py", "sampling.py",
                "stored_logits.py", "token_bytes.py", "training")


def code_version(stage_file: str) -> str:
    """A hash of the code that shapes a stage's training: its own module and `SHAPING_CODE`."""
    files = [Path(stage_file).resolve()]
    for part in SHAPING_CODE:
        location = PACKAGE / part
        files += sorted(location.rglob("*.py")) if location.is_dir() else [location]
    digest = hashlib.sha256()
    for path in files:
        name = path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class Checkpoint:
    """`directory/state.pt`, written by rank 0. `identity`: each part that shaped the run (JSON-able), compared
    part by part on resume, so a discarded checkpoint says which part changed."""

    def __init__(self, directory: Path, identity: dict[str, Any], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, ranks: Ranks):
        self.directory, self.ranks = Path(directory), ranks
        self.identity = {part: fingerprint(value) for part, value in identity.items()}
        self.model, self.optimizer = model, optimizer
        self.path = self.directory / "state.pt"

    def _unusable(self, state: dict) -> str | None:
        """Why `state` cannot be resumed here, or None when it can."""
        if state.get("format") != FORMAT:
            return f"it is in format {state.get('format')!r}, this version writes {FORMAT!r}"
        saved = state.get("identity", {})
        changed = [part for part, value in self.identity.items() if saved.get(part) != value]
        return f"what shaped it changed: {', '.join(changed)}" if changed else None

    def resume(self) -> tuple[int, list[dict]]:
        """Restore the last state of this run: (step to start at, history so far); (0, []) when there is none.
        Every rank reads it; then rank 0 clears a checkpoint it cannot resume, saying why."""
        start, history = 0, []
        if self.path.exists():
            try:
                state = torch.load(self.path, weights_only=True, map_location="cpu")
                reason = self._unusable(state)
            except Exception as error:  # a file that would run code, or not a checkpoint: never resumed
                reason = f"it cannot be read as plain tensors ({type(error).__name__}: {str(error)[:160]})"
            if reason is None:
                load_full_state(self.model, self.optimizer, state)
                start, history = state["step"], state["history"]
                if self.ranks.main:
                    print(f"checkpoint: resuming {self.path} at step {start}", file=sys.stderr)
            elif self.ranks.main:
                print(f"checkpoint: not resuming {self.path}: {reason}; training from the start", file=sys.stderr)
        self.ranks.barrier()  # every rank has read the checkpoint before rank 0 may remove it
        if self.ranks.main:
            if start == 0:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        return start, history

    def save(self, step: int, history: list[dict]) -> None:
        """Every rank calls this (gathering sharded state and agreeing on finiteness are collective); rank 0
        writes. Non-finite weights raise instead, leaving the last good checkpoint."""
        local = [parameter.to_local() if hasattr(parameter, "to_local") else parameter
                 for parameter in self.model.parameters()]
        broken = float(not all(bool(torch.isfinite(tensor).all()) for tensor in local))
        if (self.ranks.sum_floats([broken])[0] if self.ranks.size > 1 else broken) > 0:
            raise FloatingPointError(f"step {step}: the weights are no longer finite, so they were not saved; "
                                     f"{self.path if self.path.exists() else 'no checkpoint'} is the last good "
                                     "state: lower the learning rate (or raise the warm-up) and rerun")
        state = full_state(self.model, self.optimizer)
        if self.ranks.main:
            with atomic_path(self.path) as temporary:
                torch.save({"format": FORMAT, "identity": self.identity, "step": step, "history": history, **state},
                           temporary)

    def at_step_end(self, step: int, history: list[dict], due: bool) -> None:
        """After a step: save when `due`; when a signal asked this run to stop (on any rank), save and raise
        `Stopped`, so a rerun resumes here."""
        asked = requested()
        stop = asked is not None if self.ranks.size == 1 else self.ranks.sum_floats([float(asked is not None)])[0] > 0
        if due or stop:
            self.save(step, history)
        if stop:
            raise Stopped(asked or "a signal to another rank", f"checkpoint saved after step {step}; rerun to resume")
