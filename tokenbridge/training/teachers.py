"""The teacher as training sees it: a frozen model, and the two sources of its per-position signals.

- `StoredTeacher`: what the `teacher_logits` stage stored (offline). Its examples are the stored teacher
  tokenizations, joined to the student's by training-example index; its view is the padded stored data.
- `LiveTeacher`: the teacher model run on every batch (online), under no gradient; its view also carries the
  hidden states and head (DSKD, MultiLevelOT and ULD's full distributions). It scores any batch, so it also
  scores the student's own samples (on-policy steps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from tokenbridge.config import TeacherTruncation
from tokenbridge.data.chat import Encoded
from tokenbridge.losses.base import TeacherView
from tokenbridge.losses.token_stats import (
    NextTokenStats,
    hidden_states,
    next_token_stats,
    output_head,
    truncated_next_token_stats,
)
from tokenbridge.models import load_model, load_tokenizer
from tokenbridge.stored_logits import TeacherLogitsReader, stored_encoded
from tokenbridge.token_bytes import boundary_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from tokenbridge.training.batching import Batch


@dataclass
class Teacher:
    """A loaded, frozen teacher and what its statistics need: the output head, real vocab size, boundary mask."""

    model: PreTrainedModel
    vocab_size: int
    boundary: torch.Tensor

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype, device: torch.device) -> Teacher:
        tokenizer = load_tokenizer(model_dir)
        # transformers wraps `to` in functools.wraps(Module.to), which mypy reads as the unbound method
        model = load_model(model_dir, dtype).to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
        rows = model.get_output_embeddings().weight.shape[0]
        return cls(model, len(tokenizer), boundary_mask(tokenizer, rows).to(device))

    @property
    def device(self) -> torch.device:
        return self.boundary.device

    @torch.no_grad()
    def stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float, top_k: int,
              top_p: float = 1.0) -> NextTokenStats:
        """The stored-logits statistics (truncated distribution, observed-token and boundary log-probs)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = hidden_states(self.model, input_ids, attention_mask)
        return truncated_next_token_stats(hidden, input_ids, attention_mask, self.model, self.vocab_size,
                                          self.boundary, temperature, top_k, top_p)


class StoredTeacher:
    """Offline: the stored teacher data, read in the shard-blocked order training asks for."""

    def __init__(self, reader: TeacherLogitsReader, truncation: TeacherTruncation):
        self.reader, self.truncation = reader, truncation
        self.temperature = reader.manifest.temperature
        self.vocab_size = reader.manifest.vocab_size

    def examples(self, indices: list[int]) -> tuple[list[Encoded], list[dict] | None]:
        """The teacher side of these training examples, and the stored data `make_batch` pads."""
        stored = [self.reader[index] for index in indices]
        return [stored_encoded(example) for example in stored], stored

    def view(self, batch: Batch, signals: bool = True) -> TeacherView:
        """The batch's stored teacher data; without it when `signals` is False (see `signals_read`)."""
        if not signals:
            return unread_view(batch, self.vocab_size, self.truncation)
        return TeacherView(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention,
                           loss_mask=batch.teacher_loss_mask, vocab_size=self.vocab_size, truncation=self.truncation,
                           token_logprobs=batch.stored["token_logprobs"],
                           boundary_logprobs=batch.stored["boundary_logprobs"], topk_ids=batch.stored["topk_ids"],
                           topk_logprobs=batch.stored["topk_logprobs"], stored_temperature=self.temperature)


class LiveTeacher:
    """Online: the teacher runs on every batch (no gradient), with its own tokenization of the examples."""

    def __init__(self, teacher: Teacher, encoded: list[Encoded], truncation: TeacherTruncation, temperature: float,
                 chunk_size: int):
        self.teacher, self.encoded, self.truncation = teacher, encoded, truncation
        self.temperature, self.chunk_size = temperature, chunk_size
        self.vocab_size = teacher.vocab_size

    def examples(self, indices: list[int]) -> tuple[list[Encoded], None]:
        return [self.encoded[index] for index in indices], None

    @torch.no_grad()
    def view(self, batch: Batch, signals: bool = True) -> TeacherView:
        """The teacher's forward on the batch; skipped when `signals` is False (see `signals_read`)."""
        if not signals:
            return unread_view(batch, self.vocab_size, self.truncation)
        model = self.teacher.model
        head = output_head(model)
        hidden = hidden_states(model, batch.teacher_ids, batch.teacher_attention)
        stats = next_token_stats(hidden, batch.teacher_ids, head, self.vocab_size, self.teacher.boundary,
                                 self.temperature, self.chunk_size)
        assert stats.boundary_logprobs is not None  # asked for: the teacher's boundary mask was given
        return TeacherView(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention,
                           loss_mask=batch.teacher_loss_mask, vocab_size=self.vocab_size, truncation=self.truncation,
                           token_logprobs=stats.token_logprobs, boundary_logprobs=stats.boundary_logprobs,
                           model=model, hidden=hidden, head=head)


class Term(Protocol):
    """A training term, as far as the teacher is concerned (DistillLoss, HiddenStateTerm)."""

    @classmethod
    def reads_teacher(cls) -> bool: ...


def signals_read(terms: Mapping[str, Term], weights: Mapping[str, float]) -> bool:
    """Whether a step with these term weights reads the teacher: some term weighted above 0 does. Only next-token
    training (`sft`) does not, so the transfer stage's `sft` arm and distill's steps at alpha 0 skip the teacher's
    forward (about a fifth of such a step: docs/transfer.md)."""
    return any(weight > 0 and terms[name].reads_teacher() for name, weight in weights.items())


def unread_view(batch: Batch, vocab_size: int, truncation: TeacherTruncation) -> TeacherView:
    """The teacher side of a step no term reads the teacher in: its tokens, none of its signals."""
    return TeacherView(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention,
                       loss_mask=batch.teacher_loss_mask, vocab_size=vocab_size, truncation=truncation,
                       token_logprobs=None, boundary_logprobs=None)
