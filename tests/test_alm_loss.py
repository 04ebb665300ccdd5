"""ALM loss invariants (docs/algorithms/alm.md#invariants, items 7-14b), the registered adapter on real tiny models,
and SFT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenbridge.alignment import example_chunks
from tokenbridge.config import TeacherTruncation
from tokenbridge.data.chat import encode_example
from tokenbridge.data.padding import pad_batch
from tokenbridge.losses import divergences
from tokenbridge.losses.alm import AlmLoss, AlmOptions, AlmParams, alm_loss, chunk_divergence, word_chunks
from tokenbridge.losses.base import LOSSES, Alignment, LossSetup, StudentView, TeacherView
from tokenbridge.losses.sft import sft_loss
from tokenbridge.losses.token_stats import hidden_states, next_token_stats, output_head
from tokenbridge.models import load_model
from tokenbridge.token_bytes import boundary_mask

DIFF_FNS = ["binary_ce", "binary_kl", "reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit", "joschu_k2",
            "joschu_k3"]
NAIVE = AlmOptions(merge_by_space_prob=False, append_space=False)
FLAG_SETS = [NAIVE, AlmOptions(append_space=False), AlmOptions(merge_by_space_prob=False), AlmOptions()]
EPS = 1e-6
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------------------------------------
# A plain-Python reference of docs/algorithms/alm.md#the-loss-in-one-formula, written from the formulas and
# independent of the tensor code.

def _reference_divergence(diff_fn: str, teacher: float, student: float, tau: float) -> float:
    log_a, log_b = teacher / tau - EPS, student / tau - EPS
    a, b = math.exp(log_a), math.exp(log_b)
    log_1ma, log_1mb = math.log1p(-a), math.log1p(-b)
    return {
        "binary_ce": -(a * log_b + (1 - a) * log_1mb),
        "binary_kl": a * (log_a - log_b) + (1 - a) * (log_1ma - log_1mb),
        "reverse_binary_kl": b * (log_b - log_a) + (1 - b) * (log_1mb - log_1ma),
        "abs_exp": abs(a - b),
        "abs": abs(teacher - student),
        "binary_kl_temp_limit": (teacher - student) + (teacher - EPS) * math.log((student - EPS) / (teacher - EPS)),
        "joschu_k2": (log_a - log_b) ** 2 / 2,
        "joschu_k3": math.exp(log_a - log_b) - 1 - (log_a - log_b),
    }[diff_fn]


def _reference_alm(teacher_rows, teacher_boundary, student_rows, student_boundary, teacher_ids, student_ids,
                   counted, options: AlmOptions) -> tuple[float, int]:
    """Mean divergence over counted (merged) chunks and their number, example by example."""
    values = []
    for b in range(len(teacher_ids)):
        chunks = sorted(set(teacher_ids[b]) - {-1})

        def chunk_stats(ids, rows, boundary, chunk, b=b):
            tokens = [i for i, value in enumerate(ids) if value == chunk]
            return sum(min(0.0, rows[b][i - 1]) for i in tokens), min(0.0, boundary[b][tokens[-1]])

        lp_t, beta_t = zip(*(chunk_stats(teacher_ids[b], teacher_rows, teacher_boundary, c) for c in chunks))
        lp_s, beta_s = zip(*(chunk_stats(student_ids[b], student_rows, student_boundary, c) for c in chunks))
        groups, current = [], []
        for c in chunks:
            current.append(c)
            if not options.merge_by_space_prob or math.exp(beta_t[c]) > options.boundary_threshold:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        for group in groups:
            members = [c for c in group if counted[b][c]]
            if not members:
                continue
            teacher_lp, student_lp = sum(lp_t[c] for c in members), sum(lp_s[c] for c in members)
            if options.append_space:
                teacher_lp, student_lp = teacher_lp + beta_t[members[-1]], student_lp + beta_s[members[-1]]
            values.append(_reference_divergence(options.diff_fn, teacher_lp, student_lp, options.binarization_temp))
    return (sum(values) / len(values) if values else 0.0), len(values)


@st.composite
def chunk_layouts(draw):
    """Per-token chunk ids for a batch: chunks of 1-3 tokens per side, template gaps, trailing padding."""
    teacher_ids, student_ids, counted = [], [], []
    for _ in range(draw(st.integers(1, 3))):
        teacher, student, flags = [-1], [-1], []  # token 0 is never in a chunk
        for chunk in range(draw(st.integers(1, 7))):
            for ids in (teacher, student):
                ids += [-1] * draw(st.integers(0, 1)) + [chunk] * draw(st.integers(1, 3))
            flags.append(draw(st.booleans()))
        teacher += [-1] * draw(st.integers(0, 2))
        teacher_ids.append(teacher), student_ids.append(student), counted.append(flags)
    return teacher_ids, student_ids, counted, draw(st.integers(0, 2**31 - 1))


def _padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [fill] * (width - len(row)) for row in rows])


def _layout_tensors(layout):
    teacher_ids, student_ids, counted, seed = layout
    generator = torch.Generator().manual_seed(seed)
    t_chunks, s_chunks, counted_t = _padded(teacher_ids, -1), _padded(student_ids, -1), _padded(counted, 0).bool()

    def rows(shape, low, high):  # some values above 0, as bf16 rounding gives, which must be clipped
        return torch.rand(shape, generator=generator, dtype=torch.float64) * (low - high) + high

    # Boundary log-probs straddle log(0.1) so merging both triggers and does not.
    return (rows(t_chunks.shape, -6.0, 0.05), rows(t_chunks.shape, -5.0, 0.5), rows(s_chunks.shape, -6.0, 0.05),
            rows(s_chunks.shape, -5.0, 0.5), t_chunks, s_chunks, counted_t)


@PROPERTY
@given(layout=chunk_layouts(), diff_fn=st.sampled_from(DIFF_FNS), flags=st.sampled_from(FLAG_SETS),
       tau=st.sampled_from([1.0, 5.0, 100.0]))
def test_loss_equals_the_plain_reference_of_the_documented_formula(layout, diff_fn, flags, tau):
    """Covers chunk sums, merging on the teacher's boundary, the last valid constituent's boundary,
    append_space on both sides, the clipping, every diff_fn and the mean over counted chunks."""
    options = AlmOptions(tau, diff_fn, flags.merge_by_space_prob, flags.append_space, flags.boundary_threshold)
    tensors = _layout_tensors(layout)
    result = alm_loss(*tensors, options)
    expected, count = _reference_alm(*(t.tolist() for t in tensors), options)
    assert result.num_chunks.item() == count
    assert result.loss.item() == pytest.approx(expected, rel=1e-3, abs=1e-7)


@PROPERTY
@given(layout=chunk_layouts(), diff_fn=st.sampled_from(["binary_ce", "binary_kl", "joschu_k2", "joschu_k3"]),
       flags=st.sampled_from(FLAG_SETS))
def test_equal_chunk_likelihoods_give_zero_gradient_across_different_tokenizations(layout, diff_fn, flags):
    """The student's tokens differ from the teacher's, but each chunk's likelihood and end boundary match."""
    t_rows, t_boundary, _, _, t_chunks, s_chunks, counted = _layout_tensors(layout)
    t_tokens = torch.cat([t_rows.new_zeros(t_rows.shape[0], 1), t_rows[:, :-1]], 1).clamp(max=0)  # token convention
    s_tokens = torch.zeros(s_chunks.shape, dtype=torch.float64)
    s_boundary = torch.full(s_chunks.shape, -3.0, dtype=torch.float64)
    for b in range(t_chunks.shape[0]):
        for chunk in range(int(t_chunks[b].max()) + 1):
            t_members, s_members = (t_chunks[b] == chunk).nonzero()[:, 0], (s_chunks[b] == chunk).nonzero()[:, 0]
            s_tokens[b, s_members] = t_tokens[b, t_members].sum() / len(s_members)
            s_boundary[b, s_members[-1]] = t_boundary[b, t_members[-1]].clamp(max=0)
    s_rows = torch.cat([s_tokens[:, 1:], s_tokens[:, :1] * 0], 1).requires_grad_(True)
    s_boundary.requires_grad_(True)
    options = AlmOptions(diff_fn=diff_fn, merge_by_space_prob=flags.merge_by_space_prob,
                         append_space=flags.append_space)
    loss = alm_loss(t_rows, t_boundary, s_rows, s_boundary, t_chunks, s_chunks, counted, options).loss
    gradients = torch.autograd.grad(loss, [s_rows, s_boundary], allow_unused=True)  # no boundary without flags
    assert all(gradient is None or gradient.abs().max().item() < 1e-6 for gradient in gradients)


# ----------------------------------------------------------------------------------------------------------
# Hand-made rows with identical tokenizers (one chunk per token).

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


def _identity_chunks(length, start=1, batch=2):
    """One chunk per token from `start` on, every chunk counted."""
    ids = torch.full((batch, length), -1)
    ids[:, start:] = torch.arange(length - start)
    return ids, torch.ones(batch, length - start, dtype=torch.bool)


@pytest.mark.parametrize("diff_fn", [fn for fn in DIFF_FNS if fn != "binary_ce"])
def test_identical_models_give_exactly_zero_loss(diff_fn):
    logits, ids = _batch()
    boundary = torch.arange(50) % 3 == 0
    token, on_boundary = _rows(logits, ids, boundary)
    chunks, counted = _identity_chunks(12)
    result = alm_loss(token, on_boundary, token, on_boundary, chunks, chunks, counted, AlmOptions(diff_fn=diff_fn))
    assert result.loss.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("options", [NAIVE, AlmOptions()])
def test_binary_ce_of_identical_models_is_the_mean_binary_entropy_with_zero_gradient(options):
    logits, ids = _batch()
    boundary = torch.arange(50) % 3 == 0
    teacher_token, teacher_boundary = _rows(logits, ids, boundary)
    student_logits = logits.clone().requires_grad_(True)
    student_token, student_boundary = _rows(student_logits, ids, boundary)
    chunks, counted = _identity_chunks(12)
    result = alm_loss(teacher_token, teacher_boundary, student_token, student_boundary, chunks, chunks, counted,
                      options)
    result.loss.backward()
    assert student_logits.grad.abs().max().item() < 1e-6
    if options == NAIVE:
        a = (teacher_token[:, :-1].double() / 100 - EPS).exp()
        entropy = -(a * a.log() + (1 - a) * (1 - a).log())
        assert result.loss.item() == pytest.approx(entropy.mean().item(), rel=1e-5)


def test_identical_tokenizers_without_flags_reduce_to_per_token_binary_cross_entropy():
    logits_t, ids = _batch(seed=1)
    logits_s, _ = _batch(seed=2)
    boundary = torch.zeros(50, dtype=torch.bool)
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks, counted = _identity_chunks(12, start=3)
    result = alm_loss(t, tb, s, sb, chunks, chunks, counted, NAIVE)
    expected = []
    for b in range(2):
        for i in range(3, 12):
            a = math.exp(t[b, i - 1].item() / 100 - 1e-6)
            q = math.exp(s[b, i - 1].item() / 100 - 1e-6)
            expected.append(-(a * math.log(q) + (1 - a) * math.log(1 - q)))
    assert result.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert result.num_chunks.item() == 18


def test_temperature_limits_match_the_documented_values():
    teacher, student = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64)
    tau = 1e4
    # The -1e-6 inside the exponent shifts each log-likelihood by tau * 1e-6 before the limit applies.
    t, u = -3.0 - tau * 1e-6, -5.0 - tau * 1e-6
    shifted_limit = (t - u) + t * math.log(u / t)
    assert (tau * chunk_divergence(teacher, student, "binary_kl", tau)).item() == pytest.approx(shifted_limit, rel=1e-3)
    forward = (chunk_divergence(teacher, student, "binary_ce", tau)
               - chunk_divergence(teacher, teacher, "binary_ce", tau))
    assert (tau * forward).item() == pytest.approx(shifted_limit, rel=1e-3)
    assert chunk_divergence(teacher, student, "binary_kl_temp_limit", tau).item() == pytest.approx(0.4675, rel=1e-3)
    assert (tau * chunk_divergence(teacher, student, "abs_exp", tau)).item() == pytest.approx(2.0, rel=1e-3)
    assert chunk_divergence(teacher, student, "abs", tau).item() == 2.0


@pytest.mark.parametrize("tau", [1.0, 100.0])
@pytest.mark.parametrize("diff_fn", ["binary_ce", "binary_kl", "reverse_binary_kl", "abs_exp"])
def test_binarised_divergences_keep_fp32_precision_for_near_certain_chunks(diff_fn, tau):
    """Numerics (docs/algorithms/alm.md#numerics): at tau = 100 most tempered probabilities are within 1e-4 of 1;
    fp32 must still resolve them.

    The bound is fp32's own: a computation that rounds its inputs (log a = teacher / tau - eps, likewise b) and
    then loses no more than a few ulps per operation is within c * u * (1 + kappa) relative of the exact value,
    u = 2^-24 fp32's unit roundoff and kappa = (|df/dlog a| |log a| + |df/dlog b| |log b|) / |f| the
    divergence's condition number at these inputs (computed here in fp64). kappa reaches 30 on these inputs:
    (-40, -35) at tau = 100 is two nearly equal Bernoullis, whose KL is a small difference of larger terms, so
    no fixed relative tolerance fits every input. c = 8 leaves each of the two or three transcendental
    functions on a path (exp, expm1, log1p, log) the few ulps by which CPUs' vector libraries differ. (The
    binary KLs once subtracted two logs instead, log(1 - a) - log(1 - b): 8 u (1 + kappa) off on one AMD EPYC,
    a relative 3.6e-5 on another, against a fixed 1e-5 that only the CPU the test was written on met.)"""
    teacher = torch.tensor([0.0, -1e-4, -1e-3, -0.01, -0.3, 0.0, -2.0, -40.0])
    student = torch.tensor([-1e-4, 0.0, -2e-3, -0.02, -0.1, -5.0, -1e-5, -35.0], requires_grad=True)
    exact_teacher = teacher.double().requires_grad_(True)
    exact_student = student.detach().double().requires_grad_(True)
    value = chunk_divergence(teacher, student, diff_fn, tau)
    exact = chunk_divergence(exact_teacher, exact_student, diff_fn, tau)
    (gradient,) = torch.autograd.grad(value.sum(), student)
    exact_teacher_gradient, exact_gradient = torch.autograd.grad(exact.sum(), (exact_teacher, exact_student))
    log_a, log_b = exact_teacher.detach() / tau - EPS, exact_student.detach() / tau - EPS
    kappa = (tau * (exact_teacher_gradient.abs() * log_a.abs() + exact_gradient.abs() * log_b.abs())
             / exact.detach().abs())
    relative_error = (value.double() - exact.detach()).abs() / exact.detach().abs()
    assert (relative_error <= 8 * 2.0**-24 * (1 + kappa)).all(), (relative_error, kappa)
    assert torch.allclose(gradient.double(), exact_gradient, rtol=1e-4, atol=0)


def test_schulman_estimators_follow_the_documented_table():
    teacher, student, tau = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64), 4.0
    r = (-3.0 + 5.0) / tau
    assert chunk_divergence(teacher, student, "joschu_k2", tau).item() == pytest.approx(r * r / 2)
    assert chunk_divergence(teacher, student, "joschu_k3", tau).item() == pytest.approx(math.exp(r) - 1 - r)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.5, 3.0, 10.0]))
def test_binarised_kl_is_at_most_the_full_vocabulary_kl(seed, scale):
    """Invariant 14b (data processing, paper App. E): with tau = 1, BinKL(p_T(x) || p_S(x)) <= KL(p_T || p_S)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(8, 30, generator=generator, dtype=torch.float64) * scale).log_softmax(-1)
    student = (torch.randn(8, 30, generator=generator, dtype=torch.float64) * scale).log_softmax(-1)
    observed = torch.randint(0, 30, (8, 1), generator=generator)
    binarised = chunk_divergence(teacher.gather(1, observed)[:, 0], student.gather(1, observed)[:, 0], "binary_kl", 1.0)
    assert (binarised <= divergences.forward_kl(teacher, student) + 1e-5).all()


def test_padding_leaves_the_loss_unchanged():
    logits_t, ids = _batch(seed=3)
    logits_s, _ = _batch(seed=4)
    boundary = torch.arange(50) % 4 == 0
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks, counted = _identity_chunks(12)
    base = alm_loss(t, tb, s, sb, chunks, chunks, counted).loss
    pad = lambda x, value: torch.cat([x, torch.full((2, 5), value, dtype=x.dtype)], 1)  # noqa: E731
    padded = alm_loss(pad(t, -7.0), pad(tb, -2.0), pad(s, -9.0), pad(sb, -1.0), pad(chunks, -1), pad(chunks, -1),
                      pad(counted, False)).loss
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)


def test_merging_with_negative_gamma_is_the_identity_and_above_one_merges_everything():
    logits_t, ids = _batch(seed=5)
    logits_s, _ = _batch(seed=6)
    boundary = torch.arange(50) % 2 == 0
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks, counted = _identity_chunks(12)
    unmerged = alm_loss(t, tb, s, sb, chunks, chunks, counted, AlmOptions(merge_by_space_prob=False))
    identity = alm_loss(t, tb, s, sb, chunks, chunks, counted, AlmOptions(boundary_threshold=-1.0))
    assert identity.loss.item() == pytest.approx(unmerged.loss.item(), rel=1e-6)
    everything = alm_loss(t, tb, s, sb, chunks, chunks, counted, AlmOptions(boundary_threshold=2.0, append_space=False))
    assert everything.num_chunks.item() == 2  # one merged chunk per example
    # The merged log-likelihood is the sum of its constituents (clipped at 0 per chunk, all <= 0 here).
    assert everything.teacher_chunk_logprob.item() == pytest.approx(t[:, :-1].sum().item() / 2, rel=1e-5)


def test_a_merged_chunk_takes_the_boundary_of_its_last_counted_constituent():
    rows = torch.tensor([[0.0, -1.0, -2.0, -3.0, 0.0]])  # tokens 1-4 have log-probs 0, -1, -2, -3
    chunks = torch.tensor([[-1, 0, 1, 2, 3]])
    counted = torch.tensor([[True, True, True, False]])
    boundary = torch.tensor([[-9.0, -9.0, -0.5, -9.0, -7.0]])  # only chunk 1 (token 2) ends a merged chunk
    student_boundary = torch.tensor([[-9.0, -9.0, -4.0, -9.0, -1.0]])
    options = AlmOptions(diff_fn="abs", binarization_temp=1.0)
    result = alm_loss(rows, boundary, rows * 2, student_boundary, chunks, chunks, counted, options)
    # Merged chunk {0, 1}: teacher 0 - 1 - 0.5, student 0 - 2 - 4: |diff| 4.5. Merged chunk {2, 3}: chunk 2 is its
    # only counted member, so it takes chunk 2's boundary, not chunk 3's: teacher -2 - 9, student -4 - 9: 2.
    assert result.num_chunks.item() == 2
    assert result.loss.item() == pytest.approx((4.5 + 2.0) / 2)


def test_append_space_with_certain_boundaries_changes_nothing():
    logits_t, ids = _batch(seed=7)
    logits_s, _ = _batch(seed=8)
    everything = torch.ones(50, dtype=torch.bool)  # every token is a boundary: log P(boundary) = 0
    t, tb = _rows(logits_t, ids, everything)
    s, sb = _rows(logits_s, ids, everything)
    chunks, counted = _identity_chunks(12)
    with_space = alm_loss(t, tb, s, sb, chunks, chunks, counted, AlmOptions(merge_by_space_prob=False))
    without = alm_loss(t, tb, s, sb, chunks, chunks, counted, NAIVE)
    assert with_space.loss.item() == pytest.approx(without.loss.item(), rel=1e-6)


def test_uncounted_chunks_add_nothing_to_the_loss():
    logits_t, ids = _batch(seed=9)
    logits_s, _ = _batch(seed=10)
    boundary = torch.arange(50) % 2 == 0
    t, tb = _rows(logits_t, ids, boundary)
    s, sb = _rows(logits_s, ids, boundary)
    chunks, counted = _identity_chunks(12)
    counted[:, :4] = False  # a "prompt"
    result = alm_loss(t, tb, s, sb, chunks, chunks, counted, NAIVE)
    expected = alm_loss(t, tb, s, sb, torch.where(chunks < 4, -1, chunks - 4), torch.where(chunks < 4, -1, chunks - 4),
                        counted[:, 4:], NAIVE)
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert result.num_chunks.item() == 2 * 7


def test_no_nan_or_inf_at_extreme_log_likelihoods():
    for value in (0.0, -1e-9, -1e4):
        for dtype in (torch.float32, torch.bfloat16):
            for diff_fn in DIFF_FNS:
                t = torch.full((1, 6), value, dtype=dtype)
                s = torch.full((1, 6), -1.0, dtype=dtype, requires_grad=True)
                chunks, counted = _identity_chunks(6, batch=1)
                result = alm_loss(t, t, s, s, chunks, chunks, counted, AlmOptions(diff_fn=diff_fn))
                result.loss.backward()
                assert torch.isfinite(result.loss) and torch.isfinite(s.grad).all(), (value, dtype, diff_fn)


def test_unknown_diff_fn_is_refused():
    with pytest.raises(ValueError, match="unknown ALM diff_fn"):
        chunk_divergence(torch.zeros(1), torch.zeros(1), "kl", 1.0)


def test_sft_is_the_mean_negative_log_likelihood_of_targets():
    rows = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, False, True, True]])  # token 0 never counts; tokens 2, 3 use rows 1, 2
    assert sft_loss(rows, mask).item() == pytest.approx((2.0 + 3.0) / 2)


# ----------------------------------------------------------------------------------------------------------
# The registered adapter, on the tiny real models with their deliberately different tokenizers.

EXAMPLES = [("Tom has 3 apples and buys 12 more. How many?", "He has 3 + 12 = 15 apples.\n#### 15"),
            ("Café costs 4,50 € 😀 — how much for two?", "2 × 4,50 = 9 €\n#### 9")]


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs):
    torch.manual_seed(0)
    return {role: load_model(path).eval() for role, path in tiny_dirs.items()}


def _encode(tokenizer, examples=EXAMPLES):
    return [encode_example(tokenizer, question, answer) for question, answer in examples]


def _side(model, tokenizer, encoded, vocab_permutation=None):
    """Token ids, masks, hidden states and row statistics of one model on a batch of encoded examples."""
    ids, attention = pad_batch([e.input_ids for e in encoded], tokenizer.pad_token_id)
    loss_mask = pad_batch([[int(m) for m in e.loss_mask] for e in encoded])[0].bool()
    boundary = boundary_mask(tokenizer, len(tokenizer))
    if vocab_permutation is not None:  # row r of the permuted vocabulary is old row permutation[r]
        ids = torch.argsort(vocab_permutation)[ids]
        boundary = boundary[vocab_permutation]
    hidden = hidden_states(model, ids, attention)
    head = output_head(model)
    stats = next_token_stats(hidden, ids, head, len(tokenizer), boundary, chunk_size=16)
    return ids, attention, loss_mask, hidden, head, stats, boundary[ids] & attention.bool()


def _views(teacher_model, teacher_tokenizer, student_model, student_tokenizer, examples=EXAMPLES,
           vocab_permutation=None):
    teacher_encoded, student_encoded = _encode(teacher_tokenizer, examples), _encode(student_tokenizer, examples)
    with torch.no_grad():
        t_ids, t_attention, t_mask, _, _, t_stats, t_word = _side(teacher_model, teacher_tokenizer, teacher_encoded)
    s_ids, s_attention, s_mask, s_hidden, s_head, s_stats, s_word = _side(
        student_model, student_tokenizer, student_encoded, vocab_permutation)
    per_example = [example_chunks(t, s) for t, s in zip(teacher_encoded, student_encoded)]
    alignment = Alignment(  # pad_batch pads to the longest example, as _padded does
        teacher_chunks=_padded([t for t, _, _ in per_example], -1),
        student_chunks=_padded([s for _, s, _ in per_example], -1),
        chunk_is_target=_padded([target for _, _, target in per_example], False),
        teacher_word_start=t_word, student_word_start=s_word,
    )
    student = StudentView(student_model, s_hidden, s_head, len(student_tokenizer), s_ids, s_attention, s_mask,
                          s_stats.token_logprobs, s_stats.boundary_logprobs, chunk_size=16)
    teacher = TeacherView(t_ids, t_attention, t_mask, t_stats.token_logprobs, t_stats.boundary_logprobs,
                          len(teacher_tokenizer), TeacherTruncation())
    return student, teacher, alignment


def _adapter(tiny_dirs, **params) -> AlmLoss:
    setup = LossSetup(tiny_dirs["teacher"], tiny_dirs["student"], same_tokenizer=False, cache_dir=tiny_dirs["teacher"])
    return LOSSES["alm"](AlmParams(**params), setup)


def test_alm_is_registered_with_its_params_section_and_stored_teacher_fields():
    assert LOSSES["alm"] is AlmLoss and AlmLoss.section() == "alm" and AlmLoss.params_model is AlmParams
    assert set(AlmLoss.teacher_fields) == {"token_logprobs", "boundary_logprobs"} and AlmLoss.needs_student_boundary
    assert not AlmLoss.same_tokenizer_only and not AlmLoss.needs_online_teacher


@pytest.mark.parametrize("params", [{}, {"merge_by_space_prob": False, "append_space": False},
                                    {"mask_prompt": False, "diff_fn": "binary_kl", "binarization_temp": 5.0}])
def test_adapter_across_tokenizers_equals_the_reference_on_the_views_statistics(tiny_models, tiny_tokenizers,
                                                                               tiny_dirs, params):
    student, teacher, alignment = _views(tiny_models["teacher"], tiny_tokenizers["teacher"], tiny_models["student"],
                                         tiny_tokenizers["student"])
    loss = _adapter(tiny_dirs, **params)
    output = loss(student, teacher, alignment)
    options = loss.options
    counted = alignment.chunk_is_target if loss.params.mask_prompt else torch.ones_like(alignment.chunk_is_target)
    expected, count = _reference_alm(teacher.token_logprobs.tolist(), teacher.boundary_logprobs.tolist(),
                                     student.token_logprobs.tolist(), student.boundary_logprobs.tolist(),
                                     alignment.teacher_chunks.tolist(), alignment.student_chunks.tolist(),
                                     counted.tolist(), options)
    assert output.loss.item() == pytest.approx(expected, rel=1e-4)
    assert output.metrics["chunks"] == count > 0
    gradient, = torch.autograd.grad(output.loss, student.hidden)
    assert gradient.abs().sum() > 0


def test_masking_the_prompt_counts_exactly_the_answer_chunks(tiny_models, tiny_tokenizers, tiny_dirs):
    student, teacher, alignment = _views(tiny_models["teacher"], tiny_tokenizers["teacher"], tiny_models["student"],
                                         tiny_tokenizers["student"])
    flags = {"merge_by_space_prob": False, "append_space": False}
    answer_only = _adapter(tiny_dirs, **flags)(student, teacher, alignment).metrics["chunks"]
    everything = _adapter(tiny_dirs, mask_prompt=False, **flags)(student, teacher, alignment).metrics["chunks"]
    assert answer_only == int(alignment.chunk_is_target.sum())
    assert everything == int((alignment.teacher_chunks.amax(1) + 1).sum()) > answer_only


def test_space_chunks_are_whole_words_and_fewer_than_minimal_chunks(tiny_models, tiny_tokenizers, tiny_dirs):
    student, teacher, alignment = _views(tiny_models["teacher"], tiny_tokenizers["teacher"], tiny_models["student"],
                                         tiny_tokenizers["student"])
    flags = {"merge_by_space_prob": False, "append_space": False}
    minimal = _adapter(tiny_dirs, **flags)(student, teacher, alignment)
    words = _adapter(tiny_dirs, chunks="space", **flags)(student, teacher, alignment)
    teacher_words, student_words, counted = word_chunks(
        alignment.teacher_chunks, alignment.student_chunks, alignment.teacher_word_start,
        alignment.student_word_start, alignment.chunk_is_target)
    expected, count = _reference_alm(teacher.token_logprobs.tolist(), teacher.boundary_logprobs.tolist(),
                                     student.token_logprobs.tolist(), student.boundary_logprobs.tolist(),
                                     teacher_words.tolist(), student_words.tolist(), counted.tolist(), NAIVE)
    assert words.metrics["chunks"] == count < minimal.metrics["chunks"]
    assert words.loss.item() == pytest.approx(expected, rel=1e-4)


def test_adapter_with_one_model_on_both_sides_gives_one_chunk_per_target_token_and_zero_gradient(
        tiny_models, tiny_tokenizers, tiny_dirs):
    model, tokenizer = tiny_models["student"], tiny_tokenizers["student"]
    student, teacher, alignment = _views(model, tokenizer, model, tokenizer)
    assert torch.equal(alignment.teacher_chunks, alignment.student_chunks)
    targets = student.loss_mask.clone()
    targets[:, 0] = False
    assert int(alignment.chunk_is_target.sum()) == int(targets.sum())
    for diff_fn in ("binary_kl", "binary_ce"):
        output = _adapter(tiny_dirs, diff_fn=diff_fn)(student, teacher, alignment)
        if diff_fn == "binary_kl":
            assert output.loss.item() == pytest.approx(0.0, abs=1e-7)
        gradient, = torch.autograd.grad(output.loss, student.hidden, retain_graph=True)
        assert gradient.abs().max().item() < 1e-6


def test_permuting_the_student_vocabulary_with_its_embeddings_leaves_the_loss_unchanged(
        tiny_models, tiny_tokenizers, tiny_dirs):
    """Invariant 14: the loss sees the vocabulary only through observed tokens and boundary mass."""
    tokenizer = tiny_tokenizers["student"]
    permutation = torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(0))
    permuted = copy.deepcopy(tiny_models["student"])
    with torch.no_grad():  # tied embeddings: permuting the input rows permutes the output head too
        embeddings = permuted.get_input_embeddings().weight
        embeddings[: len(tokenizer)] = embeddings[: len(tokenizer)][permutation].clone()
    assert permuted.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()
    loss = _adapter(tiny_dirs)
    base = loss(*_views(tiny_models["teacher"], tiny_tokenizers["teacher"], tiny_models["student"], tokenizer))
    moved = loss(*_views(tiny_models["teacher"], tiny_tokenizers["teacher"], permuted, tokenizer,
                         vocab_permutation=permutation))
    assert moved.loss.item() == pytest.approx(base.loss.item(), rel=1e-5)
    assert moved.metrics == pytest.approx(base.metrics, rel=1e-5)
