"""Random-init models of real models' shapes, tokenizers trained here in seconds, and byte-aligned synthetic
examples: what the GPU checks (bench/step.py, bench/logits.py) run on, since real weights cannot travel to a
GPU machine and nothing may be fetched from a model hub.

A shape is the architecture's config written out (hidden size, layers, heads, vocabulary rows); the weights are
random. The tokenizers are small (trained on seeded synthetic text by `tokenbridge/models/tiny.py`); the models'
embedding matrices have the real vocabulary rows, and the benches pass the real tokenizer size as the vocabulary
the losses and statistics span, so every softmax runs over the real width.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from tokenbridge.config import TinyModelSpec
from tokenbridge.data.chat import Encoded, encode_example
from tokenbridge.models import load_tokenizer
from tokenbridge.models.tiny import build_tiny_model, synthetic_text, synthetic_words
from tokenbridge.token_bytes import vocab_bytes


@dataclass(frozen=True)
class Shape:
    model_type: str  # transformers' model_type
    tokenizer_size: int  # the real tokenizer's length (the vocabulary the softmaxes span)
    config: dict = field(default_factory=dict)  # the rest of the config; vocab_size = embedding rows

    @property
    def rows(self) -> int:
        return self.config["vocab_size"]


SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): config.json
    "smollm2-135m": Shape("llama", 49152, dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    # Qwen/Qwen2.5-0.5B(-Instruct): 151,936 embedding rows for a 151,665-token tokenizer
    "qwen2.5-0.5b": Shape("qwen2", 151665, dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # google/gemma-3-270m(-it): 262,144 rows, head_dim 256, one KV head
    "gemma-3-270m": Shape("gemma3_text", 262144, dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # --quick: the same three architectures, tiny, for the CPU run in `make test`
    "tiny-llama": Shape("llama", 2048, dict(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)),
    "tiny-qwen2": Shape("qwen2", 2000, dict(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)),
    "tiny-gemma3": Shape("gemma3_text", 4096, dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, sliding_window=64, query_pre_attn_scalar=32,
        tie_word_embeddings=True)),
}

# The tokenizers' kinds: byte-level BPE with ChatML (SmolLM2, Qwen2.5) and SentencePiece-style (Gemma-3).
STUDENT_TOKENIZER = TinyModelSpec(source="tiny", tokenizer="bytelevel", vocab_size=1500, hidden_size=16, num_layers=1,
                                  chat_format="chatml", seed=1)
TEACHER_TOKENIZER = TinyModelSpec(source="tiny", tokenizer="metaspace", vocab_size=1500, hidden_size=16, num_layers=1,
                                  chat_format="plain", seed=2)


def build_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> torch.nn.Module:
    """A random-init causal LM of the named shape, created on `device` (fast on a GPU)."""
    shape = SHAPES[name]
    config = AutoConfig.for_model(shape.model_type, **shape.config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def tokenizer_dirs(root: Path) -> dict[str, Path]:
    """Train the two small tokenizers (student: byte-level ChatML; teacher: SentencePiece-style) on synthetic
    text; each lands in a tiny model directory, whose weights the benches never use."""
    text = synthetic_text(60_000, seed=7)
    return {role: build_tiny_model(spec, Path(root) / role, text=text)
            for role, spec in (("student", STUDENT_TOKENIZER), ("teacher", TEACHER_TOKENIZER))}


def grow_vocabulary(model_dir: Path, size: int, seed: int = 0) -> PreTrainedTokenizerBase:
    """Extend the byte-level BPE tokenizer saved in `model_dir` to `size` entries with merges of pieces it
    already has (a valid BPE: every merge joins two pieces of the vocabulary), so the tokenizer's length is the
    real model's: the extraction spans exactly that many rows."""
    path = Path(model_dir) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    specials = {token["content"] for token in data["added_tokens"]}
    pieces = [piece for piece in vocab if piece not in specials]
    rng = random.Random(seed)
    while len(vocab) < size:
        left, right = rng.choice(pieces), rng.choice(pieces)
        if left + right not in vocab and len(left + right) <= 16:
            vocab[left + right] = len(vocab)
            merges.append([left, right] if merges and isinstance(merges[0], list) else f"{left} {right}")
            pieces.append(left + right)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tokenizer = load_tokenizer(model_dir)
    if len(tokenizer) != size:
        raise RuntimeError(f"grew the tokenizer in {model_dir} to {len(tokenizer)} entries, not {size}")
    return tokenizer


def synthetic_examples(tokenizers: dict[str, PreTrainedTokenizerBase], count: int, tokens: int,
                       seed: int = 0) -> dict[str, list[Encoded]]:
    """`count` (question, answer) examples of synthetic text, each as long as fits in `tokens` tokens of the
    first tokenizer (template included), encoded by every tokenizer on the common byte stream (byte-aligned
    across tokenizers, as `prepare` encodes real data)."""
    tables = {role: vocab_bytes(tokenizer) for role, tokenizer in tokenizers.items()}
    lead = next(iter(tokenizers))
    examples: dict[str, list[Encoded]] = {role: [] for role in tokenizers}
    for index in range(count):
        question = synthetic_text(16, seed=seed * 100_003 + 2 * index)
        words = synthetic_words(2 * tokens, seed=seed * 100_003 + 2 * index + 1)
        low, high = 1, len(words)  # the longest answer (in words) that fits
        while low < high:
            middle = (low + high + 1) // 2
            fits = len(encode_example(tokenizers[lead], question, "".join(words[:middle]).strip(),
                                      tables[lead]).input_ids) <= tokens
            low, high = (middle, high) if fits else (low, middle - 1)
        answer = "".join(words[:low]).strip()
        for role, tokenizer in tokenizers.items():
            examples[role].append(encode_example(tokenizer, question, answer, tables[role]))
    return examples
