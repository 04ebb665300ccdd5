"""Stage `distill`: train the student with the distillation loss(es) `distill.loss` names, mixed with next-token
cross-entropy, across tokenizers (or within one).

Inputs: `data/prepared/` (both models' tokenizations of the training set), the teacher either as stored
logits (`data/teacher_logits/`, offline) or as a model run at every step (online), the student directory.
Outputs: the distilled student as a HF directory, a per-step history CSV, and checkpoints that let an
interrupted run resume at its last checkpoint.

On a share `distill.on_policy.fraction` of the steps (GKD's lambda; online teacher) the batch is not the
dataset's answers but responses the student samples (`components.on_policy`); generation and update times
are logged apart.

The whole training loop is `train` below: batch (dataset or student samples) -> teacher view -> student view
-> loss terms -> combine -> step.

Under `torchrun --nproc-per-node N -m flows.distill` (`process_group`) N processes train one student:
`distill.batch_size` stays the global batch and each rank takes its contiguous share of every step's examples.
A loss is a mean over its own units (target rows, chunks, paired positions), and the ranks' shares hold
different numbers of them, so averaging the ranks' means would not give the global mean: each rank's term is
rescaled to its share of the global one by all-reduced counts (`_global_terms`), and gradients are summed
over the ranks. The result equals one process on the same global batch, to float rounding.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from components.alignment import example_chunks
from components.config import DistillParams, TeacherLogitsParams
from components.data.chat import Encoded
from components.io import atomic_path, fingerprint, read_jsonl, require_manifest, write_json, write_text
from components.losses.base import Alignment, LossOutput, LossSetup, StudentView, TeacherView
from components.losses.combine import alpha_at, combine, term_weights
from components.losses.registry import build_losses, teacher_fields
from components.losses.token_stats import hidden_states, next_token_stats, output_head
from components.models import MODEL_CARD, load_model, load_tokenizer, model_card
from components.models.gguf import default_cache_dir
from components.models.token_bytes import boundary_mask
from components.on_policy import OnPolicySampler, is_on_policy_step
from components.teacher_logits import Teacher, TeacherLogitsReader, pad_batch, stored_encoded



@dataclass
class Batch:
    student_ids: torch.Tensor
    student_attention: torch.Tensor
    student_loss_mask: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_attention: torch.Tensor
    teacher_loss_mask: torch.Tensor
    alignment: Alignment
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # stored teacher fields, padded (offline)


def _pad_values(rows: list[Sequence | torch.Tensor], width: int, fill: int | float) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long if isinstance(fill, int) else torch.float32)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=out.dtype)
    return out


def _pad_topk(rows: list[torch.Tensor], length: int, fill: int | float) -> torch.Tensor:
    """Stored [L_i, k_i] top-k rows -> [B, length, max k_i]. Rows narrower than the widest are padded with
    (id 0, -inf), which adds nothing; positions past an example's end get (id 0, log-prob 0), a valid one-hot
    that the loss masks out."""
    width = max(row.shape[-1] for row in rows)
    out = torch.full((len(rows), length, width), fill, dtype=torch.long if isinstance(fill, int) else torch.float32)
    for index, row in enumerate(rows):
        out[index, : len(row), : row.shape[-1]] = row
        out[index, len(row):, 0] = 0
    return out


def make_batch(students: list[Encoded], teachers: list[Encoded], word_starts: dict[str, torch.Tensor],
               stored: list[dict] | None = None) -> Batch:
    """Pad both tokenizations; align them into ALM chunks on the common byte spans; pad stored teacher data."""
    per_example = [example_chunks(teacher, student) for teacher, student in zip(teachers, students)]
    student_ids, student_attention = pad_batch([s.input_ids for s in students])
    teacher_ids, teacher_attention = pad_batch([t.input_ids for t in teachers])
    num_chunks = max(1, max(len(is_target) for _, _, is_target in per_example))
    alignment = Alignment(
        teacher_chunks=_pad_values([t for t, _, _ in per_example], teacher_ids.shape[1], -1),
        student_chunks=_pad_values([s for _, s, _ in per_example], student_ids.shape[1], -1),
        chunk_is_target=_pad_values([target for _, _, target in per_example], num_chunks, 0).bool(),
        teacher_word_start=word_starts["teacher"][teacher_ids] & teacher_attention.bool(),
        student_word_start=word_starts["student"][student_ids] & student_attention.bool(),
    )
    batch = Batch(
        student_ids, student_attention, _pad_values([s.loss_mask for s in students], student_ids.shape[1], 0).bool(),
        teacher_ids, teacher_attention, _pad_values([t.loss_mask for t in teachers], teacher_ids.shape[1], 0).bool(),
        alignment,
    )
    if stored is not None:
        width = teacher_ids.shape[1]
        batch.stored = {
            "token_logprobs": _pad_values([s["token_logprobs"] for s in stored], width, 0.0),
            "boundary_logprobs": _pad_values([s["boundary_logprobs"] for s in stored], width, 0.0),
            "topk_ids": _pad_topk([s["topk_ids"] for s in stored], width, 0),
            "topk_logprobs": _pad_topk([s["topk_logprobs"] for s in stored], width, float("-inf")),
        }
    return batch


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, block: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A seeded shuffle that keeps blocks of `block` consecutive examples together (the stored teacher's
    shards): the blocks in random order, each block's examples in random order. Reading the stored logits
    in this order decodes each shard once per epoch and holds one at a time."""
    rng = random.Random(f"{seed}-{epoch}")
    starts = list(range(0, n_examples, block))
    rng.shuffle(starts)
    order = []
    for start in starts:
        members = list(range(start, min(start + block, n_examples)))
        rng.shuffle(members)
        order += members
    return tuple(order)


def batch_indices(step: int, batch_size: int, n_examples: int, block: int, seed: int) -> list[int]:
    """Example indices of a step: a fresh seeded shard-blocked permutation each epoch, so a resumed run (and an
    online run, which has no shards) sees the same data as an uninterrupted offline one."""
    return [_epoch_order(n_examples, block, seed, position // n_examples)[position % n_examples]
            for position in range(step * batch_size, (step + 1) * batch_size)]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: rank 0 of 1 unless `process_group` joined several."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> Ranks:
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


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """Join the processes `torchrun` (or `accelerate launch`) started, when its WORLD_SIZE is above 1. The backend
    is gloo: distill trains on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield Ranks()
        return
    dist.init_process_group("gloo")
    try:
        yield Ranks.current()
    finally:
        dist.destroy_process_group()


def _global_terms(outputs: dict[str, LossOutput], ranks: Ranks) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each term as this rank's share of its value on the global batch, and that global value.

    A term sums means, each over its own units. A mean's global value is sum_r value_r * count_r / sum_r count_r,
    so rank r's share is value_r * count_r / (the global count): the shares, and their gradients summed over the
    ranks, add up to the term on the global batch whatever each rank's count. One process: the terms as they are.
    """
    if ranks.size == 1:
        return {name: output.loss for name, output in outputs.items()}, {
            name: output.loss.item() for name, output in outputs.items()}
    parts = [(name, part) for name, output in outputs.items() for part in output.parts]
    counts = [float(part.count) for _, part in parts]
    totals = ranks.sum_floats(counts + [float(part.value.detach()) * count for (_, part), count in zip(parts, counts)])
    shares: dict[str, torch.Tensor] = {}
    values: dict[str, float] = {}
    for (name, part), count, global_count, global_sum in zip(parts, counts, totals[: len(parts)], totals[len(parts):]):
        global_count = max(global_count, 1.0)
        share = part.value * (count / global_count)
        shares[name] = shares[name] + share if name in shares else share
        values[name] = values.get(name, 0.0) + global_sum / global_count
    return shares, values


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then linear decay to zero at the last step (spec 1.17)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, 1 - (step - warmup) / max(1, steps - warmup))


def history_csv(rows: list[dict], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _teacher_view(batch: Batch, stored: bool, live: Teacher | None, vocab_size: int, params: DistillParams,
                  temperature: float) -> TeacherView:
    """The teacher's signals for this batch: padded stored data (offline) or a live forward pass (online)."""
    common = dict(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention, loss_mask=batch.teacher_loss_mask,
                  vocab_size=vocab_size, truncation=params.teacher)
    if stored:
        return TeacherView(**common, token_logprobs=batch.stored["token_logprobs"],
                           boundary_logprobs=batch.stored["boundary_logprobs"], topk_ids=batch.stored["topk_ids"],
                           topk_logprobs=batch.stored["topk_logprobs"], stored_temperature=temperature)
    head = output_head(live.model)
    with torch.no_grad():
        hidden = hidden_states(live.model, batch.teacher_ids, batch.teacher_attention)
        signals = next_token_stats(hidden, batch.teacher_ids, head, live.vocab_size, live.boundary, temperature,
                                   params.logits_chunk_size)
    return TeacherView(**common, token_logprobs=signals.token_logprobs, boundary_logprobs=signals.boundary_logprobs,
                       model=live.model, hidden=hidden, head=head)


def train(
    prepared_dir: Path, student_dir: Path, out_dir: Path, checkpoint_dir: Path, history_path: Path,
    params: DistillParams, teacher_params: TeacherLogitsParams, teacher_dir: Path, teacher_logits_dir: Path | None,
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
) -> dict:
    """Train the student; every rank of a `process_group` runs this, on its share of each step's batch."""
    ranks = Ranks.current()
    if params.batch_size < ranks.size:
        raise ValueError(f"distill.batch_size {params.batch_size} is the global batch and must give every one of the "
                         f"{ranks.size} processes at least one example")
    prepared = require_manifest(prepared_dir, "prepare")
    students = [Encoded.from_json(r) for r in read_jsonl(prepared_dir / "train.student.jsonl")]
    teachers = [Encoded.from_json(r) for r in read_jsonl(prepared_dir / "train.teacher.jsonl")]
    student_card, teacher_card = model_card(student_dir), model_card(teacher_dir)
    setup = LossSetup(teacher_dir, student_dir, teacher_card["tokenizer_sha256"] == student_card["tokenizer_sha256"],
                      default_cache_dir())
    term_names = params.losses if params.losses == ["sft"] else [*params.losses, "sft"]
    losses = torch.nn.ModuleDict(build_losses(term_names, params, setup))
    history_fields = ("step", "loss", *(f"{name}_loss" for name in term_names), "alpha", "learning_rate", "on_policy",
                      "completion_tokens", "generation_seconds", "update_seconds", "seconds")

    stored = live = None
    if params.teacher_mode == "offline":
        stored = TeacherLogitsReader(teacher_logits_dir, teacher_fields(losses), prepared["splits"]["train"]["sha256"]["teacher"],
                                     teacher_card)
        temperature, teacher_vocab = stored.manifest["temperature"], stored.manifest["vocab_size"]
    else:
        live = Teacher.load(teacher_dir, teacher_params.dtype)
        temperature, teacher_vocab = teacher_params.temperature, live.vocab_size

    torch.manual_seed(params.seed)
    tokenizer = load_tokenizer(student_dir)
    student = load_model(student_dir, torch.float32).train()
    head = output_head(student)
    vocab_rows = student.get_output_embeddings().weight.shape[0]
    boundary = boundary_mask(tokenizer, vocab_rows)
    teacher_tokenizer = load_tokenizer(teacher_dir)
    word_starts = {"student": boundary, "teacher": boundary_mask(teacher_tokenizer, len(teacher_tokenizer))}
    if params.on_policy.fraction > 0:  # some steps train on the student's own answers to these questions
        questions = [record["question"] for record in read_jsonl(prepared_dir / "train.jsonl")]
        generation_eos = student.generation_config.eos_token_id
        sampler = OnPolicySampler(tokenizer, None if setup.same_tokenizer else teacher_tokenizer,
                                  set(generation_eos if isinstance(generation_eos, list) else [generation_eos]) - {None},
                                  params.on_policy, params.seed)
    trainable = [*student.parameters(), *losses.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)

    key = fingerprint({"params": params.model_dump(), "prepared": prepared["splits"]["train"]["sha256"],
                       "student": student_card, "teacher_temperature": temperature})
    state_path = checkpoint_dir / "state.pt"
    start_step, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["fingerprint"] == key:
            student.load_state_dict(state["model"])
            losses.load_state_dict(state["losses"])
            optimizer.load_state_dict(state["optimizer"])
            start_step, history = state["step"], state["history"]
            if ranks.main:
                print(f"distill: resuming from checkpoint at step {start_step}")
    if ranks.size > 1:
        dist.barrier()  # every rank has read the checkpoint before rank 0 may remove it
        for parameter in trainable:  # the ranks start equal (as DDP does), then take the same summed steps
            dist.broadcast(parameter.data, 0)
    if ranks.main:
        if start_step == 0:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # checkpoints of another configuration
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(range(start_step, params.steps), desc=f"distill ({'+'.join(params.losses)})", unit="step",
               initial=start_step, total=params.steps, disable=not ranks.main)
    for step in bar:
        started = time.perf_counter()
        indices = ranks.share(batch_indices(step, params.batch_size, len(students), teacher_params.examples_per_shard,
                                            params.seed))
        on_policy = is_on_policy_step(step, params.on_policy.fraction, params.seed)
        generation_seconds, completion_tokens = 0.0, 0.0
        if on_policy:  # the student answers the batch's questions; the teacher scores its samples
            # Each rank seeds its draws with its own key, so ranks never share a random stream.
            sample_key = step if ranks.size == 1 else step * ranks.size + ranks.rank
            sampled_students, sampled_teachers = sampler(student, [questions[i] for i in indices], sample_key)
            generation_seconds = time.perf_counter() - started
            (sampled_tokens,) = ranks.sum_floats([sum(e.loss_mask.count(True) for e in sampled_students)])
            completion_tokens = sampled_tokens / params.batch_size
            batch = make_batch(sampled_students, sampled_teachers, word_starts)
        elif stored is not None:  # offline: the teacher side is what was stored, joined to the student's by index
            examples = [stored[i] for i in indices]
            batch = make_batch([students[i] for i in indices], [stored_encoded(e) for e in examples], word_starts, examples)
        else:
            batch = make_batch([students[i] for i in indices], [teachers[i] for i in indices], word_starts)
        teacher = _teacher_view(batch, stored is not None, live, teacher_vocab, params, temperature)
        weights = term_weights(params, step, on_policy)
        hidden = hidden_states(student, batch.student_ids, batch.student_attention)
        needs_boundary = any(losses[name].needs_student_boundary for name in weights)
        signals = next_token_stats(hidden, batch.student_ids, head, len(tokenizer), boundary if needs_boundary else None,
                                   chunk_size=params.logits_chunk_size)
        view = StudentView(student, hidden, head, len(tokenizer), batch.student_ids, batch.student_attention,
                           batch.student_loss_mask, signals.token_logprobs, signals.boundary_logprobs,
                           params.logits_chunk_size)

        outputs = {name: losses[name](view, teacher, batch.alignment) for name in weights}
        terms, values = _global_terms(outputs, ranks)
        metrics = {f"{name}_loss": value for name, value in values.items()}
        for name, output in outputs.items():  # diagnostics: this rank's (rank 0's when logged)
            metrics.update({f"{name}.{key}": value for key, value in output.metrics.items()})
        loss, used = combine(terms, weights, params.combine, [student.get_output_embeddings().weight], ranks.sum)
        total = loss.item() if ranks.size == 1 else sum(used[name] * values[name] for name in used)
        if not math.isfinite(total):
            raise FloatingPointError(f"distill: loss is {total} at step {step}; lower distill.learning_rate")

        rate = learning_rate(step, params.steps, params.learning_rate, params.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ranks.sum([parameter.grad for parameter in trainable if parameter.grad is not None])
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm).item()
        optimizer.step()

        metrics.update({f"weight.{name}": value for name, value in used.items()})
        seconds = time.perf_counter() - started
        metrics.update(loss=total, alpha=1.0 if on_policy else alpha_at(step, params), learning_rate=rate,
                       on_policy=int(on_policy), completion_tokens=completion_tokens,
                       generation_seconds=generation_seconds, update_seconds=seconds - generation_seconds,
                       seconds=seconds)
        history.append({"step": step + 1, **{field: metrics.get(field, "") for field in history_fields[1:]}})
        if not ranks.main:
            continue
        log_metrics(metrics, step + 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
            with atomic_path(state_path) as temporary:
                torch.save({"fingerprint": key, "step": step + 1, "model": student.state_dict(),
                            "losses": losses.state_dict(), "optimizer": optimizer.state_dict(),
                            "history": history}, temporary)

    if ranks.main:
        with atomic_path(out_dir) as temporary:
            student.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            write_json(temporary / MODEL_CARD, {**student_card, "name": f"{student_card['name']}-distilled",
                                                "distilled_from": student_card["name"], "loss": params.losses})
        write_text(history_path, history_csv(history, history_fields))
    timed = history[start_step:]
    summary = {"loss": "+".join(params.losses), "steps": params.steps, "resumed_from_step": start_step,
               "final_loss": history[-1]["loss"], "on_policy_steps": sum(row["on_policy"] for row in history),
               "median_seconds_per_step": _median([row["seconds"] for row in timed]),
               "median_update_seconds": _median([row["update_seconds"] for row in timed])}
    if any(row["on_policy"] for row in timed):
        summary["median_generation_seconds"] = _median([row["generation_seconds"] for row in timed if row["on_policy"]])
    return summary


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")
