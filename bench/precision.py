"""Benchmark: one training step in bf16-mixed against fp32, same student and batch, in one run: whether asking
for `runtime.precision: bf16-mixed` pays on this machine.

`precision: auto` trains in fp32 on every CPU (docs/runtime.md); bf16 autocast is there to be asked for. Whether it
pays depends on the CPU: with AMX or AVX512-BF16 its matmuls are native, without them oneDNN emulates them and
they run many times slower than fp32. The step is the training engine's (`step.measure`: `Engine.step` over
`student_forward`, AdamW, clipping) with next-token CE (`loss: sft`), on a random-init model of a real student's
shape. Reported: each precision's median seconds per step, training tokens per second, and fp32 / bf16-mixed
(above 1: bf16-mixed is faster), beside whether the runtime counts this device's bf16 as native.

Usage: python bench/precision.py [--device auto|cpu|cuda] [--student smollm2-135m] [--batch 2] [--tokens 512]
       [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenbridge.config import RuntimeParams  # noqa: E402
from tokenbridge.params import DistillParams  # noqa: E402
from tokenbridge.runtime import Runtime, machine, native_bf16  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES  # noqa: E402
from step import measure, synthetic_batch  # noqa: E402

PRECISIONS = ("fp32", "bf16-mixed")


def run(device: str, student: str, batch_size: int, tokens: int, warmup: int, steps: int) -> dict:
    runtimes = {precision: Runtime.resolve(RuntimeParams(device=device, precision=precision))
                for precision in PRECISIONS}
    where = runtimes["fp32"].device
    chunk_size = DistillParams.model_fields["logits_chunk_size"].default
    with tempfile.TemporaryDirectory() as scratch:
        data = synthetic_batch(Path(scratch), batch_size, tokens, where)
        steps_by_precision = {precision: measure(student, "sft", data.batch, runtime, data.setup,
                                                 data.tokenizers["student"], None, chunk_size, warmup, steps)
                              for precision, runtime in runtimes.items()}
        student_tokens = int(data.batch.student_attention.sum())
    return {"machine": machine(where), "native_bf16": native_bf16(where), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "student": student, "batch_size": batch_size, "tokens_per_example": tokens,
            "student_tokens": student_tokens, "warmup_steps": warmup, "timed_steps": steps,
            "steps": steps_by_precision,
            "fp32_over_bf16_mixed": (steps_by_precision["fp32"]["seconds_per_step"]
                                     / steps_by_precision["bf16-mixed"]["seconds_per_step"])}


def markdown(result: dict) -> str:
    lines = [f"# Training step: bf16-mixed against fp32 ({result['machine']}, {result['threads']} threads, "
             f"torch {result['torch']}; native bf16: {result['native_bf16']})", "",
             f"{result['student']}, batch {result['batch_size']} x {result['tokens_per_example']} tokens "
             f"({result['student_tokens']} student tokens), next-token CE, median of {result['timed_steps']} steps "
             f"after {result['warmup_steps']} warm-up.", "",
             "| precision | s/step | tokens/s |", "|---|---:|---:|"]
    for precision, row in result["steps"].items():
        lines.append(f"| {precision} | {row['seconds_per_step']:.3f} | {row['tokens_per_second']:.0f} |")
    lines += ["", f"fp32 / bf16-mixed: {result['fp32_over_bf16_mixed']:.2f} (above 1: bf16-mixed is faster here)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as runtime.device")
    parser.add_argument("--student", choices=sorted(SHAPES), default="smollm2-135m", help="the student's shape")
    parser.add_argument("--batch", type=int, default=2, help="examples per step")
    parser.add_argument("--tokens", type=int, default=512, help="student tokens per example")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision, after one warm-up")
    parser.add_argument("--quick", action="store_true", help="tiny-llama's shape, batch 2 x 64 (a smoke run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    student, tokens = ("tiny-llama", 64) if args.quick else (args.student, args.tokens)
    result = run(args.device, student, args.batch, tokens, warmup=1, steps=args.steps)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
