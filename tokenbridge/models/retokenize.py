"""A model moved onto another tokenizer without training: new embedding rows (and head rows, when untied) from FVT
or from a trained hypernetwork, saved as a HF directory transformers and lm-eval load
(docs/algorithms/tokenizer-transfer.md, docs/algorithms/hypernetwork.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenbridge.contracts import MODEL_CARD, ContractError, HypernetCard, ModelCard
from tokenbridge.io import atomic_path, sha256_file
from tokenbridge.models import (
    copy_tokenizer_files,
    input_embeddings,
    load_model,
    load_tokenizer,
    output_embeddings,
    save_tokenizer,
)
from tokenbridge.models.hypernet import CARD, base_rows, load_hypernet, predict_rows, token_pieces
from tokenbridge.models.tokenizer_pool import with_chat_format
from tokenbridge.models.vocabulary import fvt_rows, vocabulary_map
from tokenbridge.token_bytes import gpt2_unicode_to_byte

Init = Literal["fvt", "hypernet"]


def byte_tokenizer(source: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast:
    """Every byte is one token (ids 0-255, GPT-2's printable byte alphabet), then the source's special tokens,
    with its bos/eos/pad and chat template (special tokens are kept:
    docs/algorithms/tokenizer-transfer.md#byte-level-targets)."""
    by_byte = {byte: char for char, byte in gpt2_unicode_to_byte().items()}
    backend = Tokenizer(models.BPE(vocab={by_byte[byte]: byte for byte in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return with_chat_format(backend, source)


def is_tied(model: PreTrainedModel) -> bool:
    return output_embeddings(model).data_ptr() == input_embeddings(model).data_ptr()


def hypernet_for(hypernet_dir: Path, source_dir: Path) -> HypernetCard:
    """The card of the hypernetwork in `hypernet_dir`, refused unless it was trained for the model in `source_dir`."""
    card = HypernetCard.read(Path(hypernet_dir) / CARD)
    source = ModelCard.of(source_dir)
    if card.base.tokenizer_sha256 != source.tokenizer_sha256 or card.base.name != source.name:
        raise ContractError(f"{hypernet_dir} was trained for {card.base.name}, not {source.name} ({source_dir}): "
                            "use init: fvt for this model, or train a hypernetwork for it (hypernet.base)")
    return card


def hypernet_rows(hypernet_dir: Path, card: HypernetCard, source: PreTrainedTokenizerBase,
                  target: PreTrainedTokenizerBase, model: PreTrainedModel,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, int]]:
    """(input rows, head rows or None when tied, counts) for `target`: FVT's rows, with every token the
    hypernetwork (in `hypernet_dir`, described by `card`) can spell replaced by its prediction (special tokens
    keep their base rows)."""
    hypernet = load_hypernet(hypernet_dir, card.width, card.layers, card.heads, card.max_pieces).eval()
    mapping = vocabulary_map(source, target)
    tied = is_tied(model)
    rows = base_rows(input_embeddings(model).detach(), None if tied else output_embeddings(model).detach()).float()
    table = fvt_rows(source, target, rows, seed, mapping)[0]
    pieces = token_pieces(mapping, card.max_pieces)
    with torch.no_grad():
        ids, predicted = predict_rows(hypernet, rows, pieces)
    table[ids] = predicted
    specials = set(mapping.special) | mapping.target_specials  # FVT's rows: the base row of their role or name
    counts = {"special": len(specials), "predicted": len(ids),
              "random": len([index for index in mapping.missing if index not in specials])}
    width = input_embeddings(model).shape[1]
    return table[:, :width], None if tied else table[:, width:], counts


def retokenized_model(source_dir: Path, target_dir: Path | None, out_dir: Path, init: Init, seed: int,
                      hypernet_dir: Path | None = None) -> dict[str, int]:
    """Save the source model with `init` rows for the tokenizer in `target_dir` (its files copied verbatim, so
    models moved onto it share them) or, for None, bytes; returns how many tokens each rule initialised."""
    source = load_tokenizer(source_dir)
    tokenizer = byte_tokenizer(source) if target_dir is None else load_tokenizer(target_dir)
    model = load_model(source_dir, torch.float32)
    if init == "hypernet":
        assert hypernet_dir is not None, "init: hypernet needs the hypernetwork's directory"
        inputs, head, counts = hypernet_rows(hypernet_dir, hypernet_for(hypernet_dir, source_dir), source, tokenizer,
                                             model, seed)
    else:
        mapping = vocabulary_map(source, tokenizer)  # once for both matrices: spelling a large vocabulary costs
        inputs, counts = fvt_rows(source, tokenizer, input_embeddings(model).detach(), seed, mapping)
        head = None if is_tied(model) else fvt_rows(source, tokenizer, output_embeddings(model).detach(), seed,
                                                    mapping)[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    input_embeddings(model).data.copy_(inputs)
    if head is not None:
        output_embeddings(model).data.copy_(head)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    card = ModelCard.of(source_dir)
    with atomic_path(out_dir) as temporary:
        model.save_pretrained(temporary)
        if target_dir is None:
            save_tokenizer(tokenizer, temporary)
        else:
            copy_tokenizer_files(target_dir, temporary)
        ModelCard(name=f"{card.name}-{init}", transferred_from=card.name, **{init: counts},
                  tokenizer_sha256=sha256_file(temporary / "tokenizer.json"), tokenizer_size=len(tokenizer),
                  parameters=model.num_parameters(), eos_token=tokenizer.eos_token,
                  byte_level=target_dir is None).write(temporary / MODEL_CARD)
    return counts
