"""How a target tokenizer's tokens relate to a source tokenizer's: the map that FVT and the hypernetwork both start
from (docs/algorithms/tokenizer-transfer.md#fvt-initialisation, docs/algorithms/hypernetwork.md).

Each target token is, in this order of rules:
- `special`: a special token of the same role (pad, unk, eos, bos: later roles win a shared target token);
- `exact`: the same token (same name and bytes), or a non-special token whose bytes a source token has;
- `spelled`: the source tokens that spell its bytes (the source tokenizer's own segmentation when it reproduces
  the bytes, else one source token per byte);
- `missing`: none of these (no bytes, or bytes the source cannot spell).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from tokenbridge.token_bytes import special_ids, vocab_bytes

SPECIAL_ROLES = ("pad_token", "unk_token", "eos_token", "bos_token")  # later roles win a shared target token


@dataclass(frozen=True)
class VocabularyMap:
    """Target token id -> source ids, by rule (see the module docstring)."""

    special: dict[int, int]
    exact: dict[int, int]
    spelled: dict[int, list[int]]
    missing: list[int]
    target_specials: frozenset[int]  # the target's special (added) tokens, whatever rule mapped them

    def counts(self) -> dict[str, int]:
        return {"special": len(self.special), "exact": len(self.exact), "fvt": len(self.spelled),
                "random": len(self.missing)}


def source_bytes_index(source: PreTrainedTokenizerBase, table: list[bytes]) -> dict[bytes, int]:
    """bytes -> the lowest non-special source id with them."""
    specials = special_ids(source)
    by_bytes: dict[bytes, int] = {}
    for index, piece in enumerate(table):
        if index not in specials and piece:
            by_bytes.setdefault(piece, index)
    return by_bytes


def spellings(source: PreTrainedTokenizerBase, table: list[bytes], by_bytes: dict[bytes, int],
              pieces: list[bytes]) -> list[list[int]]:
    """Source token ids spelling each byte string: the source tokenizer's own segmentation when the bytes are
    text it reproduces, else one source token per byte (byte-level and byte-fallback vocabularies have all);
    an empty list when neither works."""
    texts = [piece.decode("utf-8", errors="replace") for piece in pieces]
    encoded = source(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for piece, ids in zip(pieces, encoded):
        if ids and b"".join(table[i] for i in ids) == piece:
            out.append(ids)
        elif all(bytes([byte]) in by_bytes for byte in piece):
            out.append([by_bytes[bytes([byte])] for byte in piece])
        else:
            out.append([])
    return out


def vocabulary_map(source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> VocabularyMap:
    source_table, target_table = vocab_bytes(source), vocab_bytes(target)
    target_specials = special_ids(target)
    by_bytes = source_bytes_index(source, source_table)
    roles: dict[int, int] = {}
    for role in SPECIAL_ROLES:
        target_id, source_id = getattr(target, f"{role}_id", None), getattr(source, f"{role}_id", None)
        if target_id is not None and source_id is not None:
            roles[target_id] = source_id
    source_pieces = source.get_vocab()
    special: dict[int, int] = {}
    exact: dict[int, int] = {}
    missing: list[int] = []
    to_spell: list[int] = []
    for index, (name, piece) in enumerate(zip(target.convert_ids_to_tokens(list(range(len(target)))), target_table)):
        same_piece = source_pieces.get(name)
        if index in roles:
            special[index] = roles[index]
        elif same_piece is not None and same_piece < len(source_table) and source_table[same_piece] == piece:
            exact[index] = same_piece  # the same token (an identical tokenizer maps every id to itself)
        elif index not in target_specials and piece in by_bytes:
            exact[index] = by_bytes[piece]
        elif piece:
            to_spell.append(index)
        else:
            missing.append(index)
    spelled: dict[int, list[int]] = {}
    for index, parts in zip(to_spell, spellings(source, source_table, by_bytes, [target_table[i] for i in to_spell])):
        if parts:
            spelled[index] = parts
        else:
            missing.append(index)
    return VocabularyMap(special, exact, spelled, sorted(missing), frozenset(target_specials))


def fvt_rows(source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase, matrix: torch.Tensor,
             seed: int = 0, mapping: VocabularyMap | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """Rows for the target vocabulary from the source rows `matrix` ([>= len(source), d]): special and exact tokens
    copy their source row, spelled ones take the mean of their spelling's rows, missing ones a draw from the source
    rows' per-dimension mean and std. Returns them and how many tokens each rule initialised."""
    mapping = mapping or vocabulary_map(source, target)
    rows = matrix[: len(source)].float()
    generator = torch.Generator().manual_seed(seed)
    out = rows.mean(0) + rows.std(0) * torch.randn(len(target), rows.shape[1], generator=generator)
    for index, source_id in (mapping.special | mapping.exact).items():
        out[index] = rows[source_id]
    for index, parts in mapping.spelled.items():
        out[index] = rows[parts].mean(0)
    return out.to(matrix.dtype), mapping.counts()
