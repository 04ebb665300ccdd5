"""Stage `distill`: train the student with ALM + next-token cross-entropy across tokenizers.

Inputs: `data/prepared/` (both models' tokenizations of the training set), the teacher either as stored
logits (`data/teacher_logits/`, offline) or as a model run at every step (online), the student directory.
Outputs: the distilled student as a HF directory, a per-step history CSV, and checkpoints that let an
interrupted run resume at its last checkpoint.

The whole training loop is `train` below: batch -> teacher signals -> student signals -> losses -> step.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from components.alignment import align_chunks, chunk_ids
from components.config import DistillParams, TeacherLogitsParams
from components.data.chat import Encoded
from components.io import atomic_path, fingerprint, read_jsonl, require_manifest, write_json, write_text
from components.losses.alm import AlmOptions, alm_loss
from components.losses.sft import sft_loss
from components.losses.token_stats import hidden_states, next_token_stats, output_head
from components.models import MODEL_CARD, load_model, load_tokenizer, model_card
from components.models.token_bytes import boundary_mask
from components.teacher_logits import Teacher, TeacherLogitsReader, pad_batch

HISTORY_FIELDS = ("step", "loss", "alm_loss", "sft_loss", "learning_rate", "seconds")


@dataclass
class Batch:
    student_ids: torch.Tensor
    student_attention: torch.Tensor
    student_loss_mask: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_attention: torch.Tensor
    teacher_chunks: torch.Tensor
    student_chunks: torch.Tensor
    teacher_token_rows: torch.Tensor | None = None  # stored teacher signals (offline mode)
    teacher_boundary_rows: torch.Tensor | None = None


def _pad_values(rows: list[Sequence | torch.Tensor], width: int, fill: int | float) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long if isinstance(fill, int) else torch.float32)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=out.dtype)
    return out


def make_batch(students: list[Encoded], teachers: list[Encoded], stored: list[dict] | None = None) -> Batch:
    """Pad both tokenizations and compute each token's ALM chunk id from the common byte spans."""
    teacher_chunks, student_chunks = [], []
    for teacher, student in zip(teachers, students):
        chunks = align_chunks(teacher.spans, student.spans)
        t_ids, s_ids = chunk_ids(chunks, len(teacher.input_ids), len(student.input_ids), teacher.loss_mask, student.loss_mask)
        teacher_chunks.append(t_ids)
        student_chunks.append(s_ids)
    student_ids, student_attention = pad_batch([s.input_ids for s in students])
    teacher_ids, teacher_attention = pad_batch([t.input_ids for t in teachers])
    batch = Batch(
        student_ids, student_attention, _pad_values([s.loss_mask for s in students], student_ids.shape[1], 0).bool(),
        teacher_ids, teacher_attention,
        _pad_values(teacher_chunks, teacher_ids.shape[1], -1), _pad_values(student_chunks, student_ids.shape[1], -1),
    )
    if stored is not None:
        batch.teacher_token_rows = _pad_values([s["token_logprobs"] for s in stored], teacher_ids.shape[1], 0.0)
        batch.teacher_boundary_rows = _pad_values([s["boundary_logprobs"] for s in stored], teacher_ids.shape[1], 0.0)
    return batch


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_examples))
    random.Random(seed + epoch).shuffle(order)
    return tuple(order)


def batch_indices(step: int, batch_size: int, n_examples: int, seed: int) -> list[int]:
    """Example indices of a step: a fresh seeded permutation each epoch, so a resumed run sees the same data."""
    return [_epoch_order(n_examples, seed, position // n_examples)[position % n_examples]
            for position in range(step * batch_size, (step + 1) * batch_size)]


def learning_rate(step: int, params: DistillParams) -> float:
    """Linear warm-up, then linear decay to zero at the last step (spec 1.17)."""
    if step < params.warmup_steps:
        return params.learning_rate * (step + 1) / params.warmup_steps
    remaining = params.steps - params.warmup_steps
    return params.learning_rate * max(0.0, 1 - (step - params.warmup_steps) / max(1, remaining))


def _history_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def train(
    prepared_dir: Path, student_dir: Path, out_dir: Path, checkpoint_dir: Path, history_path: Path,
    params: DistillParams, teacher_params: TeacherLogitsParams, teacher_dir: Path, teacher_logits_dir: Path | None,
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
) -> dict:
    prepared = require_manifest(prepared_dir, "prepare")
    students = [Encoded.from_json(r) for r in read_jsonl(prepared_dir / "train.student.jsonl")]
    teachers = [Encoded.from_json(r) for r in read_jsonl(prepared_dir / "train.teacher.jsonl")]
    stored = live = None
    if params.teacher_mode == "offline":
        stored = TeacherLogitsReader(teacher_logits_dir, ("token_logprobs", "boundary_logprobs"),
                                     prepared["splits"]["train"]["sha256"]["teacher"])
        temperature = stored.manifest["temperature"]
    else:
        live = Teacher.load(teacher_dir, teacher_params.dtype)
        temperature = teacher_params.temperature

    torch.manual_seed(params.seed)
    tokenizer = load_tokenizer(student_dir)
    student = load_model(student_dir, torch.float32).train()
    head = output_head(student)
    vocab_rows = student.get_output_embeddings().weight.shape[0]
    boundary = boundary_mask(tokenizer, vocab_rows)
    optimizer = torch.optim.AdamW(student.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    options = AlmOptions(**params.alm.model_dump())

    key = fingerprint({"params": params.model_dump(), "prepared": prepared["splits"]["train"]["sha256"],
                       "student": model_card(student_dir), "teacher_temperature": temperature})
    state_path = checkpoint_dir / "state.pt"
    start_step, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["fingerprint"] == key:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_step, history = state["step"], state["history"]
            print(f"distill: resuming from checkpoint at step {start_step}")
    if start_step == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # checkpoints of another configuration
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(range(start_step, params.steps), desc="distill", unit="step", initial=start_step, total=params.steps)
    for step in bar:
        started = time.perf_counter()
        indices = batch_indices(step, params.batch_size, len(students), params.seed)
        batch = make_batch([students[i] for i in indices], [teachers[i] for i in indices],
                           [stored[i] for i in indices] if stored else None)
        if live is not None:
            signals = live.stats(batch.teacher_ids, batch.teacher_attention, temperature, 0, params.logits_chunk_size)
            batch.teacher_token_rows, batch.teacher_boundary_rows = signals.token_logprobs, signals.boundary_logprobs

        hidden = hidden_states(student, batch.student_ids, batch.student_attention)
        signals = next_token_stats(hidden, batch.student_ids, head, len(tokenizer), boundary, chunk_size=params.logits_chunk_size)
        metrics: dict[str, float] = {}
        loss = torch.zeros(())
        if params.alm_weight > 0:
            alm = alm_loss(batch.teacher_token_rows, batch.teacher_boundary_rows, signals.token_logprobs,
                           signals.boundary_logprobs, batch.teacher_chunks, batch.student_chunks, options)
            loss = loss + params.alm_weight * alm.loss
            metrics.update(alm_loss=alm.loss.item(), alm_chunks=float(alm.num_chunks))
        if params.sft_weight > 0:
            sft = sft_loss(signals.token_logprobs, batch.student_loss_mask)
            loss = loss + params.sft_weight * sft
            metrics["sft_loss"] = sft.item()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"distill: loss is {loss.item()} at step {step}; lower distill.learning_rate")

        rate = learning_rate(step, params)
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(student.parameters(), params.max_grad_norm).item()
        optimizer.step()

        metrics.update(loss=loss.item(), learning_rate=rate, seconds=time.perf_counter() - started)
        history.append({"step": step + 1, **{field: metrics.get(field, "") for field in HISTORY_FIELDS[1:]}})
        log_metrics(metrics, step + 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
            with atomic_path(state_path) as temporary:
                torch.save({"fingerprint": key, "step": step + 1, "model": student.state_dict(),
                            "optimizer": optimizer.state_dict(), "history": history}, temporary)

    with atomic_path(out_dir) as temporary:
        student.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        card = model_card(student_dir)
        write_json(temporary / MODEL_CARD, {**card, "name": f"{card['name']}-distilled", "distilled_from": card["name"]})
    write_text(history_path, _history_csv(history))
    seconds = [row["seconds"] for row in history[start_step:]]
    return {"steps": params.steps, "resumed_from_step": start_step, "final_loss": history[-1]["loss"],
            "median_seconds_per_step": sorted(seconds)[len(seconds) // 2] if seconds else float("nan")}
