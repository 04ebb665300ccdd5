"""MinED: distillation through a minimum-edit-distance token mapping (docs/algorithms/mined.md; Wan et al. 2024,
as tokenkit's cross-tokenizer baseline).

Mapping `mu: V_S -> V_T`. A student token whose bytes are a teacher token maps to it. An unmatched special token
takes the teacher's special of the same role (eos, then bos, pad, unk). Any other student token maps to the
teacher token at the smallest Levenshtein distance over bytes (ties: the lowest teacher id), specials searching
only the teacher's specials and other tokens only the teacher's others, so template markers never map onto
text. Computed once per tokenizer pair and cached.

Loss, on ALM's minimal byte-exact chunks that are training targets. At a 1:1 chunk (teacher token i, student
token j): KL( softmax(z_T[i-1, mu(.)] / T) || softmax(z_S[j-1] / T) ), a distribution over the student vocabulary
built by reading the teacher's logits through mu (student tokens sharing a teacher token share its logit). At
every other chunk: the cross-entropy of the chunk's first student token j0 under softmax(z_S[j0-1] / T), which is
tokenkit's KL against a one-hot target at the same temperature (tokenkit scores every student token of such a
chunk; we count chunks). The sum is divided by the number of chunks scored, #1:1 + #other, in this batch;
tokenkit's global 1:1 mask has an operator-precedence bug that is not copied here
(docs/algorithms/mined.md#where-we-differ).

The teacher's log-probs are those every distribution-matching loss sees (`distill.teacher` truncation and
temperature); MinED's T applies on top. Offline, the teacher is only known on its stored top-k: student tokens
whose mu falls outside it get probability 0. When the support holds no mu(v) at all, the teacher says nothing
about the student's vocabulary there, and that 1:1 chunk falls back to the cross-entropy term.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from tokenbridge.config import Strict
from tokenbridge.contracts import ModelCard
from tokenbridge.io import atomic_path
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
from tokenbridge.losses.divergences import forward_kl
from tokenbridge.losses.positions import gather_rows, map_positions
from tokenbridge.losses.teacher_distribution import select_teacher_rows, teacher_log_probs
from tokenbridge.models import load_tokenizer
from tokenbridge.token_bytes import is_byte_level, special_ids, vocab_bytes

ROLES = ("eos", "bos", "pad", "unk")  # in priority order: a token with several roles takes the first
_BYTE_FALLBACK_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_QUERY_BATCH = 512  # queries per distance matrix: 512 x (largest length bucket) int32 stays under ~100 MB


class MinedParams(Strict):
    """MinED (docs/algorithms/mined.md): KL through a minimum-edit-distance token mapping at 1:1 chunks, CE
    elsewhere."""

    temperature: float = Field(2.0, gt=0, description="kd temperature T of both terms, as in tokenkit: the KL "
                               "between softmax(z / T) at 1:1 chunks and the CE (one-hot KL) at the others")


# --- the mapping --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """What the mapping needs to know about one tokenizer."""

    tokens: list[bytes]  # byte string of every id
    special: frozenset[int]  # added special tokens
    roles: dict[str, int]  # "eos" / "bos" / "pad" / "unk" -> id, where the tokenizer has one
    byte_fallback: frozenset[int] = frozenset()  # SentencePiece `<0xNN>` pieces

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
        roles = {role: getattr(tokenizer, f"{role}_token_id") for role in ROLES}
        fallback = frozenset() if is_byte_level(tokenizer) else frozenset(
            index for piece, index in tokenizer.get_vocab().items() if _BYTE_FALLBACK_PIECE.fullmatch(piece))
        return cls(vocab_bytes(tokenizer), frozenset(special_ids(tokenizer)),
                   {role: index for role, index in roles.items() if index is not None}, fallback)


def _emitted_ids(teacher: Vocabulary) -> dict[bytes, int]:
    """One teacher id per distinct non-empty byte string: the one the teacher emits for those bytes.

    A byte-fallback piece is only emitted when no regular piece covers the byte (Gemma holds both `a` and
    `<0x61>`), so a regular piece wins; among equals, the lowest id.
    """
    emitted: dict[bytes, int] = {}
    order = [i for i in range(len(teacher.tokens)) if i not in teacher.byte_fallback] + sorted(teacher.byte_fallback)
    for index in order:
        if teacher.tokens[index]:
            emitted.setdefault(teacher.tokens[index], index)
    return emitted


def nearest_tokens(queries: Sequence[bytes], candidates: Mapping[int, bytes]) -> list[int]:
    """For each query, the candidate id at the smallest Levenshtein distance over bytes; ties: the lowest id.

    Exact, with pruning: the length difference bounds the distance from below, so candidates are scanned in
    buckets of growing length difference k, and a query stops once its best distance is below k. Strings are
    latin-1 decoded so that one character is one byte; `rapidfuzz.process.cdist` does the distances (SIMD,
    all cores).
    """
    if not candidates:
        raise ValueError("MinED mapping: no teacher token to map onto")
    by_length: dict[int, tuple[list[int], list[str]]] = {}
    for index in sorted(candidates):
        bucket_ids, bucket_texts = by_length.setdefault(len(candidates[index]), ([], []))
        bucket_ids.append(index)
        bucket_texts.append(candidates[index].decode("latin-1"))
    buckets = {length: (np.array(ids), bucket) for length, (ids, bucket) in by_length.items()}
    texts = [query.decode("latin-1") for query in queries]
    lengths = np.array([len(text) for text in texts], dtype=np.int64)
    result = np.empty(len(texts), dtype=np.int64)
    with tqdm(total=len(texts), desc="MinED mapping (edit distance)", unit="token") as bar:
        for length in np.unique(lengths).tolist():
            same_length = np.flatnonzero(lengths == length)
            for start in range(0, same_length.size, _QUERY_BATCH):
                members = same_length[start : start + _QUERY_BATCH]
                result[members] = _nearest_same_length([texts[i] for i in members], length, buckets)
                bar.update(members.size)
    return result.tolist()


def _nearest_same_length(texts: list[str], length: int, buckets: dict[int, tuple[np.ndarray, list[str]]]) -> np.ndarray:
    best = np.full(len(texts), np.iinfo(np.int64).max)
    best_id = np.full(len(texts), -1)
    difference = 0
    # A candidate `difference` bytes longer or shorter is at distance >= difference: it can still win (or tie
    # with a lower id) only for queries whose best distance so far is >= difference.
    while (active := np.flatnonzero(best >= difference)).size:
        for bucket in sorted({length - difference, length + difference} & buckets.keys()):
            ids, candidates = buckets[bucket]
            distances = process.cdist([texts[i] for i in active], candidates, scorer=Levenshtein.distance,
                                      dtype=np.int32, workers=-1)
            column = distances.argmin(1)  # first minimum: the lowest id in the bucket
            distance, found = distances[np.arange(active.size), column], ids[column]
            better = (distance < best[active]) | ((distance == best[active]) & (found < best_id[active]))
            best[active[better]], best_id[active[better]] = distance[better], found[better]
        difference += 1
    return best_id


def mined_mapping(teacher: Vocabulary, student: Vocabulary) -> torch.Tensor:
    """mu as a [V_S] tensor of teacher ids: byte-identical token, else the special of the same role, else the
    nearest teacher token by edit distance (specials among the teacher's specials, others among its others)."""
    emitted = _emitted_ids(teacher)
    mapping = [emitted.get(token, -1) for token in student.tokens]
    for role in ROLES:
        index = student.roles.get(role)
        if index is not None and mapping[index] < 0 and role in teacher.roles:
            mapping[index] = teacher.roles[role]
    teacher_special = {i: token for token, i in emitted.items() if i in teacher.special}
    teacher_regular = {i: token for token, i in emitted.items() if i not in teacher.special}
    unmapped = [i for i, target in enumerate(mapping) if target < 0]
    for is_special, pool in ((False, teacher_regular), (True, teacher_special or teacher_regular)):
        queries = [i for i in unmapped if (i in student.special) == is_special]
        if queries:
            for index, target in zip(queries, nearest_tokens([student.tokens[i] for i in queries], pool), strict=True):
                mapping[index] = target
    return torch.tensor(mapping, dtype=torch.long)


def compute_mapping(teacher_dir: Path, student_dir: Path) -> torch.Tensor:
    return mined_mapping(Vocabulary.of(load_tokenizer(teacher_dir)), Vocabulary.of(load_tokenizer(student_dir)))


def mapping_path(setup: LossSetup) -> Path:
    teacher_sha = ModelCard.of(setup.teacher_dir).tokenizer_sha256
    student_sha = ModelCard.of(setup.student_dir).tokenizer_sha256
    return Path(setup.cache_dir) / "mined" / f"{teacher_sha[:16]}-{student_sha[:16]}.pt"


def cached_mapping(setup: LossSetup) -> torch.Tensor:
    """The pair's mapping, computed once per pair of tokenizers (keyed by their sha256) and then read back."""
    path = mapping_path(setup)
    if path.exists():
        return torch.load(path, weights_only=True)
    mapping = compute_mapping(setup.teacher_dir, setup.student_dir)
    with atomic_path(path) as temporary:
        torch.save(mapping, temporary)
    return mapping


# --- the loss -----------------------------------------------------------------------------------------------


@dataclass
class ChunkRows:
    """Where MinED reads both models, one entry per chunk slot [B, C]."""

    student_rows: torch.Tensor  # row predicting the chunk's first student token (j0 - 1); -1 if not valid
    teacher_rows: torch.Tensor  # row predicting the teacher token of a 1:1 chunk (i - 1); -1 elsewhere
    targets: torch.Tensor  # the chunk's first student token id
    one_to_one: torch.Tensor  # exactly one token on each side
    valid: torch.Tensor  # a training-target chunk with tokens on both sides, neither starting at token 0


def _count_and_first(chunks: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per chunk id and the index of each chunk's first token, [B, C]; ids of -1 go to a dropped slot."""
    slots = torch.where(chunks < 0, num_chunks, chunks)
    batch, length = chunks.shape
    count = torch.zeros(batch, num_chunks + 1, dtype=torch.long, device=chunks.device)
    count = count.scatter_add(1, slots, torch.ones_like(slots))
    positions = torch.arange(length, device=chunks.device).expand_as(chunks)
    first = torch.full((batch, num_chunks + 1), length, dtype=torch.long, device=chunks.device)
    first = first.scatter_reduce(1, slots, positions, reduce="amin", include_self=True)
    return count[:, :num_chunks], first[:, :num_chunks]


def chunk_rows(teacher_chunks: torch.Tensor, student_chunks: torch.Tensor, chunk_is_target: torch.Tensor,
               student_ids: torch.Tensor) -> ChunkRows:
    """From per-token chunk ids ([B, L_T], [B, L_S], -1: none) and the target flag per chunk ([B, C])."""
    num_chunks = chunk_is_target.shape[1]
    teacher_count, teacher_first = _count_and_first(teacher_chunks, num_chunks)
    student_count, student_first = _count_and_first(student_chunks, num_chunks)
    valid = (chunk_is_target.bool() & (teacher_count > 0) & (student_count > 0)
             & (teacher_first > 0) & (student_first > 0))
    one_to_one = valid & (teacher_count == 1) & (student_count == 1)
    targets = student_ids.gather(1, student_first.clamp(max=student_ids.shape[1] - 1))
    return ChunkRows(torch.where(valid, student_first - 1, -1), torch.where(one_to_one, teacher_first - 1, -1),
                     torch.where(valid, targets, 0), one_to_one, valid)


def mined_terms(student_logits: torch.Tensor, mapped_teacher: torch.Tensor, targets: torch.Tensor,
                one_to_one: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk MinED values [...] and whether each one is the KL term.

    `student_logits` [..., V_S]; `mapped_teacher` [..., V_S]: the teacher's log-probs read through mu (-inf
    off its known support); `targets` [...]: the first student token of the chunk. KL where the chunk is 1:1
    and the teacher gives some student token mass; otherwise the tempered cross-entropy of the target.
    """
    student = (student_logits.float() / temperature).log_softmax(-1)
    use_kl = one_to_one & (mapped_teacher > float("-inf")).any(-1)
    # Rows without a usable teacher get a uniform stand-in, so no NaN reaches the discarded branch.
    teacher = torch.where(use_kl.unsqueeze(-1), mapped_teacher.float() / temperature, 0.0).log_softmax(-1)
    cross_entropy = -student.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(use_kl, forward_kl(teacher, student), cross_entropy), use_kl


def _slice_terms(hidden: torch.Tensor, targets: torch.Tensor, one_to_one: torch.Tensor,
                 topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, teacher_hidden: torch.Tensor | None,
                 student: StudentView, teacher: TeacherView, mapping: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = student.head(hidden)[..., : student.vocab_size]
    mapped = teacher_log_probs(topk_ids, topk_logprobs, teacher_hidden, teacher)[..., mapping]
    return mined_terms(logits, mapped, targets, one_to_one, temperature)


@dataclass
class MinedResult:
    loss: torch.Tensor
    chunks: int  # valid chunks: the denominator
    kl_chunks: int  # 1:1 chunks scored by the KL term
    fallback_chunks: int  # 1:1 chunks whose teacher support held no mu(v): scored by cross-entropy


def mined_loss(student: StudentView, teacher: TeacherView, alignment: Alignment, mapping: torch.Tensor,
               temperature: float) -> MinedResult:
    """MinED over the batch's target chunks; `mapping` [V_S] holds mu (teacher id per student id)."""
    rows = chunk_rows(alignment.teacher_chunks, alignment.student_chunks, alignment.chunk_is_target,
                      student.input_ids)
    teacher_rows = select_teacher_rows(teacher, rows.teacher_rows)
    values, used_kl = map_positions(
        _slice_terms, [gather_rows(student.hidden, rows.student_rows), rows.targets, rows.one_to_one,
                       *teacher_rows.tensors()],
        student.chunk_size, student, teacher, mapping, temperature)
    kl_chunks = int((used_kl & rows.valid).sum())
    return MinedResult(masked_mean(values, rows.valid), int(rows.valid.sum()), kl_chunks,
                       int(rows.one_to_one.sum()) - kl_chunks)


@register
class MinedLoss(DistillLoss):
    """MinED across tokenizers (or within one, where mu is the identity and every chunk is 1:1)."""

    name = "mined"
    params_model = MinedParams
    needs_online_teacher = False
    same_tokenizer_only = False
    teacher_fields = ("topk_ids", "topk_logprobs")
    needs_student_boundary = False
    params: MinedParams
    mapping: torch.Tensor  # student token -> teacher token (a buffer)

    def __init__(self, params: MinedParams, setup: LossSetup):
        super().__init__(params, setup)
        mapping = (torch.arange(ModelCard.of(setup.student_dir).tokenizer_size) if setup.same_tokenizer
                   else cached_mapping(setup))
        self.register_buffer("mapping", mapping, persistent=False)  # derived from the tokenizers: not checkpointed

    def forward(self, student: StudentView, teacher: TeacherView, alignment: Alignment) -> LossOutput:
        if self.mapping.numel() != student.vocab_size:
            raise ValueError(f"MinED mapping covers {self.mapping.numel()} student tokens but the student's "
                             f"tokenizer has {student.vocab_size}")
        result = mined_loss(student, teacher, alignment, self.mapping.to(student.hidden.device),
                            self.params.temperature)
        return LossOutput((Mean(result.loss, result.chunks),), {
            "chunks": float(result.chunks), "kl_chunks": float(result.kl_chunks),
            "fallback_chunks": float(result.fallback_chunks)})
