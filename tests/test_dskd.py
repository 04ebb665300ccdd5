"""DSKD (docs/algorithms/dskd.md): cross-model attention, the accuracy-masked KD, gradient flow, and the registered
adapter."""

from __future__ import annotations

import math

import pytest
import torch

from tokenbridge.config import TeacherTruncation
from tokenbridge.losses.base import LOSSES, Alignment, LossSetup, StudentView, TeacherView
from tokenbridge.losses.dskd import (
    DskdLoss,
    DskdParams,
    DskdProjectors,
    accuracy_masked_kd,
    cross_model_attention,
    dskd_terms,
    index_embeddings,
    masked_std,
    row_validity,
    student_to_teacher_kd,
)

NO_ALIGNMENT = Alignment(*(torch.zeros(0),) * 5)


class ToyModel(torch.nn.Module):
    """Embedding -> one linear layer -> output head with padded rows past the vocabulary, like Qwen2.5."""

    def __init__(self, vocab_size: int, hidden_size: int, padded_rows: int = 3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size + padded_rows, hidden_size)
        self.body = torch.nn.Linear(hidden_size, hidden_size)
        self.lm_head = torch.nn.Linear(hidden_size, vocab_size + padded_rows, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.embed(input_ids)))


def _views(student_model: ToyModel, teacher_model: ToyModel, student_ids: torch.Tensor, teacher_ids: torch.Tensor,
           student_attention: torch.Tensor, teacher_attention: torch.Tensor, student_loss: torch.Tensor,
           teacher_loss: torch.Tensor, student_vocab: int, teacher_vocab: int, chunk_size: int = 2
           ) -> tuple[StudentView, TeacherView]:
    with torch.no_grad():
        teacher_hidden = teacher_model.hidden(teacher_ids)
    zeros_s, zeros_t = torch.zeros(student_ids.shape), torch.zeros(teacher_ids.shape)
    student = StudentView(student_model, student_model.hidden(student_ids), student_model.lm_head, student_vocab,
                          student_ids, student_attention, student_loss.bool(), zeros_s, zeros_s, chunk_size)
    teacher = TeacherView(teacher_ids, teacher_attention, teacher_loss.bool(), zeros_t, zeros_t, teacher_vocab,
                          TeacherTruncation(), model=teacher_model, hidden=teacher_hidden, head=teacher_model.lm_head)
    return student, teacher


@pytest.fixture
def toy_pair():
    """Student (vocab 11, d 4) and frozen teacher (vocab 13, d 6); answers start at token 2; one padded row each."""
    torch.manual_seed(0)
    student_model, teacher_model = ToyModel(11, 4), ToyModel(13, 6)
    teacher_model.requires_grad_(False)
    student_ids = torch.randint(0, 11, (2, 6))
    teacher_ids = torch.randint(0, 13, (2, 7))
    student_attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    teacher_attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    student_loss = student_attention.bool() & (torch.arange(6) >= 2)
    teacher_loss = teacher_attention.bool() & (torch.arange(7) >= 2)
    return dict(student_model=student_model, teacher_model=teacher_model, student_ids=student_ids,
                teacher_ids=teacher_ids, student_attention=student_attention, teacher_attention=teacher_attention,
                student_loss=student_loss, teacher_loss=teacher_loss, student_vocab=11, teacher_vocab=13)


def _terms(pair: dict, projectors: DskdProjectors, chunk_size: int = 2, temperature: float = 2.0, skew: float = 0.1):
    student, teacher = _views(**pair, chunk_size=chunk_size)
    return dskd_terms(student, teacher, projectors, temperature, skew)


def test_index_embeddings_pair_each_token_with_the_next():
    embeddings = torch.arange(8.0).view(1, 4, 2)
    index = index_embeddings(embeddings)
    assert index.shape == (1, 3, 4)
    assert index[0, 1].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_a_row_is_valid_only_when_its_token_and_the_next_are_real():
    right_padded, left_padded = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0, 1, 1, 1]])
    assert row_validity(right_padded).tolist() == [[True, True, False]]
    assert row_validity(left_padded).tolist() == [[False, True, True]]


def test_masked_std_ignores_padding_rows():
    values = torch.tensor([[[1.0, 3.0], [1.0, 3.0], [100.0, -100.0]]])
    valid = torch.tensor([[True, True, False]])
    assert masked_std(values, valid).item() == pytest.approx(torch.tensor([1.0, 3.0, 1.0, 3.0]).std().item())


def test_attention_weights_are_distributions_over_unmasked_rows_only():
    torch.manual_seed(1)
    queries, keys = torch.randn(2, 4, 6), torch.randn(2, 5, 6)
    student_valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    teacher_valid = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])
    to_student, to_teacher = cross_model_attention(queries, keys, student_valid, teacher_valid)

    assert to_student.shape == (2, 4, 5) and to_teacher.shape == (2, 5, 4)
    assert torch.allclose(to_student.sum(-1), student_valid.float())
    assert torch.allclose(to_teacher.sum(-1), teacher_valid.float())
    assert (to_student[~teacher_valid[:, None, :].expand_as(to_student)] == 0).all()
    assert (to_teacher[~student_valid[:, None, :].expand_as(to_teacher)] == 0).all()
    scores = queries[0, 0] @ keys[0, [0, 2, 3]].T / math.sqrt(6)
    assert torch.allclose(to_student[0, 0, [0, 2, 3]], scores.softmax(-1))


def test_attention_matches_a_hand_computed_case():
    queries = torch.tensor([[[1.0, 0.0]]])
    keys = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    to_student, _ = cross_model_attention(queries, keys, torch.tensor([[True]]), torch.tensor([[True, True]]))
    first = math.exp(2 / math.sqrt(2))
    assert to_student[0, 0].tolist() == pytest.approx([first / (first + 1), 1 / (first + 1)])


def test_attention_with_nothing_to_attend_to_is_zero_not_nan():
    to_student, to_teacher = cross_model_attention(
        torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.tensor([[True, True]]), torch.tensor([[False, False]]))
    assert (to_student == 0).all() and (to_teacher == 0).all()


def test_accuracy_mask_excludes_positions_whose_projected_argmax_differs_from_the_target():
    student_logits = torch.randn(1, 3, 5)
    projected = torch.tensor([[[0.0, 4.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]]])
    targets = torch.tensor([[1, 2, 4]])
    divergence, kept = accuracy_masked_kd(student_logits, projected, targets, temperature=2.0, skew=0.1)
    assert kept.tolist() == [[True, False, True]]
    assert divergence[0, 1] == 0 and divergence[0, 0] > 0 and divergence[0, 2] > 0


def test_t2s_kd_is_the_hand_computed_tempered_skewed_reverse_kl():
    # At T = 2 the projection [2 log 3, 0] is p = (3/4, 1/4); the uniform student is q = (1/2, 1/2);
    # KL(q || 0.1 q + 0.9 p) with 0.1 q + 0.9 p = (0.725, 0.275).
    projected = torch.tensor([[[2 * math.log(3.0), 0.0]]])
    divergence, _ = accuracy_masked_kd(torch.zeros(1, 1, 2), projected, torch.tensor([[0]]), temperature=2.0, skew=0.1)
    expected = 0.5 * math.log(0.5 / 0.725) + 0.5 * math.log(0.5 / 0.275)
    assert divergence.item() == pytest.approx(expected, rel=1e-5)


def test_s2t_kd_is_the_hand_computed_tempered_forward_kl():
    teacher = torch.tensor([[[2 * math.log(3.0), 0.0]]])
    divergence = student_to_teacher_kd(teacher, torch.zeros(1, 1, 2), temperature=2.0)
    assert divergence.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)


def test_kd_terms_give_no_gradient_to_their_targets():
    projected = torch.randn(1, 2, 4, requires_grad=True)
    student = torch.randn(1, 2, 4, requires_grad=True)
    targets = projected.argmax(-1)
    divergence, _ = accuracy_masked_kd(student, projected, targets, temperature=2.0, skew=0.1)
    divergence.sum().backward()
    assert projected.grad is None and student.grad.abs().sum() > 0

    teacher = torch.randn(1, 2, 4, requires_grad=True)
    student_to_teacher_kd(teacher, student, temperature=2.0).sum().backward()
    assert teacher.grad is None


def test_gradients_reach_the_projectors_and_the_student_but_never_the_teacher(toy_pair):
    projectors = DskdProjectors(4, 6)
    terms = _terms(toy_pair, projectors)
    assert torch.isfinite(terms.total)
    terms.total.backward()
    for name, parameter in projectors.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    student_model = toy_pair["student_model"]
    assert student_model.body.weight.grad.abs().sum() > 0
    assert student_model.lm_head.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in toy_pair["teacher_model"].parameters())


def test_each_term_trains_what_the_method_says(toy_pair):
    """CE_t2s trains only the query and t2s projectors; KD_s2t trains the student's hidden states, not its head."""
    projectors = DskdProjectors(4, 6)
    terms = _terms(toy_pair, projectors)
    terms.teacher_to_student_ce.backward()
    assert projectors.student_to_teacher.weight.grad is None
    assert projectors.query.weight.grad.abs().sum() > 0 and projectors.teacher_to_student.weight.grad.abs().sum() > 0
    assert toy_pair["student_model"].body.weight.grad is None
    assert toy_pair["student_model"].lm_head.weight.grad is None  # the student's output embeddings are constants here

    projectors.zero_grad(set_to_none=True)
    terms = _terms(toy_pair, projectors)
    terms.student_to_teacher_kd.backward()
    assert projectors.teacher_to_student.weight.grad is None
    assert toy_pair["student_model"].body.weight.grad.abs().sum() > 0
    assert toy_pair["student_model"].lm_head.weight.grad is None


def test_the_loss_does_not_depend_on_the_slice_size(toy_pair):
    projectors = DskdProjectors(4, 6)
    small, large = _terms(toy_pair, projectors, chunk_size=1), _terms(toy_pair, projectors, chunk_size=64)
    assert torch.allclose(small.total, large.total, atol=1e-6)


def test_padding_does_not_change_the_loss(toy_pair):
    projectors = DskdProjectors(4, 6)
    before = _terms(toy_pair, projectors).total
    padded = dict(toy_pair)
    for side in ("student", "teacher"):
        padded[f"{side}_ids"] = torch.cat([toy_pair[f"{side}_ids"], torch.full((2, 3), 5)], dim=1)
        for mask in ("attention", "loss"):
            original = toy_pair[f"{side}_{mask}"]
            padded[f"{side}_{mask}"] = torch.cat([original, torch.zeros(2, 3, dtype=original.dtype)], dim=1)
    assert torch.allclose(_terms(padded, projectors).total, before, atol=1e-5)


def test_the_loss_is_finite_when_rows_or_whole_batches_have_no_targets(toy_pair):
    projectors = DskdProjectors(4, 6)
    one_empty = dict(toy_pair)
    one_empty["student_loss"] = toy_pair["student_loss"].clone()
    one_empty["student_loss"][1] = False
    one_empty["teacher_attention"] = toy_pair["teacher_attention"].clone()
    one_empty["teacher_attention"][1] = 0
    one_empty["teacher_loss"] = toy_pair["teacher_loss"] & one_empty["teacher_attention"].bool()
    terms = _terms(one_empty, projectors)
    assert torch.isfinite(terms.total)
    terms.total.backward()
    assert all(torch.isfinite(parameter.grad).all() for parameter in projectors.parameters())

    nothing = dict(toy_pair, student_loss=torch.zeros(2, 6, dtype=torch.bool),
                   teacher_loss=torch.zeros(2, 7, dtype=torch.bool))
    terms = _terms(nothing, projectors)
    assert terms.total.item() == 0
    terms.total.backward()


def test_dskd_refuses_a_stored_teacher(toy_pair):
    student, teacher = _views(**toy_pair)
    teacher.hidden = None
    with pytest.raises(ValueError, match="online"):
        dskd_terms(student, teacher, DskdProjectors(4, 6), 2.0, 0.1)


def test_dskd_is_registered_as_an_online_cross_tokenizer_loss():
    assert LOSSES["dskd"] is DskdLoss
    assert DskdLoss.needs_online_teacher and not DskdLoss.same_tokenizer_only
    assert DskdLoss.section() == "dskd" and DskdLoss.params_model is DskdParams and DskdLoss.teacher_fields == ()


def _tiny_views(tiny_dirs, tiny_tokenizers, teacher_role: str, student_role: str) -> tuple[StudentView, TeacherView]:
    from tokenbridge.losses.token_stats import hidden_states, output_head
    from tokenbridge.models import load_model

    texts = ["Question: 3 + 4 = ?\nAnswer: 7", "Tom has 12 apples and eats 5."]
    views = {}
    for side, role in (("student", student_role), ("teacher", teacher_role)):
        model = load_model(tiny_dirs[role])
        tokenizer = tiny_tokenizers[role]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        loss_mask = batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) >= 3)
        zeros = torch.zeros(batch["input_ids"].shape)
        if side == "teacher":
            model.requires_grad_(False)
            with torch.no_grad():
                hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
            views[side] = TeacherView(batch["input_ids"], batch["attention_mask"], loss_mask, zeros, zeros,
                                      len(tokenizer), TeacherTruncation(), model=model, hidden=hidden,
                                      head=output_head(model))
        else:
            hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
            views[side] = StudentView(model, hidden, output_head(model), len(tokenizer), batch["input_ids"],
                                      batch["attention_mask"], loss_mask, zeros, zeros, chunk_size=4)
    return views["student"], views["teacher"]


@pytest.mark.parametrize("teacher_role", ["teacher", "student"], ids=["different_tokenizers", "same_tokenizer"])
def test_dskd_trains_on_the_tiny_models(tiny_dirs, tiny_tokenizers, tmp_path, teacher_role):
    setup = LossSetup(teacher_dir=tiny_dirs[teacher_role], student_dir=tiny_dirs["student"],
                      same_tokenizer=teacher_role == "student", cache_dir=tmp_path)
    loss = DskdLoss(DskdParams(), setup)
    teacher_size = 64 if teacher_role == "teacher" else 32
    assert loss.projectors.query.weight.shape == (2 * teacher_size, 2 * 32)
    assert loss.projectors.student_to_teacher.weight.shape == (teacher_size, 32)
    assert loss.projectors.teacher_to_student.weight.shape == (32, teacher_size)

    student, teacher = _tiny_views(tiny_dirs, tiny_tokenizers, teacher_role, "student")
    output = loss(student, teacher, NO_ALIGNMENT)
    assert torch.isfinite(output.loss)
    assert set(output.metrics) == {"t2s_ce", "t2s_kd", "s2t_kd", "t2s_accuracy"}
    output.loss.backward()
    assert all(parameter.grad is not None for parameter in loss.parameters())
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for parameter in student.model.parameters())
    assert all(parameter.grad is None for parameter in teacher.model.parameters())
