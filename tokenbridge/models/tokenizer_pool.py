"""Tokenizers trained in seconds on the training text, for the hypernetwork to learn from (ZeTT's tokenizer
sampling; docs/algorithms/hypernetwork.md#tokenizer-pool).

- `bpe`: byte-level BPE (GPT-2 style: every byte is a token, so any text encodes);
- `unigram`: SentencePiece-style Unigram (spaces as `▁`), with `<0xNN>` byte pieces as its fallback;
- `learned_tokens`: the base model's own tokenizer without its special tokens, a pool member as large as the
  vocabularies the hypernetwork will meet (the trained ones are small: the training text is);
- `sub_vocabulary`: a random subset of a tokenizer's learned tokens (characters, bytes and the unknown piece
  stay), as ZeTT samples many vocabularies from few tokenizers;
- `with_chat_format`: a backend wrapped as a model's tokenizer, with the base model's special tokens, roles and
  chat template, so the same chat-formatted examples encode in it.
"""

from __future__ import annotations

import json
import random
import re

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenbridge.config import TokenizerKind
from tokenbridge.token_bytes import special_ids

UNKNOWN = "<unk>"
BYTE_PIECES = [f"<0x{value:02X}>" for value in range(256)]
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


def train_backend(kind: TokenizerKind, vocab_size: int, texts: list[str]) -> Tokenizer:
    """A `kind` tokenizer with at most `vocab_size` tokens, trained on `texts` (fewer when the text is too short to
    learn more)."""
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return tokenizer
    draft = Tokenizer(models.Unigram())
    draft.normalizer = normalizers.Replace(" ", "▁")
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    draft.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=max(vocab_size - len(BYTE_PIECES), 64), special_tokens=[UNKNOWN], unk_token=UNKNOWN,
        show_progress=False))
    learned = json.loads(draft.to_str())["model"]["vocab"]
    floor = min(score for _, score in learned) - 1.0
    return _unigram(learned + [[piece, floor] for piece in BYTE_PIECES if piece not in dict(learned)])


def _unigram(vocab: list[list]) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram([(piece, score) for piece, score in vocab],
                                         unk_id=[piece for piece, _ in vocab].index(UNKNOWN), byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _always_kept(piece: str) -> bool:
    """Single characters (byte-level BPE's byte alphabet, SentencePiece's `▁`) and `<0xNN>` byte pieces: without
    them some text would no longer encode, or encode to other bytes."""
    return len(piece) == 1 or BYTE_PIECE.match(piece) is not None


def _restricted(state: dict, kept: set[str]) -> Tokenizer:
    """The serialised tokenizer `state` with only the `kept` pieces of its model, renumbered from 0 in their
    order. A BPE merge whose inputs or result were dropped is dropped too, so the rest still encodes any text."""
    model = state["model"]
    if model["type"] == "BPE":
        pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"]]
        ordered = sorted(kept & model["vocab"].keys(), key=model["vocab"].__getitem__)
        model.update(vocab={piece: index for index, piece in enumerate(ordered)},
                     merges=[pair for pair in pairs if {*pair, "".join(pair)} <= kept])
    elif model["type"] == "Unigram":
        unknown = model["vocab"][model["unk_id"]][0] if model.get("unk_id") is not None else None
        vocab = [entry for entry in model["vocab"] if entry[0] in kept or entry[0] == unknown]
        model.update(vocab=vocab, unk_id=None if unknown is None else [piece for piece, _ in vocab].index(unknown))
    else:
        raise ValueError(f"hypernet: a {model['type']} tokenizer cannot be sub-sampled (BPE and Unigram can)")
    return Tokenizer.from_str(json.dumps(state))


def _pieces(state: dict) -> list[str]:
    vocab = state["model"]["vocab"]
    return list(vocab) if isinstance(vocab, dict) else [piece for piece, _ in vocab]


def sub_vocabulary(backend: Tokenizer, keep: float, rng: random.Random) -> Tokenizer:
    """The tokenizer with a random `keep` share of its learned tokens (single characters, byte pieces and the
    unknown piece always stay: a Unigram tokenizer without `▁` would spell a space as that character's bytes)."""
    state = json.loads(backend.to_str())
    pieces = _pieces(state)
    learned = [piece for piece in pieces if not _always_kept(piece)]
    kept = set(rng.sample(learned, round(keep * len(learned)))) | {piece for piece in pieces if _always_kept(piece)}
    return _restricted(state, kept)


def learned_tokens(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A model tokenizer's backend without its special (added) tokens, nor a post-processor that inserts them:
    the base tokenizer as a pool member, which `with_chat_format` gives its specials back."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    specials = {token["content"] for token in state.get("added_tokens", [])}
    state["added_tokens"] = []
    if (state.get("post_processor") or {}).get("type") == "TemplateProcessing":
        state["post_processor"] = None
    return _restricted(state, set(_pieces(state)) - specials)


def with_chat_format(backend: Tokenizer, base: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast:
    """`backend` as a model tokenizer: the base's special tokens appended, its bos/eos/pad roles and chat template
    (a copy: the backend passed in is not changed)."""
    backend = Tokenizer.from_str(backend.to_str())
    added = base.backend_tokenizer.get_added_tokens_decoder()
    backend.add_special_tokens([added[index].content for index in sorted(special_ids(base))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=base.bos_token, eos_token=base.eos_token, pad_token=base.pad_token,
        unk_token=None, clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = base.chat_template
    return tokenizer
