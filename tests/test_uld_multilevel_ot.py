"""ULD and MultiLevelOT (docs/algorithms/uld-multilevel-ot.md): the pure functions on hand-made tensors, and the
registered adapters on small hand-built student/teacher views against dense, loop-based reference implementations."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tokenbridge.config import TeacherTruncation
from tokenbridge.losses.base import LOSSES, LossSetup, StudentView, TeacherView
from tokenbridge.losses.multilevel_ot import (
    MultiLevelOtLoss,
    MultiLevelOtParams,
    column_mass,
    holistic_absolute_difference,
    multilevel_ot_loss,
    ranked_ids,
    sequence_order,
    sequential_log_loss,
    sinkhorn_distance,
    sinkhorn_plan,
)
from tokenbridge.losses.uld import UldLoss, UldParams, sorted_with_tail, uld_distance

SETUP = LossSetup(Path("teacher"), Path("student"), same_tokenizer=False, cache_dir=Path("cache"))
NO_ALIGNMENT = None  # both losses pair positions by index within the answer and never read ALM's chunks


def probs(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(*shape, generator=generator, dtype=dtype)).softmax(-1)


def uld(student: torch.Tensor, teacher: torch.Tensor, top_k: int) -> torch.Tensor:
    return uld_distance(sorted_with_tail(student, top_k), sorted_with_tail(teacher, top_k))


def exact_uld(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ULD as its paper states it: sort each descending, zero-pad the smaller vocabulary, sum |differences|."""
    width = max(student.shape[-1], teacher.shape[-1])

    def pad(p: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))

    return (pad(student) - pad(teacher)).abs().sum(-1)


# ---------------------------------------------------------------------------------------------- ULD, pure


def test_uld_is_invariant_to_permuting_either_vocabulary():
    student, teacher = probs(3, 4, 17, seed=0), probs(3, 4, 23, seed=1)
    for top_k in (5, 30):
        expected = uld(student, teacher, top_k)
        torch.testing.assert_close(uld(student[..., torch.randperm(17)], teacher, top_k), expected)
        torch.testing.assert_close(uld(student, teacher[..., torch.randperm(23)], top_k), expected)


def test_uld_ignores_zero_probability_vocabulary_entries():
    student, teacher = probs(2, 5, 11, seed=2), probs(2, 5, 7, seed=3)
    padded = torch.cat([teacher[..., :3], torch.zeros(2, 5, 6), teacher[..., 3:]], dim=-1)
    for top_k in (4, 20):
        torch.testing.assert_close(uld(student, padded, top_k), uld(student, teacher, top_k))


def test_uld_of_identical_distributions_is_zero_and_of_different_ones_positive():
    student = probs(4, 13, seed=4)
    assert torch.all(uld(student, student, 5) == 0)
    assert torch.all(uld(student, probs(4, 13, seed=5), 5) > 0)


def test_uld_is_symmetric_and_at_most_two_per_position():
    student, teacher = probs(6, 9, seed=6), probs(6, 14, seed=7)
    torch.testing.assert_close(uld(student, teacher, 4), uld(teacher, student, 4))
    # The extreme: a one-hot against a uniform distribution over 1000 tokens, 2 - 2/1000, at any k.
    one_hot, uniform = torch.eye(1000)[0], torch.full((1000,), 1e-3)
    for top_k in (1, 10, 1000):
        distance = uld(one_hot, uniform, top_k)
        assert distance <= 2
    torch.testing.assert_close(uld(one_hot, uniform, 1000), torch.tensor(2 - 2e-3))


def test_sorted_matching_equals_the_minimum_over_all_permutations():
    for seed in range(5):
        student, teacher = probs(5, seed=10 + seed, dtype=torch.float64), probs(4, seed=20 + seed, dtype=torch.float64)
        teacher_padded = torch.nn.functional.pad(teacher, (0, 1))
        brute_force = min((teacher_padded - student[list(perm)]).abs().sum()
                          for perm in itertools.permutations(range(5)))
        torch.testing.assert_close(exact_uld(student, teacher), brute_force)
        torch.testing.assert_close(uld(student, teacher, 5), brute_force)


def test_uld_with_top_k_covering_both_vocabularies_equals_the_exact_sorted_l1():
    student, teacher = probs(3, 8, 10, seed=30), probs(3, 8, 6, seed=31)
    torch.testing.assert_close(uld(student, teacher, 10), exact_uld(student, teacher))
    torch.testing.assert_close(uld(student, teacher, 25), exact_uld(student, teacher))


def test_truncated_uld_is_a_lower_bound_that_grows_towards_the_exact_value():
    student, teacher = probs(50, 40, seed=32), probs(50, 30, seed=33)
    exact = exact_uld(student, teacher)
    previous = torch.zeros_like(exact)
    for top_k in (1, 3, 10, 40):
        truncated = uld(student, teacher, top_k)
        assert torch.all(truncated <= exact + 1e-6) and torch.all(truncated >= previous - 1e-6)
        previous = truncated
    assert torch.any(uld(student, teacher, 3) < exact - 1e-4)  # the bound is not tight in general


def test_sorted_with_tail_keeps_the_largest_first_and_the_rest_as_tail():
    result = sorted_with_tail(torch.tensor([0.1, 0.5, 0.15, 0.25]), 2)
    torch.testing.assert_close(result, torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(sorted_with_tail(torch.tensor([0.7, 0.3]), 3), torch.tensor([0.7, 0.3, 0.0, 0.0]))


def test_uld_gradcheck_in_float64():
    student_logits = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    teacher = probs(2, 3, 7, seed=34, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: uld(z.softmax(-1), teacher, 4), (student_logits,))


# ------------------------------------------------------------------------------------- MultiLevelOT, pure


def ranked(values: torch.Tensor, top_k: int, ranking: str) -> torch.Tensor:
    order = None
    if ranking == "sequence":
        order = sequence_order(column_mass(values, torch.ones(values.shape[:2], dtype=torch.bool)).squeeze(1), top_k)
    return values.gather(-1, ranked_ids(values, top_k, order))


@pytest.mark.parametrize("ranking", ["token", "sequence"])
def test_had_is_invariant_to_permuting_either_vocabulary(ranking):
    student, teacher = probs(2, 6, 19, seed=40), probs(2, 6, 15, seed=41)
    expected = holistic_absolute_difference(ranked(teacher, 5, ranking), ranked(student, 5, ranking))
    permuted_teacher = ranked(teacher[..., torch.randperm(15)], 5, ranking)
    permuted_student = ranked(student[..., torch.randperm(19)], 5, ranking)
    torch.testing.assert_close(holistic_absolute_difference(permuted_teacher, ranked(student, 5, ranking)), expected)
    torch.testing.assert_close(holistic_absolute_difference(ranked(teacher, 5, ranking), permuted_student), expected)


def test_token_ranking_sorts_each_position_and_sequence_ranking_shares_one_order_by_mass():
    values = torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]])  # masses 0.6, 0.8, 0.6
    assert ranked_ids(values, 2, None).tolist() == [[[1, 2], [0, 2]]]
    order = sequence_order(column_mass(values, torch.tensor([[True, True]])).squeeze(1), 1)
    assert order.tolist() == [[1]] and ranked_ids(values, 1, order).tolist() == [[[1], [1]]]
    # An invalid position adds no mass: with only the first position, dimension 1 (0.6) outranks 2 (0.3).
    masked = column_mass(values, torch.tensor([[True, False]])).squeeze(1)
    assert sequence_order(masked, 3).tolist() == [[1, 2, 0]]


def test_identical_distributions_give_zero_had_and_sl_equal_to_the_entropy():
    distribution = probs(3, 8, seed=42)
    assert torch.all(holistic_absolute_difference(distribution, distribution) == 0)
    entropy = -(distribution * distribution.log()).sum(-1)
    torch.testing.assert_close(sequential_log_loss(distribution, distribution.log()), entropy)
    # Teacher weights, student log-probs: swapping the roles gives a different (wrong) value.
    other = probs(3, 8, seed=43)
    torch.testing.assert_close(sequential_log_loss(distribution, other.log()), -(distribution * other.log()).sum(-1))
    swapped = sequential_log_loss(other, distribution.log())
    assert not torch.allclose(sequential_log_loss(distribution, other.log()), swapped)


def test_sl_ignores_dimensions_the_teacher_gives_zero_even_where_the_student_has_log_zero():
    teacher = torch.tensor([0.7, 0.3, 0.0])
    student_log = torch.tensor([-0.5, -1.0, float("-inf")])
    torch.testing.assert_close(sequential_log_loss(teacher, student_log), torch.tensor(0.35 + 0.3))


def test_sinkhorn_distance_is_entropic_but_smallest_between_identical_sequences():
    sequence = probs(6, 5, seed=44)
    different = probs(6, 5, seed=45)
    same = sinkhorn_distance(sequence, sequence, 0.1, 20)
    assert same > 0
    assert same <= sinkhorn_distance(sequence, different, 0.1, 20)
    assert same <= sinkhorn_distance(sequence, sequence.flip(-1), 0.1, 20)


def test_sinkhorn_columns_sum_to_one_rows_converge_and_entries_are_nonnegative():
    cost = torch.cdist(probs(7, 5, seed=46, dtype=torch.float64), probs(7, 5, seed=47, dtype=torch.float64), p=1)
    row_errors = []
    for iterations in (1, 5, 50):
        plan = sinkhorn_plan(cost, 0.1, iterations)
        assert torch.all(plan >= 0)
        torch.testing.assert_close(plan.sum(0), torch.ones(7, dtype=torch.float64))
        row_errors.append((plan.sum(1) - 1).abs().max().item())
    assert row_errors[0] > row_errors[1] > row_errors[2] and row_errors[2] < 1e-6


def test_log_domain_sinkhorn_matches_direct_normalisation_in_float64():
    cost = torch.cdist(probs(2, 6, 4, seed=48, dtype=torch.float64), probs(2, 6, 4, seed=49, dtype=torch.float64), p=1)
    direct = torch.exp(-cost / 0.1)
    for _ in range(20):
        direct = direct / direct.sum(-1, keepdim=True)
        direct = direct / direct.sum(-2, keepdim=True)
    torch.testing.assert_close(sinkhorn_plan(cost, 0.1, 20), direct, rtol=1e-10, atol=1e-12)


def test_gradcheck_had_sl_and_unrolled_sinkhorn_in_float64():
    teacher = probs(5, 4, seed=50, dtype=torch.float64)
    student_logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: holistic_absolute_difference(teacher, z.softmax(-1)), (student_logits,))
    assert torch.autograd.gradcheck(lambda z: sequential_log_loss(teacher, z.log_softmax(-1)), (student_logits,))
    assert torch.autograd.gradcheck(lambda z: sinkhorn_distance(teacher, z.softmax(-1), 0.1, 20), (student_logits,))
    assert torch.autograd.gradcheck(lambda z: sinkhorn_distance(z.softmax(-1), teacher, 0.5, 5), (student_logits,))


def test_loss_reduction_divides_each_example_by_its_valid_positions_then_averages_examples():
    params = MultiLevelOtParams(sl_weight=0.5, sd_weight=0.25, sinkhorn_iterations=3)
    teacher, student = probs(2, 4, 3, seed=51), probs(2, 4, 3, seed=52)
    teacher_sd, student_sd = probs(2, 4, 3, seed=53), probs(2, 4, 3, seed=54)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss, metrics = multilevel_ot_loss(teacher, student.log(), teacher_sd, student_sd, valid, params)
    per_example = []
    for b, n in enumerate((3, 1)):
        had = holistic_absolute_difference(teacher[b, :n], student[b, :n]).sum()
        sl = sequential_log_loss(teacher[b, :n], student[b, :n].log()).sum()
        sd = sinkhorn_distance(teacher_sd[b, :n], student_sd[b, :n], 0.1, 3)
        per_example.append((had + 0.5 * sl + 0.25 * sd) / n)
    torch.testing.assert_close(loss, sum(per_example) / 2)
    assert set(metrics) == {"had", "sl", "sd"}
    empty, _ = multilevel_ot_loss(teacher, student.log(), teacher_sd, student_sd, torch.zeros_like(valid), params)
    assert empty == 0


# ------------------------------------------------------------------------------------------- adapters


D_STUDENT, D_TEACHER, V_STUDENT, V_TEACHER, STORED_K = 8, 6, 12, 16, 6


def token_mask(prompt: list[int], answer: list[int], length: int) -> torch.Tensor:
    mask = torch.zeros(len(prompt), length, dtype=torch.bool)
    for b, (start, count) in enumerate(zip(prompt, answer)):
        mask[b, start : start + count] = True
    return mask


def student_view(hidden: torch.Tensor, loss_mask: torch.Tensor, head: torch.nn.Module) -> StudentView:
    shape = loss_mask.shape
    # The head has two padded output rows past the vocabulary: the losses must slice them off.
    return StudentView(model=head, hidden=hidden, head=head, vocab_size=V_STUDENT,
                       input_ids=torch.zeros(shape, dtype=torch.long),
                       attention_mask=torch.ones(shape, dtype=torch.long),
                       loss_mask=loss_mask, token_logprobs=torch.zeros(shape), boundary_logprobs=torch.zeros(shape),
                       chunk_size=3)


def teacher_view(hidden: torch.Tensor, loss_mask: torch.Tensor, head, vocab_size: int, live: bool) -> TeacherView:
    shape = loss_mask.shape
    common = dict(input_ids=torch.zeros(shape, dtype=torch.long), attention_mask=torch.ones(shape, dtype=torch.long),
                  loss_mask=loss_mask, token_logprobs=torch.zeros(shape), boundary_logprobs=torch.zeros(shape),
                  vocab_size=vocab_size, truncation=TeacherTruncation())
    if live:
        return TeacherView(**common, model=head, hidden=hidden, head=head)
    with torch.no_grad():
        top = head(hidden)[..., :vocab_size].log_softmax(-1).topk(STORED_K, dim=-1)
    return TeacherView(**common, topk_ids=top.indices, topk_logprobs=top.values)


class Pair:
    """Two examples with different prompt and answer lengths on each side; the student answer ends in an EOS."""

    student_prompt, student_answer, student_length = [2, 3], [5, 4], 9
    teacher_prompt, teacher_answer, teacher_length = [3, 1], [4, 5], 10

    def __init__(self, seed: int = 0, teacher_vocab: int = V_TEACHER):
        torch.manual_seed(seed)
        self.teacher_vocab = teacher_vocab
        self.student_head = torch.nn.Linear(D_STUDENT, V_STUDENT + 2)
        self.teacher_head = torch.nn.Linear(D_TEACHER, teacher_vocab).requires_grad_(False)
        self.student_hidden = torch.randn(2, self.student_length, D_STUDENT, requires_grad=True)
        self.teacher_hidden = torch.randn(2, self.teacher_length, D_TEACHER)
        self.student_mask = token_mask(self.student_prompt, self.student_answer, self.student_length)
        self.teacher_mask = token_mask(self.teacher_prompt, self.teacher_answer, self.teacher_length)

    def views(self, live: bool) -> tuple[StudentView, TeacherView]:
        return (student_view(self.student_hidden, self.student_mask, self.student_head),
                teacher_view(self.teacher_hidden, self.teacher_mask, self.teacher_head, self.teacher_vocab, live))

    def pairs(self, b: int) -> tuple[list[int], list[int]]:
        """Rows by hand: the row before each answer token, the student's EOS dropped, cut to the shorter side."""
        count = min(self.student_answer[b] - 1, self.teacher_answer[b])
        return ([self.student_prompt[b] - 1 + t for t in range(count)],
                [self.teacher_prompt[b] - 1 + t for t in range(count)])

    def dense(self, b: int, live: bool, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 student logits and teacher probabilities at the paired rows of example b."""
        student_rows, teacher_rows = self.pairs(b)
        student_logits = self.student_head(self.student_hidden[b, student_rows]).double()[:, :V_STUDENT]
        teacher_logits = self.teacher_head(self.teacher_hidden[b, teacher_rows]).double()
        if live:
            return student_logits, (teacher_logits / temperature).softmax(-1)
        top = teacher_logits.log_softmax(-1).topk(STORED_K, dim=-1)
        kept = top.values if temperature == 1 else (top.values / temperature).log_softmax(-1)
        return student_logits, torch.zeros_like(teacher_logits).scatter(-1, top.indices, kept.exp())


def reference_uld(pair: Pair, live: bool, top_k: int) -> torch.Tensor:
    distances = []
    for b in range(2):
        student_logits, teacher = pair.dense(b, live)
        student = student_logits.softmax(-1)
        width = max(V_STUDENT, pair.teacher_vocab)
        student_sorted = torch.nn.functional.pad(student.sort(-1, descending=True).values, (0, width - V_STUDENT))
        teacher_sorted = torch.nn.functional.pad(teacher.sort(-1, descending=True).values,
                                                 (0, width - pair.teacher_vocab))
        head = (student_sorted[:, :top_k] - teacher_sorted[:, :top_k]).abs().sum(-1)
        tail = (1 - student_sorted[:, :top_k].sum(-1)) - (1 - teacher_sorted[:, :top_k].sum(-1))
        distances.append(head + tail.abs())
    return torch.cat(distances).mean()


def reference_multilevel_ot(pair: Pair, live: bool, params: MultiLevelOtParams) -> torch.Tensor:
    """The paper's formulation with plain argsorts, full softmaxes and direct Sinkhorn normalisation, in float64."""
    losses = []
    for b in range(2):
        student_logits, teacher = pair.dense(b, live)
        _, teacher_sd = pair.dense(b, live, params.sd_temperature)
        student_log = student_logits.log_softmax(-1)
        student_sd = (student_logits / params.sd_temperature).softmax(-1)
        k = min(params.top_k, V_STUDENT, pair.teacher_vocab)
        if params.ranking == "sequence":
            teacher_ids = teacher.sum(0).argsort(descending=True)[:k].expand(len(teacher), k)
            student_ids = student_log.exp().sum(0).argsort(descending=True)[:k].expand(len(teacher), k)
        else:
            teacher_ids = teacher.argsort(-1, descending=True)[:, :k]
            student_ids = student_log.argsort(-1, descending=True)[:, :k]
        t, t_sd = teacher.gather(-1, teacher_ids), teacher_sd.gather(-1, teacher_ids)
        log_s, s_sd = student_log.gather(-1, student_ids), student_sd.gather(-1, student_ids)
        had = (t - log_s.exp()).abs().sum()
        sl = -(t * log_s).sum()
        cost = (t_sd[:, None, :] - s_sd[None, :, :]).abs().sum(-1)
        plan = torch.exp(-cost / params.sinkhorn_lambda)
        for _ in range(params.sinkhorn_iterations):
            plan = plan / plan.sum(1, keepdim=True)
            plan = plan / plan.sum(0, keepdim=True)
        sd = (plan * cost).sum()
        losses.append((had + params.sl_weight * sl + params.sd_weight * sd) / len(t))
    return torch.stack(losses).mean()


def run(loss: torch.nn.Module, pair: Pair, live: bool):
    student, teacher = pair.views(live)
    return loss(student, teacher, NO_ALIGNMENT)


def test_losses_are_registered_with_the_teacher_fields_they_read():
    assert LOSSES["uld"] is UldLoss and LOSSES["multilevel_ot"] is MultiLevelOtLoss
    for cls, (section, model) in ((UldLoss, ("uld", UldParams)),
                                  (MultiLevelOtLoss, ("multilevel_ot", MultiLevelOtParams))):
        assert cls.section() == section and cls.params_model is model
        assert cls.teacher_fields == ("topk_ids", "topk_logprobs")
        assert not cls.same_tokenizer_only and not cls.needs_online_teacher


@pytest.mark.parametrize("live, top_k", [(True, 16), (True, 5), (False, 256), (False, 4)])
def test_uld_adapter_matches_the_dense_reference(live, top_k):
    pair = Pair()
    output = run(UldLoss(UldParams(top_k=top_k), SETUP), pair, live)
    # Offline the teacher is only known on its stored top-k, so k is capped there.
    effective_k = top_k if live else min(top_k, STORED_K)
    torch.testing.assert_close(output.loss.double(), reference_uld(pair, live, effective_k), rtol=1e-5, atol=1e-6)


def test_uld_adapter_with_top_k_covering_the_vocabulary_is_exact_against_a_live_teacher():
    pair = Pair(seed=1)
    exact = []
    for b in range(2):
        student_logits, teacher = pair.dense(b, live=True)
        exact.append(exact_uld(student_logits.softmax(-1), teacher))
    output = run(UldLoss(UldParams(top_k=V_TEACHER), SETUP), pair, live=True)
    torch.testing.assert_close(output.loss.double(), torch.cat(exact).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranking", ["sequence", "token"])
@pytest.mark.parametrize("live", [True, False])
@pytest.mark.parametrize("top_k", [5, 50])
def test_multilevel_ot_adapter_matches_the_dense_reference(ranking, live, top_k):
    pair = Pair(seed=2)
    params = MultiLevelOtParams(ranking=ranking, top_k=top_k)
    output = run(MultiLevelOtLoss(params, SETUP), pair, live)
    torch.testing.assert_close(output.loss.double(), reference_multilevel_ot(pair, live, params), rtol=1e-4, atol=1e-5)
    assert set(output.metrics) == {"had", "sl", "sd"}


@pytest.mark.parametrize("ranking", ["sequence", "token"])
def test_multilevel_ot_with_top_k_covering_the_vocabulary_equals_the_untruncated_loss(ranking):
    """Equal vocabularies, k = 200 > V: the reference then ranks every dimension and truncates nothing."""
    pair = Pair(seed=3, teacher_vocab=V_STUDENT)
    untruncated = reference_multilevel_ot(pair, True, MultiLevelOtParams(ranking=ranking, top_k=V_STUDENT))
    output = run(MultiLevelOtLoss(MultiLevelOtParams(ranking=ranking, top_k=200), SETUP), pair, live=True)
    torch.testing.assert_close(output.loss.double(), untruncated, rtol=1e-4, atol=1e-5)
    truncated = run(MultiLevelOtLoss(MultiLevelOtParams(ranking=ranking, top_k=4), SETUP), pair, live=True)
    assert abs(truncated.loss.item() - output.loss.item()) > 1e-3


@pytest.mark.parametrize("live", [True, False])
@pytest.mark.parametrize("loss", [UldLoss(UldParams(), SETUP), MultiLevelOtLoss(MultiLevelOtParams(), SETUP),
                                  MultiLevelOtLoss(MultiLevelOtParams(ranking="token"), SETUP)])
def test_adapters_backpropagate_finite_gradients_to_the_student_only(loss, live):
    pair = Pair(seed=4)
    output = run(loss, pair, live)
    output.loss.backward()
    gradient = pair.student_hidden.grad
    assert torch.isfinite(output.loss) and torch.isfinite(gradient).all()
    answer_rows = {b: set(pair.pairs(b)[0]) for b in range(2)}
    for b in range(2):
        for row in range(pair.student_length):
            # Only the paired answer rows reach the loss.
            assert (gradient[b, row].abs().sum() > 0) == (row in answer_rows[b])
    assert pair.student_head.weight.grad[V_STUDENT:].abs().sum() == 0  # padded head rows are sliced off
    assert all(p.grad is None for p in pair.teacher_head.parameters())


@pytest.mark.parametrize("loss", [UldLoss(UldParams(top_k=8), SETUP), MultiLevelOtLoss(MultiLevelOtParams(), SETUP),
                                  MultiLevelOtLoss(MultiLevelOtParams(ranking="token"), SETUP)])
def test_first_pair_rows_predict_the_first_answer_tokens(loss):
    """Same head on both sides, and the student's hidden state at the row before its t-th answer token equals
    the teacher's at the row before its t-th answer token: the distributions match only if the pairing does."""
    pair = Pair(seed=5)
    shared = torch.nn.Linear(D_STUDENT, V_STUDENT)
    teacher_hidden = torch.randn(2, pair.teacher_length, D_STUDENT)
    student_hidden = torch.randn(2, pair.student_length, D_STUDENT)
    for b in range(2):
        student_rows, teacher_rows = pair.pairs(b)
        student_hidden[b, student_rows] = teacher_hidden[b, teacher_rows]
    student = student_view(student_hidden, pair.student_mask, shared)
    teacher = teacher_view(teacher_hidden, pair.teacher_mask, shared, V_STUDENT, live=True)
    matched = loss(student, teacher, NO_ALIGNMENT)
    # ULD vanishes; for MultiLevelOT HAD does (SL is then the entropy and SD is entropic, both positive).
    assert (matched.loss if isinstance(loss, UldLoss) else matched.metrics["had"]) < 1e-6
    shifted = student_view(student_hidden, pair.student_mask.roll(1, dims=1), shared)
    assert loss(shifted, teacher, NO_ALIGNMENT).loss > matched.loss + 1e-3


@pytest.mark.parametrize("loss", [UldLoss(UldParams(top_k=8), SETUP), MultiLevelOtLoss(MultiLevelOtParams(), SETUP)])
def test_appending_masked_padding_positions_changes_nothing(loss):
    pair = Pair(seed=6)
    expected = run(loss, pair, live=True).loss

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([t, torch.zeros(t.shape[0], n, *t.shape[2:], dtype=t.dtype)], dim=1)

    student = student_view(pad(pair.student_hidden.detach(), 3), pad(pair.student_mask, 3), pair.student_head)
    teacher = teacher_view(pad(pair.teacher_hidden, 2), pad(pair.teacher_mask, 2), pair.teacher_head, V_TEACHER, True)
    torch.testing.assert_close(loss(student, teacher, NO_ALIGNMENT).loss, expected)


@pytest.mark.parametrize("loss", [UldLoss(UldParams(top_k=8), SETUP), MultiLevelOtLoss(MultiLevelOtParams(), SETUP),
                                  MultiLevelOtLoss(MultiLevelOtParams(ranking="token"), SETUP)])
def test_adapters_ignore_teacher_vocabulary_order_and_zero_probability_entries(loss):
    pair = Pair(seed=7)
    expected = run(loss, pair, live=True).loss
    permutation = torch.randperm(V_TEACHER)

    def permuted(h: torch.Tensor) -> torch.Tensor:
        return pair.teacher_head(h)[..., permutation]

    def padded(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([pair.teacher_head(h), torch.full((*h.shape[:-1], 5), float("-inf"))], dim=-1)

    student = student_view(pair.student_hidden, pair.student_mask, pair.student_head)
    for head, vocab in ((permuted, V_TEACHER), (padded, V_TEACHER + 5)):
        teacher = teacher_view(pair.teacher_hidden, pair.teacher_mask, head, vocab, live=True)
        torch.testing.assert_close(loss(student, teacher, NO_ALIGNMENT).loss, expected)


@pytest.mark.parametrize("loss", [UldLoss(UldParams(top_k=8), SETUP), MultiLevelOtLoss(MultiLevelOtParams(), SETUP),
                                  MultiLevelOtLoss(MultiLevelOtParams(ranking="token"), SETUP)])
def test_bfloat16_models_and_near_one_hot_distributions_stay_finite(loss):
    pair = Pair(seed=8)
    expected = run(loss, pair, live=True).loss
    pair.student_head.to(torch.bfloat16)
    pair.teacher_head.to(torch.bfloat16)
    hidden = pair.student_hidden.detach().bfloat16().requires_grad_()
    student = student_view(hidden, pair.student_mask, pair.student_head)
    teacher = teacher_view(pair.teacher_hidden.bfloat16(), pair.teacher_mask, pair.teacher_head, V_TEACHER, live=True)
    torch.testing.assert_close(loss(student, teacher, NO_ALIGNMENT).loss, expected, rtol=0.05, atol=0.02)
    with torch.no_grad():  # logits in the thousands: probability-1 tokens, log-probs in the -thousands
        pair.student_head.weight.mul_(3e3)
        pair.teacher_head.weight.mul_(3e3)
    output = loss(student, teacher, NO_ALIGNMENT)
    output.loss.backward()
    assert torch.isfinite(output.loss) and torch.isfinite(student.hidden.grad).all()
