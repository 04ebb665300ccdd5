"""The distill stage under `torchrun` with two processes (gloo, CPU), with DDP or with FSDP2, trains exactly like one
process on the same global batch, though the two ranks' shares hold different numbers of examples and of each
loss's units; and a checkpoint of any layout resumes in any other.

Run as a script, this file is one rank: `PYTHONPATH=. torchrun --nproc-per-node 2 tests/test_distributed.py RUNS.json`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenbridge import stopping
from tokenbridge.config import RuntimeParams, TeacherLogitsParams
from tokenbridge.contracts import HELDOUT
from tokenbridge.io import read_jsonl
from tokenbridge.params import DistillParams
from tokenbridge.runtime import Runtime
from tokenbridge.stages.distill import train
from tokenbridge.stopping import Stopped
from tokenbridge.training.batching import batch_indices
from tokenbridge.training.ranks import Ranks, process_group

ROOT = Path(__file__).parents[1]

STEPS = 3
BATCH = 3  # two ranks: shares of one and two examples


def _train(run: dict) -> None:
    """One distill run; with `stop_after`, rank 0 sends itself SIGTERM at that step, so every rank stops there with
    a checkpoint (what a stopped run leaves behind for a resume)."""
    out = Path(run["out"])

    def stop(metrics: dict, step: int) -> None:
        if step == run.get("stop_after"):
            os.kill(os.getpid(), signal.SIGTERM)

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    stopping.install()
    try:
        train(Path(run["prepared"]), Path(run["student"]), out / "model", out / "checkpoints", out / "history.csv",
              DistillParams.model_validate(run["params"]), TeacherLogitsParams.model_validate(run["teacher_params"]),
              Path(run["teacher"]), Path(run["logits"]), log_metrics=stop,
              runtime=Runtime.resolve(RuntimeParams.model_validate(run["runtime"])), heldout_examples=4)
    except Stopped:
        assert "stop_after" in run, "stopped without being asked to"
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _history(out: Path) -> list[dict[str, float]]:
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    """Per step, each loss term and the held-out curve's point where it has one."""
    return [{key: float(value) for key, value in row.items()
             if key.endswith("loss") or (key.startswith(HELDOUT) and value)} for row in rows]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _targets_per_rank(prepared: Path, params: DistillParams, teacher_params: TeacherLogitsParams) -> list[list[int]]:
    """Per step, the student's target tokens (next-token CE's units) in each of the two ranks' shares."""
    masks = [row["loss_mask"] for row in read_jsonl(prepared / "train.student.jsonl")]
    counts = []
    for step in range(STEPS):
        indices = batch_indices(step, params.batch_size, len(masks), teacher_params.examples_per_shard, params.seed)
        counts.append([sum(sum(masks[i][1:]) for i in Ranks(rank, 2).share(indices)) for rank in range(2)])
    return counts


def _assert_same_training(reference: Path, other: Path, label: str) -> None:
    assert f"{HELDOUT}bits_per_byte" in _history(reference)[-1], "the curve's last point (every rank scores it)"
    for single, double in zip(_history(reference), _history(other), strict=True):
        assert double == pytest.approx(single, rel=1e-5, abs=1e-7), label
    weights = _weights(reference)
    for key, tensor in _weights(other).items():  # atol: Adam turns rounding in a near-zero gradient into
        # up to ~1e-5 of weight (2e-6 seen); averaging the ranks' means instead is off by ~5e-3
        torch.testing.assert_close(tensor, weights[key], rtol=1e-5, atol=5e-5,
                                   msg=lambda m, key=key: f"{label} {key}: {m}")


def test_two_processes_with_ddp_or_fsdp2_train_exactly_like_one_process_and_resume_each_others_checkpoints(
        cross_tokenizer_pair, same_tokenizer_pair, tiny_params, tmp_path):
    base = {"steps": STEPS, "batch_size": BATCH, "checkpoint_every": 2}
    configurations = {  # name -> (pair, loss settings)
        "alm": (cross_tokenizer_pair, {}),  # the default: ALM + next-token CE
        "forward_kl": (same_tokenizer_pair, {"loss": "forward_kl"}),  # units: the student's target rows
        "alm_uld_gradmag": (cross_tokenizer_pair, {"loss": ["alm", "uld"], "combine": "gradmag"}),  # DDP only
    }
    runs = {}
    for name, ((root, dirs), settings) in configurations.items():
        params = tiny_params.distill.model_copy(update={**base, **settings})
        runs[name] = {"prepared": str(root / "prepared"), "logits": str(root / "logits"),
                      "student": str(dirs["student"]), "teacher": str(dirs["teacher"]),
                      "params": params.model_dump(mode="json"),
                      "teacher_params": tiny_params.teacher_logits.model_dump(mode="json"),
                      "runtime": tiny_params.runtime.model_dump(mode="json")}
        counts = _targets_per_rank(root / "prepared", params, tiny_params.teacher_logits)
        assert all(first != second for first, second in counts), f"{name}: equal shares prove nothing: {counts}"

    def layout(run: dict, strategy: str, out: Path) -> dict:
        return {**run, "runtime": {**run["runtime"], "strategy": strategy}, "out": str(out)}

    for name, run in runs.items():
        _train({**run, "out": str(tmp_path / "one" / name)})
    # Runs stopped at step 2 (SIGTERM), one process and FSDP2, whose checkpoints the other layout resumes.
    _train({**runs["alm"], "out": str(tmp_path / "one" / "alm_stopped"), "stop_after": 2})
    # Two-process runs of each layout, and runs that resume the one-process run's checkpoint at step 2 (as an
    # interrupted run moved to more processes would).
    two = [layout(run, "ddp", tmp_path / "ddp" / name) for name, run in runs.items()]
    two += [layout(runs[name], "fsdp", tmp_path / "fsdp" / name) for name in ("alm", "forward_kl")]
    two.append({**layout(runs["alm"], "fsdp", tmp_path / "fsdp" / "alm_stopped"), "stop_after": 2})
    for strategy in ("ddp", "fsdp"):
        shutil.copytree(tmp_path / "one" / "alm_stopped" / "checkpoints",
                        tmp_path / strategy / "alm_resumed" / "checkpoints")
        two.append(layout(runs["alm"], strategy, tmp_path / strategy / "alm_resumed"))
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(two))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                    str(spec)], check=True, env=environment, cwd=ROOT, timeout=600)
    # And back: one process resumes FSDP2's sharded run from its (full) checkpoint.
    shutil.copytree(tmp_path / "fsdp" / "alm_stopped" / "checkpoints", tmp_path / "one" / "alm_resumed" / "checkpoints")
    _train({**runs["alm"], "out": str(tmp_path / "one" / "alm_resumed")})

    for run in two:
        out = Path(run["out"])
        if "stop_after" not in run:
            _assert_same_training(tmp_path / "one" / out.name.removesuffix("_resumed"), out,
                                  f"{out.parent.name}/{out.name}")
    _assert_same_training(tmp_path / "one" / "alm", tmp_path / "one" / "alm_resumed", "one process from FSDP2")
    # Every layout's checkpoints hold the same state: the stopped runs' at step 2, the finished runs' final one.
    for name, strategies in {"alm_stopped": ("one", "fsdp"), "alm": ("one", "ddp", "fsdp")}.items():
        states = {strategy: torch.load(tmp_path / strategy / name / "checkpoints" / "state.pt", weights_only=False)
                  for strategy in strategies}
        assert {state["step"] for state in states.values()} == {2 if name == "alm_stopped" else STEPS}
        for strategy in strategies[1:]:
            torch.testing.assert_close(states[strategy]["model"], states["one"]["model"], rtol=1e-5, atol=5e-5)


if __name__ == "__main__":
    with process_group():
        for run in json.loads(Path(sys.argv[1]).read_text()):
            _train(run)
