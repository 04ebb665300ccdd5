"""ALM loss invariants of spec section 1.23 (items 7-11, 13) and the SFT term."""

from __future__ import annotations

import math

import pytest
import torch

from components.losses.alm import AlmOptions, alm_loss, chunk_divergence
from components.losses.sft import sft_loss

NAIVE = AlmOptions(merge_by_space_prob=False, append_space=False)


def _batch(length=12, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, length, vocab, generator=generator) * 3
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    return logits, ids


def _rows(logits, ids, boundary):
    log_probs = logits.log_softmax(-1)
    token = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    token = torch.cat([token, torch.zeros_like(token[:, :1])], 1)
    on_boundary = torch.logsumexp(log_probs.masked_fill(~boundary, float("-inf")), -1)
    return token, on_boundary


def _identity_chunks(length, start=1):
    ids = torch.full((2, length), -1)
    ids[:, start:] = torch.arange(length - start)
    return ids


@pytest.mark.parametrize("diff_fn", ["reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit"])
def test_identical_models_give_zero_loss(diff_fn):
    logits, ids = _batch()
    boundary = torch.arange(50) % 3 == 0
    token, on_boundary = _rows(logits, ids, boundary)
    chunks = _identity_chunks(12)
    result = alm_loss(token, on_boundary, token, on_boundary, chunks, chunks, AlmOptions(diff_fn=diff_fn))
    assert result.loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("options", [NAIVE, AlmOptions()])
def test_equal_chunk_likelihoods_give_zero_gradient(options):
    logits, ids = _batch()
    boundary = torch.arange(50) % 3 == 0
    teacher_token, teacher_boundary = _rows(logits, ids, boundary)
    student_logits = logits.clone().requires_grad_(True)
    student_token, student_boundary = _rows(student_logits, ids, boundary)
    chunks = _identity_chunks(12)
    result = alm_loss(teacher_token, teacher_boundary, student_token, student_boundary, chunks, chunks, options)
    result.loss.backward()
    assert student_logits.grad.abs().max().item() < 1e-6
    # binary_ce is not zero at equality: it equals the mean binary entropy of the teacher's tempered probs.
    assert result.loss.item() > 0


def test_identical_tokenizers_reduce_to_per_token_binary_cross_entropy():
    logits_t, ids = _batch(seed=1)
    logits_s, _ = _batch(seed=2)
    boundary = torch.zeros(50, dtype=torch.bool)
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks = _identity_chunks(12, start=3)
    result = alm_loss(t, tb, s, sb, chunks, chunks, NAIVE)
    expected = []
    for b in range(2):
        for i in range(3, 12):
            a = math.exp(t[b, i - 1].item() / 100 - 1e-6)
            q = math.exp(s[b, i - 1].item() / 100 - 1e-6)
            expected.append(-(a * math.log(q) + (1 - a) * math.log(1 - q)))
    assert result.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert result.num_chunks.item() == 18


def test_temperature_limits_match_the_spec_values():
    teacher, student = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64)
    tau = 1e4
    forward = chunk_divergence(teacher, student, "binary_ce", tau) - chunk_divergence(teacher, teacher, "binary_ce", tau)
    # The -1e-6 inside the exponent shifts each log-likelihood by tau * 1e-6 before the limit applies.
    t, u = -3.0 - tau * 1e-6, -5.0 - tau * 1e-6
    assert (tau * forward).item() == pytest.approx((t - u) + t * math.log(u / t), rel=1e-3)
    assert chunk_divergence(teacher, student, "binary_kl_temp_limit", tau).item() == pytest.approx(0.4675, rel=1e-3)
    assert (tau * chunk_divergence(teacher, student, "abs_exp", tau)).item() == pytest.approx(2.0, rel=1e-3)


def test_padding_leaves_the_loss_unchanged():
    logits_t, ids = _batch(seed=3)
    logits_s, _ = _batch(seed=4)
    boundary = torch.arange(50) % 4 == 0
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks = _identity_chunks(12)
    base = alm_loss(t, tb, s, sb, chunks, chunks, AlmOptions()).loss
    pad = lambda x, value: torch.cat([x, torch.full((2, 5), value, dtype=x.dtype)], 1)  # noqa: E731
    padded = alm_loss(pad(t, -7.0), pad(tb, -2.0), pad(s, -9.0), pad(sb, -1.0), pad(chunks, -1), pad(chunks, -1), AlmOptions()).loss
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)


def test_merging_with_negative_gamma_is_the_identity_and_above_one_merges_everything():
    logits_t, ids = _batch(seed=5)
    logits_s, _ = _batch(seed=6)
    boundary = torch.arange(50) % 2 == 0
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks = _identity_chunks(12)
    unmerged = alm_loss(t, tb, s, sb, chunks, chunks, AlmOptions(merge_by_space_prob=False))
    identity = alm_loss(t, tb, s, sb, chunks, chunks, AlmOptions(boundary_threshold=-1.0))
    assert identity.loss.item() == pytest.approx(unmerged.loss.item(), rel=1e-6)
    everything = alm_loss(t, tb, s, sb, chunks, chunks, AlmOptions(boundary_threshold=2.0, append_space=False))
    assert everything.num_chunks.item() == 2  # one merged chunk per example
    # The merged log-likelihood is the sum of its constituents (clipped at 0 per chunk, all <= 0 here).
    assert everything.teacher_chunk_logprob.item() == pytest.approx(t[:, :-1].sum().item() / 2, rel=1e-5)


def test_no_nan_or_inf_at_extreme_log_likelihoods():
    for value in (0.0, -1e-9, -1e4):
        for dtype in (torch.float32, torch.bfloat16):
            t = torch.full((1, 6), value, dtype=dtype)
            s = torch.full((1, 6), -1.0, dtype=dtype, requires_grad=True)
            chunks = _identity_chunks(6)[:1]
            result = alm_loss(t, t, s, s, chunks, chunks, AlmOptions())
            result.loss.backward()
            assert torch.isfinite(result.loss) and torch.isfinite(s.grad).all()


def test_sft_is_the_mean_negative_log_likelihood_of_targets():
    rows = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, False, True, True]])  # token 0 never counts; tokens 2, 3 use rows 1, 2
    assert sft_loss(rows, mask).item() == pytest.approx((2.0 + 3.0) / 2)
