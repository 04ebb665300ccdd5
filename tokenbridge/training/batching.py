"""Batches of (student, teacher) examples: both tokenizations padded, aligned into ALM chunks on their common
byte spans, with the stored teacher data (offline) padded alongside; and the order examples are read in."""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenbridge.alignment import example_chunks
from tokenbridge.data.chat import Encoded
from tokenbridge.data.padding import pad_batch
from tokenbridge.losses.base import Alignment


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

    def to(self, device: torch.device) -> Batch:
        """Every tensor on `device` (a no-op where they already are)."""
        def move(value):
            return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

        alignment = Alignment(**{f.name: move(getattr(self.alignment, f.name)) for f in dataclasses.fields(Alignment)})
        moved = {f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in ("alignment", "stored")}
        return Batch(**moved, alignment=alignment, stored={key: move(value) for key, value in self.stored.items()})


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
    """Pad both tokenizations; align them into ALM chunks on the common byte spans; pad stored teacher data.
    `word_starts`: per role, which vocabulary rows start a word (on the CPU; the batch is built there)."""
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


def split(indices: list[int], size: int | None) -> list[list[int]]:
    """A process's share of a step cut into micro-batches of at most `size` examples (None: one micro-batch)."""
    size = size or max(1, len(indices))
    return [indices[start : start + size] for start in range(0, len(indices), size)]
