"""MinED (docs/algorithms/mined.md): the minimum-edit-distance mapping, its cache, and the loss."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tokenbridge.config import TeacherTruncation
from tokenbridge.losses import mined
from tokenbridge.losses.base import Alignment, LossSetup, StudentView, TeacherView
from tokenbridge.losses.mined import MinedLoss, MinedParams, Vocabulary, chunk_rows, mined_loss, mined_mapping


def levenshtein(a: bytes, b: bytes) -> int:
    """Textbook dynamic programme, independent of rapidfuzz."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def vocabulary(tokens: list[bytes], special: set[int] = frozenset(), roles: dict[str, int] | None = None,
               byte_fallback: set[int] = frozenset()) -> Vocabulary:
    return Vocabulary(tokens, frozenset(special), roles or {}, frozenset(byte_fallback))


# --- mapping -----------------------------------------------------------------------------------------------


def test_mapping_is_the_identity_on_tokens_both_vocabularies_hold():
    teacher = vocabulary([b"a", b"b", b" the", b"ing", b"\xc3\xa9"])
    student = vocabulary([b"ing", b"a", b"\xc3\xa9", b" the", b"b"])
    assert mined_mapping(teacher, student).tolist() == [3, 0, 4, 2, 1]


def test_new_tokens_map_to_a_teacher_token_at_minimal_edit_distance_lowest_id_on_ties():
    generator = random.Random(0)
    alphabet = b"ab \xc3\xa9"  # multi-byte UTF-8 pieces too: the distance counts bytes, not characters
    def token() -> bytes:
        return bytes(generator.choice(alphabet) for _ in range(generator.randint(1, 6)))
    teacher_tokens = list(dict.fromkeys(token() for _ in range(60)))
    student_tokens = list(dict.fromkeys(token() for _ in range(60)))
    mapping = mined_mapping(vocabulary(teacher_tokens), vocabulary(student_tokens)).tolist()

    new = [i for i, t in enumerate(student_tokens) if t not in teacher_tokens]
    assert len(new) > 10
    for index in new:
        distances = [levenshtein(student_tokens[index], teacher) for teacher in teacher_tokens]
        expected = min(range(len(teacher_tokens)), key=lambda t: (distances[t], t))
        assert mapping[index] == expected, student_tokens[index]


def test_a_byte_fallback_piece_loses_to_the_regular_piece_with_the_same_bytes():
    # Gemma holds both `<0x61>` (id 0 here) and `a`: the teacher emits `a`, so `a` carries its probability.
    teacher = vocabulary([b"a", b"b", b"c", b"a"], byte_fallback={0, 1, 2})
    student = vocabulary([b"a", b"aa", b"b"])  # `aa` is one edit from both `a`s: the lower id 0 must not win
    assert mined_mapping(teacher, student).tolist() == [3, 3, 1]


def test_special_tokens_map_by_role_then_only_among_teacher_specials():
    teacher = vocabulary([b"<|im_end|>", b"<|tool|>", b"<|foo", b"hello"], special={0, 1}, roles={"eos": 0})
    student = vocabulary([b"</s>", b"<|foo|>", b"<|foo", b"hallo"], special={0, 1}, roles={"eos": 0})
    mapping = mined_mapping(teacher, student).tolist()
    assert mapping[0] == 0  # eos -> eos, whatever the strings
    assert mapping[1] == 1  # the regular `<|foo` is closer, but a special maps onto a special
    assert mapping[2] == 2  # identity
    assert mapping[3] == 3  # a regular token never maps onto a special


def test_mapping_of_the_tiny_pair_keeps_shared_byte_strings_and_is_cached_per_tokenizer_pair(tiny_dirs, tmp_path,
                                                                                            monkeypatch):
    from tokenbridge.contracts import ModelCard
    from tokenbridge.models import load_tokenizer
    from tokenbridge.token_bytes import vocab_bytes

    setup = LossSetup(tiny_dirs["teacher"], tiny_dirs["student"], False, tmp_path)
    mapping = mined.cached_mapping(setup)
    teacher_bytes = vocab_bytes(load_tokenizer(tiny_dirs["teacher"]))
    student_bytes = vocab_bytes(load_tokenizer(tiny_dirs["student"]))
    assert mapping.shape == (len(student_bytes),)
    assert 0 <= int(mapping.min()) and int(mapping.max()) < len(teacher_bytes)
    shared = [i for i, token in enumerate(student_bytes) if token and token in set(teacher_bytes)]
    assert shared and all(teacher_bytes[mapping[i]] == student_bytes[i] for i in shared)

    shas = ModelCard.of(tiny_dirs["teacher"]).tokenizer_sha256, ModelCard.of(tiny_dirs["student"]).tokenizer_sha256
    assert mined.mapping_path(setup) == tmp_path / "mined" / f"{shas[0][:16]}-{shas[1][:16]}.pt"
    assert mined.mapping_path(setup).exists()

    def recompute(*args):
        raise AssertionError("the cached mapping should have been read back")

    monkeypatch.setattr(mined, "compute_mapping", recompute)
    assert torch.equal(mined.cached_mapping(setup), mapping)


def test_identical_tokenizers_use_the_identity_mapping_without_a_cache_file(tiny_dirs, tiny_tokenizers, tmp_path):
    loss = MinedLoss(MinedParams(), LossSetup(tiny_dirs["student"], tiny_dirs["student"], True, tmp_path))
    assert torch.equal(loss.mapping, torch.arange(len(tiny_tokenizers["student"])))
    assert not (tmp_path / "mined").exists()


# --- chunk positions and loss ------------------------------------------------------------------------------


def test_chunk_rows_read_the_first_student_token_and_only_one_to_one_teacher_rows():
    # Chunks: 0 is 1:1, 1 is 2:1 (teacher 2 tokens), 2 is 1:2 and not a target, 3 holds token 0 (never predicted).
    teacher_chunks = torch.tensor([[3, 0, 1, 1, 2, -1]])
    student_chunks = torch.tensor([[3, -1, 0, 1, 2, 2]])
    student_ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    rows = chunk_rows(teacher_chunks, student_chunks, torch.tensor([[True, True, False, True]]), student_ids)
    assert rows.valid.tolist() == [[True, True, False, False]]
    assert rows.one_to_one.tolist() == [[True, False, False, False]]
    assert rows.student_rows.tolist() == [[1, 2, -1, -1]]
    assert rows.teacher_rows.tolist() == [[0, -1, -1, -1]]
    assert rows.targets.tolist()[0][:2] == [12, 13]


def identity_head(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def student_view(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 1) -> StudentView:
    """A student whose hidden states are its logits (head = identity)."""
    zeros = torch.zeros(input_ids.shape)
    return StudentView(None, logits, identity_head, logits.shape[-1], input_ids, torch.ones_like(input_ids),
                       torch.ones_like(input_ids, dtype=torch.bool), zeros, zeros, chunk_size)


def stored_teacher(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int) -> TeacherView:
    ids = torch.zeros(topk_ids.shape[:2], dtype=torch.long)
    zeros = torch.zeros(ids.shape)
    return TeacherView(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), zeros, zeros, vocab_size,
                       TeacherTruncation(), topk_ids=topk_ids, topk_logprobs=topk_logprobs)


def live_teacher(logits: torch.Tensor) -> TeacherView:
    ids = torch.zeros(logits.shape[:2], dtype=torch.long)
    zeros = torch.zeros(ids.shape)
    return TeacherView(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), zeros, zeros,
                       logits.shape[-1], TeacherTruncation(), hidden=logits, head=identity_head)


def alignment(teacher_chunks: list[list[int]], student_chunks: list[list[int]], num_chunks: int) -> Alignment:
    teacher, student = torch.tensor(teacher_chunks), torch.tensor(student_chunks)
    return Alignment(teacher, student, torch.ones(teacher.shape[0], num_chunks, dtype=torch.bool),
                     torch.zeros_like(teacher, dtype=torch.bool), torch.zeros_like(student, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_identical_tokenizers_and_logits_give_zero_loss_with_finite_gradients(mode):
    torch.manual_seed(0)
    vocab, length = 7, 5
    logits = torch.randn(2, length, vocab)
    if mode == "offline":  # the stored top-k holds the whole vocabulary
        values, ids = logits.log_softmax(-1).topk(vocab, dim=-1)
        teacher = stored_teacher(ids, values, vocab)
    else:
        teacher = live_teacher(logits.clone())
    student_logits = logits.clone().requires_grad_(True)
    input_ids = torch.randint(vocab, (2, length))
    per_token = [[-1, 0, 1, 2, 3], [-1, 0, 1, 2, -1]]  # same tokenizer: one token per chunk on both sides
    result = mined_loss(student_view(student_logits, input_ids, chunk_size=2), teacher,
                        alignment(per_token, per_token, 4), torch.arange(vocab), temperature=2.0)
    assert result.chunks == result.kl_chunks == 7
    assert result.loss.item() == pytest.approx(0.0, abs=1e-6)
    result.loss.backward()
    assert torch.isfinite(student_logits.grad).all()
    assert student_logits.grad.abs().max().item() < 1e-6  # the minimum: no pull in any direction


def test_hand_computed_value_with_a_one_to_one_chunk_and_a_two_to_one_chunk():
    # Student vocabulary of 4, teacher of 4, mu = [0, 1, 1, 3]. Chunk 0 is 1:1 (teacher token 1, student token 1);
    # chunk 1 is 2:1 (teacher tokens 2-3, student token 2, whose id is 0).
    temperature = 2.0
    student_logits = torch.zeros(1, 3, 4)
    student_logits[0, 1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    student_logits.requires_grad_(True)
    # Teacher row 0 stores ids 0-2 with p = 1/2, 1/4, 1/8: id 3 is off the stored support, so mu^-1(3) gets 0.
    topk_ids = torch.tensor([[[0, 1, 2]] * 4])
    topk_logprobs = torch.log(torch.tensor([[[0.5, 0.25, 0.125]] * 4]))
    result = mined_loss(student_view(student_logits, torch.tensor([[3, 1, 0]])),
                        stored_teacher(topk_ids, topk_logprobs, 4), alignment([[-1, 0, 1, 1]], [[-1, 0, 1]], 2),
                        torch.tensor([0, 1, 1, 3]), temperature)

    # 1:1: teacher over the student vocabulary ∝ p_T(mu(v))^(1/T) = [sqrt(1/2), sqrt(1/4), sqrt(1/4), 0]; the
    # student's row 0 is uniform, so KL = sum p log(p / (1/4)).
    mapped = [math.sqrt(0.5), 0.5, 0.5]
    p = [m / sum(mapped) for m in mapped]
    kl = sum(x * math.log(x / 0.25) for x in p)
    # 2:1: cross-entropy of token 0 under softmax([2, 0, 0, 0] / T).
    cross_entropy = -math.log(math.exp(1.0) / (math.exp(1.0) + 3))
    assert result.loss.item() == pytest.approx((kl + cross_entropy) / 2, rel=1e-5)
    assert (result.chunks, result.kl_chunks, result.fallback_chunks) == (2, 1, 0)
    result.loss.backward()
    assert torch.isfinite(student_logits.grad).all()


def test_a_stored_support_missing_every_mapped_token_falls_back_to_cross_entropy_without_nan():
    # Teacher id 3 is the only stored entry, and no student token maps to it.
    student_logits = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]], requires_grad=True)
    teacher = stored_teacher(torch.tensor([[[3], [3]]]), torch.tensor([[[-0.1], [-0.1]]]), 4)
    result = mined_loss(student_view(student_logits, torch.tensor([[0, 1]])), teacher,
                        alignment([[-1, 0]], [[-1, 0]], 1), torch.tensor([0, 1]), temperature=1.0)
    assert (result.kl_chunks, result.fallback_chunks) == (0, 1)
    assert result.loss.item() == pytest.approx(math.log(2.0))  # token 1 under the uniform row 0
    result.loss.backward()
    assert torch.isfinite(student_logits.grad).all()


def test_adapter_runs_forward_and_backward_on_the_tiny_tokenizers_with_a_sparse_teacher(tiny_dirs, tiny_tokenizers,
                                                                                        tmp_path):
    from tokenbridge.alignment import example_chunks
    from tokenbridge.data.chat import encode_example
    from tokenbridge.losses.token_stats import hidden_states, output_head
    from tokenbridge.models import load_model

    examples = [("What is 12 plus 30?", "12 plus 30 is 42."), ("Name a colour.", "Blue, like the sky.")]
    encoded = {role: [encode_example(tiny_tokenizers[role], question, answer) for question, answer in examples]
               for role in ("teacher", "student")}
    chunks = [example_chunks(t, s) for t, s in zip(encoded["teacher"], encoded["student"])]

    def pad(rows: list[list], fill) -> torch.Tensor:
        width = max(len(row) for row in rows)
        return torch.tensor([list(row) + [fill] * (width - len(row)) for row in rows])

    teacher_ids = pad([e.input_ids for e in encoded["teacher"]], 0)
    student_ids = pad([e.input_ids for e in encoded["student"]], 0)
    student_attention = pad([[1] * len(e.input_ids) for e in encoded["student"]], 0)
    teacher_chunks, student_chunks = pad([c[0] for c in chunks], -1), pad([c[1] for c in chunks], -1)
    no_word_starts = (torch.zeros_like(teacher_chunks, dtype=torch.bool),
                      torch.zeros_like(student_chunks, dtype=torch.bool))
    aligned = Alignment(teacher_chunks, student_chunks, pad([c[2] for c in chunks], False), *no_word_starts)

    loss = MinedLoss(MinedParams(), LossSetup(tiny_dirs["teacher"], tiny_dirs["student"], False, tmp_path))
    model = load_model(tiny_dirs["student"])
    zeros = torch.zeros(student_ids.shape)
    student = StudentView(model, hidden_states(model, student_ids, student_attention), output_head(model),
                          len(tiny_tokenizers["student"]), student_ids, student_attention,
                          pad([e.loss_mask for e in encoded["student"]], False), zeros, zeros, 8)
    generator = torch.Generator().manual_seed(0)
    teacher_vocab = len(tiny_tokenizers["teacher"])
    topk_ids = torch.stack([torch.randperm(teacher_vocab, generator=generator)[:8] for _ in range(teacher_ids.numel())])
    topk_logprobs = (torch.randn(teacher_ids.numel(), 8, generator=generator).log_softmax(-1) - 0.5)
    teacher = stored_teacher(topk_ids.view(*teacher_ids.shape, 8), topk_logprobs.view(*teacher_ids.shape, 8),
                             teacher_vocab)

    output = loss(student, teacher, aligned)
    assert output.metrics["chunks"] > 0 and output.metrics["kl_chunks"] + output.metrics["fallback_chunks"] > 0
    assert torch.isfinite(output.loss) and output.loss.item() > 0
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert loss.state_dict() == {}  # the mapping is derived from the tokenizers, not checkpointed
