"""FSDP2 on one GPU (a process group of one, NCCL): the sharded training path runs on CUDA and trains like the
unwrapped module. Runs in `pytest -m cuda` (bench/device_check.sh); skipped without CUDA."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from components.config import RuntimeParams
from components.distill import train
from components.prepare import run_prepare
from components.runtime import Runtime
from components.teacher_logits import run_teacher_logits

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_fsdp2_on_one_gpu_trains_like_the_unwrapped_student(tiny_params, tiny_dirs, tmp_path, precision):
    runtime = Runtime.resolve(RuntimeParams(device="cuda", precision=precision, strategy="fsdp"))
    run_prepare(tiny_dirs, tmp_path / "prepared", tiny_params.prepare)
    run_teacher_logits(tmp_path / "prepared", tiny_dirs["teacher"], tmp_path / "logits", tiny_params.teacher_logits,
                       runtime)
    params = tiny_params.distill.model_copy(update={"steps": 3, "batch_size": 4, "checkpoint_every": 2})

    def run(name: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        train(tmp_path / "prepared", tiny_dirs["student"], out / "model", out / "checkpoints", out / "history.csv",
              params, tiny_params.teacher_logits, tiny_dirs["teacher"], tmp_path / "logits", runtime=runtime)
        return load_file(str(out / "model" / "model.safetensors"))

    plain = run("plain")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("cuda:nccl,cpu:gloo", rank=0, world_size=1)
    try:
        sharded = run("fsdp")
    finally:
        dist.destroy_process_group()
    if precision == "fp32":
        for key, tensor in plain.items():
            torch.testing.assert_close(sharded[key], tensor, rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")
        return
    # bf16: FSDP2 gathers bf16 parameters where the plain run autocasts fp32 ones, so the rounding differs; the
    # two must still agree far better than either moved from the initial weights.
    initial = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    moved = max((plain[key] - initial[key]).abs().max().item() for key in plain)
    apart = max((sharded[key] - plain[key]).abs().max().item() for key in plain)
    assert apart < 0.25 * moved, f"FSDP2 vs plain differ by {apart}, training moved the weights by {moved}"
