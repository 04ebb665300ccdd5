"""Tokens as bytes: the common ground between tokenizers (docs/algorithms/design.md#bytes-not-characters).

A byte-level BPE token can hold part of a multi-byte character, so character offsets cannot express its
span. We compute each token's bytes from the vocabulary instead, decided once per tokenizer from its
backend: the GPT-2 byte-to-unicode map for ByteLevel tokenizers; for SentencePiece-style vocabularies a
piece is UTF-8 text with `▁` for a space and `<0xNN>` pieces are single bytes. Special (added) tokens are
their literal text.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# A token "starts a word" when it is special or its first byte is one of these
# (docs/algorithms/alm.md#boundary-probability-and-debiasing).
BOUNDARY_BYTES = frozenset(b" \t\n\r")


@lru_cache(maxsize=1)
def gpt2_unicode_to_byte() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer's backend decodes with the GPT-2 ByteLevel map."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return "ByteLevel" in json.dumps(state.get("decoder")) or "ByteLevel" in json.dumps(state.get("pre_tokenizer"))


def vocab_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The byte string of every token id in the tokenizer (len == len(tokenizer))."""
    byte_level = is_byte_level(tokenizer)
    unicode_to_byte = gpt2_unicode_to_byte()
    # Added tokens are matched as literal text; in SentencePiece vocabularies some are runs of "▁" (spaces).
    added = {token.content for token in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    table: list[bytes] = [b""] * len(tokenizer)
    for piece, index in tokenizer.get_vocab().items():
        if index >= len(table):
            continue
        if piece in added:
            table[index] = (piece if byte_level else piece.replace("▁", " ")).encode("utf-8")
        elif byte_level:
            table[index] = bytes(unicode_to_byte[char] for char in piece)
        elif match := _BYTE_PIECE.match(piece):
            table[index] = bytes([int(match.group(1), 16)])
        else:
            table[index] = piece.replace("▁", " ").encode("utf-8")
    return table


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return {index for index, token in tokenizer.backend_tokenizer.get_added_tokens_decoder().items() if token.special}


def byte_offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str,
                 table: list[bytes] | None = None) -> list[tuple[int, int]]:
    """Byte span `[start, end)` of each token in `text`'s UTF-8 bytes.

    Raises when the tokens' bytes do not reproduce the text: a tokenizer that normalises text (lowercasing,
    NFKC) cannot be aligned by bytes, and silently misaligned chunks would corrupt the loss.
    A prefix space added by the tokenizer (SentencePiece dummy prefix) is absorbed into the first token.
    """
    table = table or vocab_bytes(tokenizer)
    pieces = [table[index] for index in ids]
    joined = b"".join(pieces)
    target = text.encode("utf-8")
    shift = 0
    if joined != target:
        if joined == b" " + target:
            shift = 1
        else:
            raise ValueError(
                "token bytes do not reproduce the text: this tokenizer normalises its input, so byte alignment "
                f"is impossible. First difference near byte {_first_difference(joined, target)}. "
                "Use a tokenizer without a normaliser (or convert it with tokenbridge.models)."
            )
    spans = []
    position = -shift
    for piece in pieces:
        start, position = position, position + len(piece)
        spans.append((max(start, 0), max(position, 0)))
    return spans


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def boundary_mask(tokenizer: PreTrainedTokenizerBase, vocab_rows: int) -> torch.Tensor:
    """Boolean mask over the model's output rows: tokens that start a new word or are special.

    Rows beyond the tokenizer (padded embedding matrices) are False: they are never real tokens.
    """
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    specials = special_ids(tokenizer)
    for index, piece in enumerate(vocab_bytes(tokenizer)[:vocab_rows]):
        mask[index] = index in specials or (len(piece) > 0 and piece[0] in BOUNDARY_BYTES)
    return mask
