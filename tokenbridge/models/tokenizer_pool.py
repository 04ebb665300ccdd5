"""Tokenizers trained in seconds on the training text, for the hypernetwork to learn from (ZeTT's tokenizer
sampling; docs/algorithms/hypernetwork.md#tokenizer-pool).

- `bpe`: byte-level BPE (GPT-2 style: every byte is a token, so any text encodes);
- `unigram`: SentencePiece-style Unigram (spaces as `▁`), with `<0xNN>` byte pieces as its fallback;
- `sub_vocabulary`: a random subset of a trained tokenizer's learned tokens (bytes and the unknown piece stay), as
  ZeTT samples many vocabularies from few tokenizers;
- `with_chat_format`: a backend wrapped as a model's tokenizer, with the base model's special tokens, roles and
  chat template, so the same chat-formatted examples encode in it.
"""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenbridge.config import TokenizerKind
from tokenbridge.token_bytes import special_ids

UNKNOWN = "<unk>"
BYTE_PIECES = [f"<0x{value:02X}>" for value in range(256)]


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


def sub_vocabulary(backend: Tokenizer, keep: float, rng: random.Random) -> Tokenizer:
    """The tokenizer with a random `keep` share of its learned tokens (bytes, single characters and the unknown
    piece always stay: a Unigram tokenizer without `▁` would spell a space as that character's bytes).
    A BPE merge whose inputs or result were dropped is dropped too, so the rest still encodes any text."""
    state = json.loads(backend.to_str())
    model = state["model"]
    if model["type"] == "BPE":
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        learned = [piece for piece in model["vocab"] if piece not in alphabet]
        kept = set(rng.sample(learned, round(keep * len(learned)))) | (set(model["vocab"]) & alphabet)
        ordered = sorted(kept, key=model["vocab"].__getitem__)
        merges = [pair for pair in model["merges"] if {*pair, "".join(pair)} <= kept]
        model.update(vocab={piece: index for index, piece in enumerate(ordered)}, merges=merges)
        return Tokenizer.from_str(json.dumps(state))
    fixed = {UNKNOWN, *BYTE_PIECES, *(piece for piece, _ in model["vocab"] if len(piece) == 1)}  # "▁" among them
    learned = [entry for entry in model["vocab"] if entry[0] not in fixed]
    kept = {entry[0] for entry in rng.sample(learned, round(keep * len(learned)))} | fixed
    return _unigram([entry for entry in model["vocab"] if entry[0] in kept])


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
