"""DSKD: dual-space knowledge distillation with cross-model attention (Zhang et al. 2024; docs/algorithms/dskd.md).

The two models' representations are brought into each other's space by trainable projectors, aligned
position by position with a cross-model attention whose queries and keys are "index embeddings"
`[E(x_j) || E(x_{j+1})]` (which token a row sits on and which it predicts):

- teacher -> student: the attended, projected teacher hidden states, scored against the student's own
  (frozen) output embeddings, form a distribution over the student vocabulary. It learns to predict the
  student's next tokens (CE_t2s), and where its argmax is right the student is pulled towards it (KD_t2s,
  skewed reverse KL).
- student -> teacher: the attended, projected student hidden states, scored against the teacher's output
  embeddings, are pulled towards the teacher's own distribution (KD_s2t, forward KL).

`L = CE_t2s + KD_t2s + KD_s2t`. The attention never needs the texts to align, so the loss works for any
pair of tokenizers. Row convention as everywhere: row `j` is the distribution after token `j`.

Choices where the references leave room (tokenkit `compute_baseline_dskd_loss`, songmzhang/DSKD): both KD
terms use `kd_temperature` (both references temper KD_t2s too); KD_t2s is averaged over the target rows the
projection gets right (tokenkit; DSKD divides by all target rows); the teacher's global stds are taken over
real rows only, so padding never changes the loss; the index embeddings are constants on both sides (DSKD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from transformers import AutoConfig

from tokenbridge.config import Strict
from tokenbridge.losses.base import (
    Alignment,
    DistillLoss,
    LossOutput,
    LossSetup,
    Mean,
    StudentView,
    TeacherView,
    masked_mean,
    register,
)
from tokenbridge.losses.divergences import forward_kl, skew_reverse_kl
from tokenbridge.losses.positions import gather_rows, map_positions, target_rows


class DskdParams(Strict):
    """Dual-space KD (docs/algorithms/dskd.md): cross-model attention projectors; needs the live teacher."""

    kd_temperature: float = Field(2.0, gt=0, description="T of both KD terms (t2s and s2t); the CE_t2s is untempered")
    skew: float = Field(0.1, gt=0, lt=1, description="lambda of the skewed reverse KL (srkl) in KD_t2s")


def index_embeddings(token_embeddings: torch.Tensor) -> torch.Tensor:
    """[B, L, d] embeddings of the tokens -> [B, L - 1, 2d]: row j is [E(x_j) || E(x_{j+1})]."""
    return torch.cat([token_embeddings[:, :-1], token_embeddings[:, 1:]], dim=-1)


def row_validity(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L - 1]: row j is real when both the token it sits on and the one it predicts are."""
    mask = attention_mask.bool()
    return mask[:, :-1] & mask[:, 1:]


def masked_std(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One scalar std over every entry of the valid rows of `values` [B, R, d], so padding does not change
    the scale; 1 when there is too little to measure."""
    selected = values[valid].float()
    if selected.numel() < 2:
        return torch.ones((), device=values.device)
    return selected.std().clamp(min=torch.finfo(torch.float32).tiny)


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `allowed`; rows with nothing allowed are all zero (not NaN)."""
    filled = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return filled.softmax(-1) * allowed


def cross_model_attention(queries: torch.Tensor, keys: torch.Tensor, student_valid: torch.Tensor,
                          teacher_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product scores between student rows (queries [B, R_S, D]) and teacher rows (keys
    [B, R_T, D]), normalised both ways.

    Returns (teacher_to_student [B, R_S, R_T]: each valid student row's weights over the valid teacher rows,
    student_to_teacher [B, R_T, R_S]: each valid teacher row's weights over the valid student rows).
    """
    scores = queries.float() @ keys.float().transpose(-1, -2) / math.sqrt(keys.shape[-1])
    allowed = student_valid.bool()[:, :, None] & teacher_valid.bool()[:, None, :]
    return _masked_softmax(scores, allowed), _masked_softmax(scores.transpose(-1, -2), allowed.transpose(-1, -2))


def accuracy_masked_kd(student_logits: torch.Tensor, projected_logits: torch.Tensor, targets: torch.Tensor,
                       temperature: float, skew: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KD_t2s per position: skewed reverse KL of the student against the (constant) teacher->student
    projection, both at `temperature`, kept only where the projection's argmax is the target: elsewhere the
    projection is not yet a trustworthy teacher. Returns (divergence, 0 where not kept; kept mask)."""
    accurate = projected_logits.argmax(-1) == targets
    projected = (projected_logits.detach().float() / temperature).log_softmax(-1)
    student = (student_logits.float() / temperature).log_softmax(-1)
    divergence = skew_reverse_kl(projected, student, skew)
    return torch.where(accurate, divergence, 0.0), accurate


def student_to_teacher_kd(teacher_logits: torch.Tensor, projected_logits: torch.Tensor, temperature: float
                          ) -> torch.Tensor:
    """KD_s2t per position: KL(softmax(z_T / T) || softmax(z_s2t / T)), the teacher a constant."""
    teacher = (teacher_logits.detach().float() / temperature).log_softmax(-1)
    return forward_kl(teacher, (projected_logits.float() / temperature).log_softmax(-1))


def project_onto_vocabulary(hidden: torch.Tensor, output_embeddings: torch.Tensor) -> torch.Tensor:
    """Logits of projected hidden states against an output embedding matrix [V, d], in its dtype, as fp32."""
    return (hidden.to(output_embeddings.dtype) @ output_embeddings.T).float()


def _teacher_to_student_slice(projected_hidden: torch.Tensor, student_hidden: torch.Tensor, targets: torch.Tensor,
                              student: StudentView, output_embeddings: torch.Tensor, temperature: float, skew: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    projected = project_onto_vocabulary(projected_hidden, output_embeddings)
    cross_entropy = torch.nn.functional.cross_entropy(projected.transpose(1, 2), targets, reduction="none")
    student_logits = student.head(student_hidden)[..., : student.vocab_size].float()
    divergence, accurate = accuracy_masked_kd(student_logits, projected, targets, temperature, skew)
    return cross_entropy, divergence, accurate


def _student_to_teacher_slice(projected_hidden: torch.Tensor, teacher_hidden: torch.Tensor, teacher: TeacherView,
                              output_embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    assert teacher.head is not None  # a live teacher (dskd_terms checks)
    with torch.no_grad():
        teacher_logits = teacher.head(teacher_hidden)[..., : teacher.vocab_size].float()
    projected_logits = project_onto_vocabulary(projected_hidden, output_embeddings)
    return student_to_teacher_kd(teacher_logits, projected_logits, temperature)


class DskdProjectors(torch.nn.Module):
    """The trainable maps between the two hidden spaces (fp32; PyTorch's default nn.Linear init, as the
    reference implementations use): query 2d_S -> 2d_T, student_to_teacher d_S -> d_T, teacher_to_student
    d_T -> d_S."""

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int):
        super().__init__()
        self.query = torch.nn.Linear(2 * student_hidden_size, 2 * teacher_hidden_size)
        self.student_to_teacher = torch.nn.Linear(student_hidden_size, teacher_hidden_size)
        self.teacher_to_student = torch.nn.Linear(teacher_hidden_size, student_hidden_size)


def project(layer: torch.nn.Linear, values: torch.Tensor) -> torch.Tensor:
    """A projector applied in its own dtype (models may run in bf16), result in fp32."""
    return layer(values.to(layer.weight.dtype)).float()


@dataclass
class DskdTerms:
    teacher_to_student_ce: torch.Tensor  # CE_t2s, mean over the student's target rows
    teacher_to_student_kd: torch.Tensor  # KD_t2s, mean over the student's target rows the projection gets right
    student_to_teacher_kd: torch.Tensor  # KD_s2t, mean over the teacher's target rows
    teacher_to_student_accuracy: torch.Tensor  # share of the student's target rows the projection gets right
    counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the rows each of the three means divides by

    @property
    def total(self) -> torch.Tensor:
        return self.teacher_to_student_ce + self.teacher_to_student_kd + self.student_to_teacher_kd

    @property
    def parts(self) -> tuple[Mean, Mean, Mean]:
        ce_rows, kd_rows, s2t_rows = self.counts
        return (Mean(self.teacher_to_student_ce, ce_rows), Mean(self.teacher_to_student_kd, kd_rows),
                Mean(self.student_to_teacher_kd, s2t_rows))


def dskd_terms(student: StudentView, teacher: TeacherView, projectors: DskdProjectors, temperature: float,
               skew: float) -> DskdTerms:
    """The three DSKD terms for one batch; the teacher and both output embedding matrices are constants."""
    if not teacher.live:
        raise ValueError("DSKD needs the live teacher's hidden states: set distill.teacher_mode: online")
    assert teacher.model is not None and teacher.hidden is not None  # a live teacher gives both
    student_valid = row_validity(student.attention_mask)
    teacher_valid = row_validity(teacher.attention_mask)
    with torch.no_grad():
        student_index = index_embeddings(student.model.get_input_embeddings()(student.input_ids).float())
        teacher_embedded = teacher.model.get_input_embeddings()(teacher.input_ids).float()
        teacher_index = index_embeddings(teacher_embedded)
        teacher_keys = teacher_index / masked_std(teacher_index, teacher_valid)
        teacher_hidden_rows = teacher.hidden[:, :-1].float()
        teacher_next = teacher_embedded[:, 1:]
        teacher_values = (teacher_hidden_rows / masked_std(teacher_hidden_rows, teacher_valid)
                          + teacher_next / masked_std(teacher_next, teacher_valid))
        student_output = student.model.get_output_embeddings().weight[: student.vocab_size].detach()
        teacher_output = teacher.model.get_output_embeddings().weight[: teacher.vocab_size].detach()

    queries = project(projectors.query, student_index)
    to_student, to_teacher = cross_model_attention(queries, teacher_keys, student_valid, teacher_valid)

    student_rows, student_rows_valid = target_rows(student.loss_mask)
    teacher_as_student = project(projectors.teacher_to_student, teacher_values)
    projected_teacher = gather_rows(to_student, student_rows) @ teacher_as_student
    targets = gather_rows(student.input_ids[:, 1:], student_rows)
    cross_entropy, t2s_divergence, accurate = map_positions(
        _teacher_to_student_slice, [projected_teacher, gather_rows(student.hidden, student_rows), targets],
        student.chunk_size, student, student_output, temperature, skew)

    teacher_rows, teacher_rows_valid = target_rows(teacher.loss_mask)
    student_as_teacher = project(projectors.student_to_teacher, student.hidden[:, :-1])
    projected_student = gather_rows(to_teacher, teacher_rows) @ student_as_teacher
    (s2t_divergence,) = map_positions(
        _student_to_teacher_slice, [projected_student, gather_rows(teacher.hidden, teacher_rows)],
        student.chunk_size, teacher, teacher_output, temperature)

    return DskdTerms(
        teacher_to_student_ce=masked_mean(cross_entropy, student_rows_valid),
        teacher_to_student_kd=masked_mean(t2s_divergence, student_rows_valid & accurate),
        student_to_teacher_kd=masked_mean(s2t_divergence, teacher_rows_valid),
        teacher_to_student_accuracy=masked_mean(accurate.float(), student_rows_valid).detach(),
        counts=(student_rows_valid.sum(), (student_rows_valid & accurate).sum(), teacher_rows_valid.sum()),
    )


def model_hidden_size(model_dir: Path) -> int:
    return AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size


@register
class DskdLoss(DistillLoss):
    """Dual-space KD. Owns trainable projectors (`projectors.*`), optimised and checkpointed with the student."""

    name = "dskd"
    params_model = DskdParams
    needs_online_teacher = True
    same_tokenizer_only = False
    teacher_fields = ()
    needs_student_boundary = False
    params: DskdParams

    def __init__(self, params: DskdParams, setup: LossSetup):
        super().__init__(params, setup)
        self.projectors = DskdProjectors(model_hidden_size(setup.student_dir), model_hidden_size(setup.teacher_dir))

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        terms = dskd_terms(student, teacher, self.projectors, self.params.kd_temperature, self.params.skew)
        metrics = {
            "t2s_ce": terms.teacher_to_student_ce, "t2s_kd": terms.teacher_to_student_kd,
            "s2t_kd": terms.student_to_teacher_kd, "t2s_accuracy": terms.teacher_to_student_accuracy,
        }
        return LossOutput(terms.parts, {key: float(value.detach()) for key, value in metrics.items()})
