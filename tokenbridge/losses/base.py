"""What every distillation loss sees, and the registry that picks one by name (`distill.loss`).

A loss module holds a pure function of tensors (the math, tested on hand-made tensors) and a small
`DistillLoss` adapter registered here, which pulls what the math needs out of the two views below:

- `StudentView`: the student's final hidden states (with gradient) and output head, so a loss that needs
  the student's whole next-token distribution computes it in chunks of positions (`positions.map_positions`),
  never as a full fp32 [B, T, V] tensor; plus the per-row statistics every step already computes.
- `TeacherView`: the teacher's per-row signals, stored (offline) or live (online). Stored data holds the
  observed-token and boundary log-probs and the top-k; a live teacher also gives its hidden states and head.

Row convention everywhere: row `j` is the distribution after token `j`, predicting token `j + 1`.
Masks use token convention: `loss_mask[b, i]` says token `i` is a training target (its row is `i - 1`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from pydantic import BaseModel

from tokenbridge.config import TeacherTruncation

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StudentView:
    model: PreTrainedModel
    hidden: torch.Tensor  # [B, L_S, d] final normed hidden states (requires grad)
    head: Head  # hidden -> logits over the model's output rows (may exceed vocab_size: padded rows)
    vocab_size: int  # tokenizer size; rows past it are padding and are sliced off before any softmax
    input_ids: torch.Tensor  # [B, L_S]
    attention_mask: torch.Tensor  # [B, L_S]
    loss_mask: torch.Tensor  # [B, L_S] bool, token convention
    token_logprobs: torch.Tensor  # [B, L_S] rows: log p(x_{j+1} | x_{<=j}); padding rows 0
    boundary_logprobs: torch.Tensor | None  # [B, L_S] rows: log P(next token starts a word or is special);
    # computed only when a loss of the step declares `needs_student_boundary`
    chunk_size: int  # positions per slice of any vocabulary projection


@dataclass
class TeacherView:
    input_ids: torch.Tensor  # [B, L_T]
    attention_mask: torch.Tensor  # [B, L_T]
    loss_mask: torch.Tensor  # [B, L_T] bool, token convention
    # The teacher's signals; None in a step no weighted term reads the teacher in (next-token training alone), whose
    # teacher forward is skipped.
    token_logprobs: torch.Tensor | None  # [B, L_T] rows (constants: no gradient reaches the teacher)
    boundary_logprobs: torch.Tensor | None  # [B, L_T] rows
    vocab_size: int
    truncation: TeacherTruncation  # top-p, top-k and temperature applied to the teacher's distribution
    # Offline: the stored top-k, log-probs normalised over the full vocabulary at `stored_temperature`.
    topk_ids: torch.Tensor | None = None  # [B, L_T, k]
    topk_logprobs: torch.Tensor | None = None  # [B, L_T, k]
    stored_temperature: float = 1.0
    # Online: the live teacher.
    model: PreTrainedModel | None = None
    hidden: torch.Tensor | None = None  # [B, L_T, d_T]
    head: Head | None = None

    @property
    def live(self) -> bool:
        return self.hidden is not None


@dataclass
class Alignment:
    """ALM's minimal byte-exact chunks (docs/algorithms/alm.md#chunk-alignment): per-token chunk id (-1: in no chunk),
    every chunk of the example that does not start at token 0, numbered densely in order."""

    teacher_chunks: torch.Tensor  # [B, L_T]
    student_chunks: torch.Tensor  # [B, L_S]
    chunk_is_target: torch.Tensor  # [B, C] bool: all the chunk's tokens are training targets on both sides
    teacher_word_start: torch.Tensor  # [B, L_T] bool: token starts with space/tab/newline/CR or is special
    student_word_start: torch.Tensor  # [B, L_S] bool


class Mean(NamedTuple):
    """A mean and the number of units it averages (target rows, chunks, paired positions...). Means over
    shards with unequal counts combine into the whole batch's mean only through their counts: what training
    over several processes needs (`tokenbridge.stages.distill`)."""

    value: torch.Tensor  # scalar; 0 when `count` is 0
    count: torch.Tensor | int  # type: ignore[assignment]  # the field shadows tuple.count, a method no caller needs


@dataclass
class LossOutput:
    """A loss as the sum of its `parts`, each a mean over its own units (one part for most losses)."""

    parts: tuple[Mean, ...]
    metrics: dict[str, float] = field(default_factory=dict)  # diagnostics, logged as `<name>.<key>`

    @property
    def loss(self) -> torch.Tensor:
        return sum((part.value for part in self.parts[1:]), self.parts[0].value)


@dataclass(frozen=True)
class LossSetup:
    """Facts about the pair, known before training: what a loss may precompute (and cache) once."""

    teacher_dir: Path
    student_dir: Path
    same_tokenizer: bool
    cache_dir: Path


class DistillLoss(torch.nn.Module):
    """A registered loss. Subclasses may own trainable parameters (DSKD's projectors): they are optimised
    and checkpointed with the student.

    A subclass states everything the rest of the pipeline needs to know about it, and `register` refuses one
    that leaves any of it out: the params section and the stored teacher fields are derived from these.
    """

    name: ClassVar[str]
    # The options model, validated as `distill.<section>` when params load (None: the loss has no options);
    # its defaults are the documented ones, so it must build without arguments.
    params_model: ClassVar[type[BaseModel] | None]
    params_section: ClassVar[str | None] = None  # the `distill.<section>`; None: the loss's name (losses may share one)
    needs_online_teacher: ClassVar[bool]  # the live teacher (hidden states, weights): `teacher_mode: online`
    same_tokenizer_only: ClassVar[bool]  # compares distributions over one shared vocabulary
    teacher_fields: ClassVar[tuple[str, ...]]  # what stored teacher data must hold (offline)
    needs_student_boundary: ClassVar[bool]  # reads StudentView.boundary_logprobs (ALM's debiasing)

    def __init__(self, params: BaseModel | None, setup: LossSetup):
        super().__init__()
        self.params = params
        self.setup = setup

    @classmethod
    def section(cls) -> str | None:
        """The `distill.<section>` holding this loss's options; None when it has none."""
        return None if cls.params_model is None else cls.params_section or cls.name

    @classmethod
    def params_in(cls, distill: BaseModel) -> BaseModel | None:
        """This loss's options, read from the validated `distill` params."""
        section = cls.section()
        return None if section is None else getattr(distill, section)

    @classmethod
    def reads_teacher(cls) -> bool:
        """True for a distillation loss (it reads the teacher, live or stored); False for the next-token term
        `sft`, which reads the student alone."""
        return cls.needs_online_teacher or bool(cls.teacher_fields)

    @classmethod
    def needs_full_teacher(cls, params: BaseModel | None) -> bool:
        """True when, with these options, the loss is infinite where a truncated teacher has zero probability
        (reverse KL): it then needs the live teacher's whole distribution."""
        return False

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        raise NotImplementedError


LOSSES: dict[str, type[DistillLoss]] = {}
DECLARATIONS = ("name", "params_model", "needs_online_teacher", "same_tokenizer_only", "teacher_fields",
                "needs_student_boundary")


def register(cls: type[DistillLoss]) -> type[DistillLoss]:
    """Add `cls` to LOSSES under its name, once it declares what it needs (see DistillLoss)."""
    missing = [attribute for attribute in DECLARATIONS if not hasattr(cls, attribute)]
    if missing:
        raise TypeError(f"loss {cls.__name__} must declare {', '.join(missing)} (see DistillLoss in {__file__})")
    if cls.name in LOSSES and LOSSES[cls.name] is not cls:
        raise TypeError(f"loss name {cls.name!r} of {cls.__name__} is already taken by {LOSSES[cls.name].__name__}")
    section = cls.section()
    shared = [other for other in LOSSES.values()
              if section is not None and other.section() == section and other.params_model is not cls.params_model]
    if shared:
        owner = shared[0].params_model
        assert owner is not None  # it has a section, so it has options
        raise TypeError(f"loss {cls.name!r}: section distill.{section} already holds {shared[0].name!r}'s "
                        f"{owner.__name__}; give it its own params_section")
    if cls.params_model is not None:
        cls.params_model()  # the defaults must make a whole section: a loss left unconfigured still runs
    LOSSES[cls.name] = cls
    return cls


def counted_mean(values: torch.Tensor, mask: torch.Tensor) -> Mean:
    """Mean of `values` where `mask` holds, with how many held; 0 (with a gradient path) when nothing is valid."""
    count = mask.sum()
    return Mean(torch.where(mask, values, 0.0).sum() / count.clamp(min=1), count)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`counted_mean` without the count (diagnostics, and the terms of a loss's own formula)."""
    return counted_mean(values, mask).value
