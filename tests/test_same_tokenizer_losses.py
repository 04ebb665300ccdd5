"""Same-tokenizer KD (docs/algorithms/pretraining-distillation.md#invariants, docs/algorithms/gkd.md#invariants):
teacher truncation and temperature, and the divergences."""

from __future__ import annotations

import math

import pytest
import torch

from tokenbridge.config import TeacherTruncation
from tokenbridge.losses import divergences
from tokenbridge.losses.base import StudentView, TeacherView
from tokenbridge.losses.kd import ForwardKL, divergence_mean
from tokenbridge.losses.teacher_distribution import truncate

VOCAB = 12


def _log_probs(seed: int, shape=(3, VOCAB), scale=2.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).log_softmax(-1)


# --- Truncation (pre-training distillation invariants 1-2) ------------------------------------------------------

def test_truncation_with_top_p_one_and_no_top_k_is_the_identity():
    lp = _log_probs(0, dtype=torch.float32)
    torch.testing.assert_close(truncate(lp, TeacherTruncation()), lp)


def test_top_k_one_is_a_one_hot_on_the_argmax():
    lp = _log_probs(1, dtype=torch.float32)
    kept = truncate(lp, TeacherTruncation(top_k=1)).exp()
    assert torch.equal(kept, torch.nn.functional.one_hot(lp.argmax(-1), VOCAB).float())


def test_top_p_keeps_the_minimal_prefix_including_the_crossing_token_capped_at_top_k():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    kept = truncate(probs.log(), TeacherTruncation(top_p=0.75)).exp()
    # Sorted: 0.4, 0.3 (0.7 < 0.75), 0.15 crosses -> kept; 0.1 and 0.05 dropped.
    expected = torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]) / 0.85
    torch.testing.assert_close(kept, expected)
    capped = truncate(probs.log(), TeacherTruncation(top_p=0.75, top_k=2)).exp()
    torch.testing.assert_close(capped, torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.0]]) / 0.7)


def test_truncated_distribution_sums_to_one_and_temperature_never_changes_the_kept_ids():
    lp = _log_probs(2, dtype=torch.float32)
    for temperature in (0.05, 0.5, 1.0, 2.0, 50.0):
        kept = truncate(lp, TeacherTruncation(top_p=0.9, top_k=6, temperature=temperature))
        torch.testing.assert_close(kept.exp().sum(-1), torch.ones(3))
        assert torch.equal(kept > float("-inf"), truncate(lp, TeacherTruncation(top_p=0.9, top_k=6)) > float("-inf"))


def test_temperature_limits_are_one_hot_and_uniform_over_the_kept_set():
    lp = _log_probs(3, dtype=torch.float32)
    cold = truncate(lp, TeacherTruncation(top_k=5, temperature=1e-4)).exp()
    assert torch.equal(cold, torch.nn.functional.one_hot(lp.argmax(-1), VOCAB).float())
    hot = truncate(lp, TeacherTruncation(top_k=5, temperature=1e6)).exp()
    torch.testing.assert_close(hot[hot > 0], torch.full((15,), 0.2), atol=1e-5, rtol=0)


def test_retempering_stored_log_probs_equals_tempering_the_original_logits():
    logits = torch.randn(4, VOCAB)
    stored = (logits / 2.0).log_softmax(-1)  # extracted at temperature 2
    torch.testing.assert_close(truncate(stored, TeacherTruncation(temperature=0.5), source_temperature=2.0),
                               (logits / 0.5).log_softmax(-1))


# --- Divergences (GKD invariants; pre-training distillation 3 and 5) ----------------------------------------------

def test_jsd_endpoints_are_the_exact_kls():
    p, q = _log_probs(4), _log_probs(5)
    forward = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(divergences.jsd(p, q, 0.0), forward)
    torch.testing.assert_close(divergences.jsd(p, q, 1.0), (q.exp() * (q - p)).sum(-1))
    torch.testing.assert_close(forward, torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1))


def test_jsd_scaled_by_beta_tends_to_the_kls_at_the_ends():
    p, q = _log_probs(6), _log_probs(7)
    beta = 1e-4
    torch.testing.assert_close(divergences.jsd(p, q, beta) / beta, divergences.forward_kl(p, q), rtol=1e-2, atol=0)
    torch.testing.assert_close(divergences.jsd(p, q, 1 - beta) / beta, divergences.reverse_kl(p, q), rtol=1e-2, atol=0)


def test_jsd_swap_symmetry_and_bounds():
    p, q = _log_probs(8), _log_probs(9)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(divergences.jsd(p, q, beta), divergences.jsd(q, p, 1 - beta))
        values = divergences.jsd(p, q, beta)
        entropy_bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (values >= 0).all() and (values <= entropy_bound + 1e-12).all()
    assert not torch.allclose(divergences.jsd(p, q, 0.1), divergences.jsd(q, p, 0.1))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd"])
def test_divergences_are_zero_for_identical_distributions_and_for_two_uniforms(name):
    fn = getattr(divergences, name)
    p = _log_probs(10)
    torch.testing.assert_close(fn(p, p), torch.zeros(3, dtype=p.dtype), atol=1e-12, rtol=0)
    uniform = torch.full((2, VOCAB), -math.log(VOCAB), dtype=torch.float64)
    torch.testing.assert_close(fn(uniform, uniform), torch.zeros(2, dtype=p.dtype), atol=1e-12, rtol=0)
    for skewed in (divergences.skew_forward_kl, divergences.skew_reverse_kl):
        torch.testing.assert_close(skewed(p, p, 0.1), torch.zeros(3, dtype=p.dtype), atol=1e-12, rtol=0)


def test_tvd_is_half_the_l1_distance_and_skews_are_kls_against_mixtures():
    p, q = _log_probs(11), _log_probs(12)
    torch.testing.assert_close(divergences.tvd(p, q), 0.5 * (p.exp() - q.exp()).abs().sum(-1))
    mix = (0.1 * p.exp() + 0.9 * q.exp()).log()
    torch.testing.assert_close(divergences.skew_forward_kl(p, q, 0.1), (p.exp() * (p - mix)).sum(-1))
    mix = (0.1 * q.exp() + 0.9 * p.exp()).log()
    torch.testing.assert_close(divergences.skew_reverse_kl(p, q, 0.1), (q.exp() * (q - mix)).sum(-1))


def test_divergences_pass_float64_gradcheck():
    p = _log_probs(13)
    logits = torch.randn(3, VOCAB, dtype=torch.float64, requires_grad=True)
    for fn in (divergences.forward_kl, divergences.reverse_kl, divergences.tvd,
               lambda a, b: divergences.jsd(a, b, 0.3), lambda a, b: divergences.skew_reverse_kl(a, b, 0.1)):
        assert torch.autograd.gradcheck(lambda z, fn=fn: fn(p, z.log_softmax(-1)), (logits,))


def test_sparse_forward_kl_equals_dense_kl_against_the_zero_filled_teacher_and_nll_differs_by_entropy():
    teacher = truncate(_log_probs(14, dtype=torch.float32), TeacherTruncation(top_p=0.8, top_k=5))
    logits = torch.randn(3, VOCAB, requires_grad=True)
    student = logits.log_softmax(-1)
    p = teacher.exp()
    dense = (torch.where(p > 0, p * (p.log() - student), 0.0)).sum(-1)
    torch.testing.assert_close(divergences.forward_kl(teacher, student), dense)
    # NLL (soft cross-entropy) - KLD = H(p): independent of the student, so both have the same gradient.
    nll = -(p * student).sum(-1)
    entropy = -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1)
    torch.testing.assert_close(nll - divergences.forward_kl(teacher, student), entropy)
    grad_kl, = torch.autograd.grad(divergences.forward_kl(teacher, student).sum(), logits, retain_graph=True)
    grad_nll, = torch.autograd.grad(nll.sum(), logits)
    torch.testing.assert_close(grad_kl, grad_nll)


# --- The adapter: rows, masks, offline vs online -----------------------------------------------------------

NO_TRUNCATION = TeacherTruncation()


def _views(seed=0, length=7, hidden=8, k=None, truncation=NO_TRUNCATION):
    generator = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(hidden, VOCAB + 4, bias=False)  # 4 padded rows past the vocabulary
    teacher_head = torch.nn.Linear(hidden, VOCAB, bias=False).requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[:, :3] = False  # prompt
    mask[1, -2:] = False  # padding
    student_hidden = torch.randn(2, length, hidden, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(2, length, hidden, generator=generator)
    zeros = torch.zeros(2, length)
    student = StudentView(None, student_hidden, student_head, VOCAB, ids, mask.long(), mask, zeros, zeros, chunk_size=3)
    common = dict(input_ids=ids, attention_mask=mask.long(), loss_mask=mask, token_logprobs=zeros,
                  boundary_logprobs=zeros, vocab_size=VOCAB, truncation=truncation)
    live = TeacherView(**common, hidden=teacher_hidden, head=teacher_head)
    full = teacher_head(teacher_hidden).log_softmax(-1)
    values, top = full.topk(k or VOCAB, -1)
    stored = TeacherView(**common, topk_ids=top, topk_logprobs=values)
    return student, live, stored, full


def test_offline_with_every_entry_stored_equals_the_live_teacher_and_a_hand_computed_mean():
    student, live, stored, full = _views()
    online = divergence_mean(student, live, divergences.forward_kl).value
    offline = divergence_mean(student, stored, divergences.forward_kl).value
    torch.testing.assert_close(online, offline)
    student_lp = student.head(student.hidden)[..., :VOCAB].log_softmax(-1)
    expected = [divergences.forward_kl(full[b, i - 1], student_lp[b, i - 1])
                for b in range(2) for i in range(1, 7) if student.loss_mask[b, i]]
    torch.testing.assert_close(online, torch.stack(expected).mean())


def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient():
    student, live, _, _ = _views()
    live.hidden, live.head = student.hidden.detach(), lambda h: student.head(h)[..., :VOCAB]
    loss = divergence_mean(student, live, divergences.forward_kl).value
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.hidden.grad.abs().max().item() < 1e-6


def test_masked_rows_and_padding_do_not_change_the_loss():
    student, live, _, _ = _views()
    base = divergence_mean(student, live, divergences.tvd).value
    scrambled = torch.randn_like(student.hidden)
    keep = torch.zeros_like(student.loss_mask)
    keep[:, 1:] = student.loss_mask[:, 1:]  # rows 0..L-2 predict targets; row of masked targets is free
    rows_used = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], 1)
    student.hidden = torch.where(rows_used[..., None], student.hidden, scrambled)
    torch.testing.assert_close(divergence_mean(student, live, divergences.tvd).value, base)


def test_truncated_stored_teacher_matches_truncating_the_live_teacher():
    truncation = TeacherTruncation(top_p=0.7, top_k=4, temperature=2.0)
    student, live, stored, _ = _views(k=6, truncation=truncation)
    torch.testing.assert_close(divergence_mean(student, stored, divergences.forward_kl).value,
                               divergence_mean(student, live, divergences.forward_kl).value)


def test_same_tokenizer_losses_refuse_different_token_sequences():
    student, live, _, _ = _views()
    live.input_ids = live.input_ids.flip(1)
    with pytest.raises(ValueError, match="identical token sequences"):
        ForwardKL(None, None)(student, live, None)
