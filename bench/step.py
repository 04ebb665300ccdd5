"""Benchmark: one distill step with ALM against plain next-token cross-entropy (`loss: sft`), same student and
batch, on random-init models of real shapes; and the step's peak GPU memory with a Gemma-3-shaped teacher
(262,144-row vocabulary) against the student's own CE step.

Both steps run the training engine as `distill` does (`Engine.step` over `student_forward`, AdamW, clipping),
in `runtime.precision` (bf16-mixed on CUDA: bf16 autocast over fp32 weights and optimizer state). The ALM step
adds the ALM term to the CE term (alpha 0.5, as distill mixes them) and reads a live teacher's signals
(`LiveTeacher.view`). Reported per student:

- `step_ratio`: ALM step time over CE step time, the teacher's signals at hand (as stored logits give them:
  the loss's own cost; goal at most 1.10);
- `live_step_ratio`: the same with the live teacher's forward counted in the ALM step;
- `memory_ratio`: the ALM step's peak GPU memory (the teacher's weights resident) over the CE step's, each
  `torch.cuda.max_memory_allocated` from the model's creation to the last timed step (goal at most 1.5).
  On the CPU no peak is measured (null): the process's high-water mark cannot be reset between the two;
- training tokens per second: the batch's real student tokens over the step's median time.

Students: SmolLM2-135M's and Qwen2.5-0.5B's shapes; teacher: Gemma-3-270M's; batch 16 x 512 tokens of
byte-aligned synthetic text, tokenized by two small tokenizers trained here (`bench/shapes.py`); the softmaxes
span the real tokenizers' sizes (49,152 / 151,665 / 262,144). `--quick`: tiny shapes, batch 2 x 64.

Usage: python bench/step.py [--device auto|cpu|cuda] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenbridge.config import RuntimeParams, TeacherTruncation  # noqa: E402
from tokenbridge.data.chat import Encoded  # noqa: E402
from tokenbridge.losses.base import LossSetup  # noqa: E402
from tokenbridge.losses.registry import build_losses  # noqa: E402
from tokenbridge.models import load_tokenizer  # noqa: E402
from tokenbridge.params import DistillParams  # noqa: E402
from tokenbridge.runtime import Runtime  # noqa: E402
from tokenbridge.token_bytes import boundary_mask  # noqa: E402
from tokenbridge.training.batching import Batch, make_batch  # noqa: E402
from tokenbridge.training.engine import Engine  # noqa: E402
from tokenbridge.training.parallel import TrainingModule  # noqa: E402
from tokenbridge.training.ranks import Ranks  # noqa: E402
from tokenbridge.training.schedules import term_weights  # noqa: E402
from tokenbridge.training.teachers import LiveTeacher, Teacher, unread_view  # noqa: E402
from tokenbridge.training.views import student_forward  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, build_model, synthetic_examples, tokenizer_dirs  # noqa: E402

GOALS = {"step_ratio_max": 1.10, "memory_ratio_max": 1.5}
FULL = {"students": ("smollm2-135m", "qwen2.5-0.5b"), "teacher": "gemma-3-270m", "batch_size": 16, "tokens": 512,
        "warmup": 2, "steps": 5}
QUICK = {"students": ("tiny-llama", "tiny-qwen2"), "teacher": "tiny-gemma3", "batch_size": 2, "tokens": 64,
         "warmup": 1, "steps": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work, *args):
    """`work(*args)` and its seconds, the device's queued work included."""
    _sync(device)
    started = time.perf_counter()
    result = work(*args)
    _sync(device)
    return result, time.perf_counter() - started


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(student_shape: str, loss: str, batch: Batch, runtime: Runtime, setup: LossSetup, student_tokenizer,
            teacher: LiveTeacher | None, chunk_size: int, warmup: int, steps: int) -> dict:
    """Median seconds of `steps` engine steps after `warmup`, on a freshly built student (the same seed for
    every loss); with a teacher, also its `view` seconds. Peak memory from the student's creation on (what
    was allocated before, the batch and a teacher, included)."""
    device = runtime.device
    _release(device)
    shape = SHAPES[student_shape]
    params = DistillParams(teacher_mode="online", steps=warmup + steps, batch_size=batch.student_ids.shape[0],
                           learning_rate=1e-5, checkpoint_every=warmup + steps + 1, loss=loss,
                           logits_chunk_size=chunk_size)
    student = runtime.prepare_student(build_model(student_shape, device).train())
    losses = torch.nn.ModuleDict(build_losses(params.losses if loss == "sft" else [*params.losses, "sft"], params,
                                              setup)).to(device)
    module = TrainingModule(student, losses, student_forward(student, losses, shape.tokenizer_size,
                                                             boundary_mask(student_tokenizer, shape.rows).to(device),
                                                             chunk_size))
    engine = Engine(module, torch.optim.AdamW(module.parameters(), lr=params.learning_rate), runtime, Ranks(),
                    params.max_grad_norm, params.combine, [student.get_output_embeddings().weight])
    weights = term_weights(params, 0)
    step_seconds, view_seconds = [], []
    unread = unread_view(batch, 0, TeacherTruncation())  # the CE step's `sft` reads only the student: no teacher runs
    for step in range(warmup + steps):
        view, seconds = _timed(device, teacher.view, batch) if teacher else (unread, 0.0)
        result, step_time = _timed(device, engine.step, [batch], [view], weights, params.learning_rate,
                                   f"{loss} step {step}")
        if step >= warmup:
            step_seconds.append(step_time)
            view_seconds.append(seconds)
    tokens = int(batch.student_attention.sum())
    seconds = statistics.median(step_seconds)
    out = {"loss": loss, "terms": result.values, "seconds_per_step": seconds, "tokens_per_second": tokens / seconds,
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    if teacher:
        live = statistics.median([a + b for a, b in zip(step_seconds, view_seconds, strict=True)])
        out.update(teacher_seconds=statistics.median(view_seconds), live_seconds_per_step=live,
                   live_tokens_per_second=tokens / live)
    return out  # the student, its optimizer state and activations are freed here; the next measure starts clean


@dataclass(frozen=True)
class SyntheticBatch:
    """One batch of synthetic text under the two small tokenizers (`shapes.tokenizer_dirs`), as a step trains on it."""

    tokenizers: dict[str, PreTrainedTokenizerBase]
    examples: dict[str, list[Encoded]]
    batch: Batch
    setup: LossSetup


def synthetic_batch(scratch: Path, batch_size: int, tokens: int, device: torch.device) -> SyntheticBatch:
    """`batch_size` examples of `tokens` student tokens, on `device`; the tokenizers and the loss cache in `scratch`."""
    dirs = tokenizer_dirs(scratch)
    tokenizers = {role: load_tokenizer(path) for role, path in dirs.items()}
    examples = synthetic_examples(tokenizers, batch_size, tokens, seed=1)
    word_starts = {role: boundary_mask(tokenizer, len(tokenizer)) for role, tokenizer in tokenizers.items()}
    batch = make_batch(examples["student"], examples["teacher"], word_starts).to(device)
    return SyntheticBatch(tokenizers, examples, batch, LossSetup(dirs["teacher"], dirs["student"], False,
                                                                  scratch / "cache"))


def run(quick: bool, device: str, precision: str | None, chunk_size: int) -> dict:
    plan = QUICK if quick else FULL
    runtime = Runtime.resolve(RuntimeParams(device=device, precision=precision or ("bf16-mixed" if (
        device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "fp32")))
    with tempfile.TemporaryDirectory() as scratch:
        data = synthetic_batch(Path(scratch), plan["batch_size"], plan["tokens"], runtime.device)
        tokenizers, examples, batch, setup = data.tokenizers, data.examples, data.batch, data.setup
        teacher_shape = SHAPES[plan["teacher"]]
        students = {name: {"ce": measure(name, "sft", batch, runtime, setup, tokenizers["student"], None, chunk_size,
                                         plan["warmup"], plan["steps"])} for name in plan["students"]}
        model = build_model(plan["teacher"], runtime.device, runtime.inference_dtype,
                            seed=1).eval().requires_grad_(False)
        teacher = LiveTeacher(Teacher(model, teacher_shape.tokenizer_size,
                                      boundary_mask(tokenizers["teacher"], teacher_shape.rows).to(runtime.device)),
                              examples["teacher"], TeacherTruncation(), 1.0, chunk_size)
        for name, row in students.items():
            row["alm"] = measure(name, "alm", batch, runtime, setup, tokenizers["student"], teacher, chunk_size,
                                 plan["warmup"], plan["steps"])
            row["step_ratio"] = row["alm"]["seconds_per_step"] / row["ce"]["seconds_per_step"]
            row["live_step_ratio"] = row["alm"]["live_seconds_per_step"] / row["ce"]["seconds_per_step"]
            row["memory_ratio"] = (row["alm"]["peak_memory_bytes"] / row["ce"]["peak_memory_bytes"]
                                   if row["ce"]["peak_memory_bytes"] else None)
    return {
        "machine": runtime.describe()["device_name"], "threads": torch.get_num_threads(), "torch": torch.__version__,
        "runtime": runtime.describe(), "quick": quick, "teacher": plan["teacher"],
        "batch_size": plan["batch_size"], "tokens_per_example": plan["tokens"],
        "student_tokens": int(batch.student_attention.sum()), "teacher_tokens": int(batch.teacher_attention.sum()),
        "chunk_size": chunk_size, "warmup_steps": plan["warmup"], "timed_steps": plan["steps"],
        "peak_memory": "torch.cuda.max_memory_allocated" if runtime.device.type == "cuda" else None,
        "goals": GOALS, "students": students,
    }


def markdown(result: dict) -> str:
    gib = 2**30

    def memory(row: dict) -> str:
        return "n/a" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / gib:.2f}"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [f"# Distill step: ALM against next-token CE ({result['machine']}, {result['runtime']['precision']}, "
             f"torch {result['torch']})", "",
             f"Batch {result['batch_size']} x {result['tokens_per_example']} tokens "
             f"({result['student_tokens']} student tokens), teacher {result['teacher']} "
             f"({result['teacher_tokens']} tokens), median of {result['timed_steps']} steps after "
             f"{result['warmup_steps']} warm-up.", "",
             "| student | CE s/step | CE tokens/s | ALM s/step | ALM / CE (goal <= 1.10) | teacher s "
             "| ALM+teacher / CE | ALM tokens/s (live) | CE peak GiB | ALM peak GiB | memory ALM / CE (goal <= 1.5) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["students"].items():
        ce, alm = row["ce"], row["alm"]
        lines.append(f"| {name} | {ce['seconds_per_step']:.3f} | {ce['tokens_per_second']:.0f} | "
                     f"{alm['seconds_per_step']:.3f} | {row['step_ratio']:.2f} | {alm['teacher_seconds']:.3f} | "
                     f"{row['live_step_ratio']:.2f} | {alm['live_tokens_per_second']:.0f} | {memory(ce)} | "
                     f"{memory(alm)} | {ratio(row['memory_ratio'])} |")
    if result["peak_memory"] is None:
        lines += ["", "Peak memory: not measured on the CPU."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as runtime.device")
    parser.add_argument("--precision", choices=("bf16-mixed", "fp32"),
                        help="as runtime.precision (default: bf16-mixed on CUDA, fp32 on the CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, batch 2 x 64 (the CPU check in make test)")
    parser.add_argument("--chunk-size", type=int, default=DistillParams.model_fields["logits_chunk_size"].default,
                        help="distill.logits_chunk_size: positions per slice of the vocabulary projection")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.quick, args.device, args.precision, args.chunk_size)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
