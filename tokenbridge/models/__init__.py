"""Model sources (local HF dir, GGUF shipped in a PyPI package, tiny random) and loading.

`materialize` turns a model spec from params.yaml into a HF directory at a fixed path: the `models` stage's
output, which every later stage reads.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenbridge.config import GgufModelSpec, HfModelSpec, ModelSpec
from tokenbridge.contracts import MODEL_CARD, ModelCard
from tokenbridge.io import atomic_path, read_json, remembered_sha256, sha256_file, write_json

if TYPE_CHECKING:  # transformers' modeling code costs about 2 s to import: processes that load no model skip it
    from transformers import PreTrainedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """The tokenizer's files verbatim, so models moved onto one tokenizer share its exact files."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(target) / name)


def link_tree(source: Path, target: Path) -> None:
    """Copy a model directory using hard links where possible (no extra disk for multi-GB weights)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def parameter_count(model_dir: Path) -> int:
    """Number of stored weights, read from the safetensors headers (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def model_identity(model_dir: Path) -> dict:
    """What identifies a model for a checkpoint: its card and the sha256 of each weight file (remembered per file
    version in the model cache), so weights changed in place make another model."""
    from tokenbridge.models.gguf import VERIFIED, default_cache_dir

    weights = sorted(Path(model_dir).glob("*.safetensors"))
    return {**ModelCard.of(model_dir).model_dump(mode="json", exclude_none=True),
            "weights_sha256": {path.name: remembered_sha256(path, default_cache_dir() / VERIFIED) for path in weights}}


def materialize(spec: ModelSpec, out_dir: Path, cache_dir: Path) -> ModelCard:
    """Write the model named by `spec` as a HF directory at `out_dir`; returns its model card."""
    with atomic_path(out_dir) as temporary:
        if isinstance(spec, GgufModelSpec):
            from tokenbridge.models.gguf import convert_gguf

            link_tree(convert_gguf(spec.name, cache_dir), temporary)
            name: str = spec.name
        elif isinstance(spec, HfModelSpec):
            source = Path(spec.path).expanduser()
            if not (source / "config.json").exists():
                raise FileNotFoundError(f"models: {source} is not a HF model directory (no config.json); "
                                        "fix its path in params.yaml")
            if not any(source.glob("*.safetensors")) and not any(source.glob("pytorch_model*.bin")):
                raise FileNotFoundError(f"models: {source} holds no weights (*.safetensors or pytorch_model*.bin): "
                                        "save the model there with save_pretrained, or fix its path in params.yaml")
            link_tree(source, temporary)
            name = source.name
        else:
            from tokenbridge.models.tiny import build_tiny_model

            build_tiny_model(spec, temporary)
            name = f"tiny-{spec.tokenizer}-{spec.vocab_size}"
        tokenizer = load_tokenizer(temporary)
        card = ModelCard(name=name, spec=spec.model_dump(), tokenizer_sha256=sha256_file(temporary / "tokenizer.json"),
                         tokenizer_size=len(tokenizer), parameters=parameter_count(temporary),
                         eos_token=tokenizer.eos_token)
        card.write(temporary / MODEL_CARD)
    return card


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as its tokenizer.json defines it. AutoTokenizer in transformers 5 picks the class from
    config.json's model type for some types (qwen2) and rebuilds the pre-tokenizer, so a model moved onto another
    tokenizer (Qwen2.5 onto SmolLM2's) would split text unlike that tokenizer: "\n\n" as one token, not two."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path, add_bos: bool = False) -> None:
    """Save with a config that transformers 5 reloads unchanged.

    Without the explicit class, transformers 5 rebuilds SmolLM2's tokenizer as a Metaspace Llama tokenizer
    and drops every space.
    """
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = read_json(config_path)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"],
                  clean_up_tokenization_spaces=False, add_bos_token=add_bos, add_eos_token=False)
    write_json(config_path, config)


def load_model(model_dir: Path, dtype: str | torch.dtype = torch.float32) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def input_embeddings(model: PreTrainedModel) -> torch.Tensor:
    """The input embedding matrix [rows, hidden] (a parameter: writes reach the model)."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def output_embeddings(model: PreTrainedModel) -> torch.Tensor:
    """The output head's matrix [rows, hidden]; the input matrix itself when the two are tied."""
    head = model.get_output_embeddings()
    assert head is not None and isinstance(head.weight, torch.Tensor), f"{type(model).__name__} has no output head"
    return head.weight

