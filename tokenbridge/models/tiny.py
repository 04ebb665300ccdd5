"""Tiny random-init models with tokenizers trained locally in seconds: the test profile's teacher and student.

The two tokenizers differ on purpose (byte-level BPE vs SentencePiece-style BPE with byte fallback, different
vocabulary sizes, different chat formats and BOS policies), so every cross-tokenizer path is exercised.
The byte-level model gets an embedding matrix padded past its tokenizer, like Qwen2.5.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenbridge.config import TinyModelSpec

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Answer:\n{{ message['content'] }}<eot>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:\n{% endif %}"
)
_FORMATS = {
    # chat format -> (special tokens, eos, bos, pad, template)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, "<|endoftext|>", CHATML_TEMPLATE),
    "plain": (["<pad>", "<bos>", "<eot>"], "<eot>", "<bos>", "<pad>", PLAIN_TEMPLATE),
}


def corpus_text(n_items: int = 1500, seed: int = 0) -> str:
    """Local English + maths text for training tiny tokenizers (nothing is downloaded)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n_items, seed=seed)
    parts = [f"{item['question']}\n{item['metadata']['answer_cot']}" for item in dataset]
    story = Path(reasoning_gym.__file__).parent / "data" / "in_the_year_2889.txt"
    parts.append(story.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """A BPE merge as tokenizers serialises it: "a b" (older files) or ["a", "b"]."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def _train_tokenizer(spec: TinyModelSpec, specials: list[str], text: str) -> Tokenizer:
    if spec.tokenizer == "bytelevel":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator([text], trainer)
        return tokenizer
    # SentencePiece-style: spaces become "▁", unknown characters fall back to <0xNN> byte pieces.
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]
    draft = Tokenizer(models.BPE())
    draft.normalizer = normalizers.Replace(" ", "▁")
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    # The 100 most frequent characters, ties broken by the character: the trainer's own limit breaks ties in hash
    # order, which differs between processes, so the same spec would give different ids from run to run.
    counts = Counter(text.replace(" ", "▁"))
    alphabet = sorted(counts, key=lambda char: (-counts[char], char))[:100]
    trainer = trainers.BpeTrainer(
        vocab_size=max(spec.vocab_size - len(byte_pieces), 64), special_tokens=specials, show_progress=False,
        initial_alphabet=alphabet, limit_alphabet=len(alphabet),
    )
    draft.train_from_iterator([text], trainer)
    merged = {piece: index for index, piece in enumerate(specials + byte_pieces)}
    for piece, _ in sorted(draft.get_vocab().items(), key=lambda item: item[1]):
        merged.setdefault(piece, len(merged))
    merges = [_merge_pair(merge) for merge in json.loads(draft.to_str())["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=merged, merges=merges, byte_fallback=True, fuse_unk=False))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(specials)
    return tokenizer


def synthetic_words(count: int, seed: int = 0) -> list[str]:
    """Seeded English-like words, each with its trailing space, punctuation or line break: text for tokenizers
    and examples where reasoning-gym's corpus is not installed (the GPU checks). The first `count` words do not
    depend on how many are asked for, so a prefix of them is a shorter text of the same stream."""
    rng = random.Random(seed)
    syllables = ("an", "be", "ca", "de", "en", "for", "ge", "his", "in", "ka", "lo", "men", "no", "or", "pa", "qu",
                 "re", "st", "th", "to", "un", "ve", "wa", "you")
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(600)]
    zipf = [1 / rank for rank in range(1, len(lexicon) + 1)]
    words = []
    for _ in range(count):
        word = str(rng.randint(0, 9999)) if rng.random() < 0.06 else rng.choices(lexicon, zipf)[0]
        mark = rng.random()
        words.append(word + (".\n" if mark < 0.03 else ". " if mark < 0.08 else ", " if mark < 0.14 else " "))
    return words


def synthetic_text(count: int, seed: int = 0) -> str:
    return "".join(synthetic_words(count, seed)).strip()


def build_tiny_model(spec: TinyModelSpec, out_dir: Path, text: str | None = None) -> Path:
    """Train the tokenizer (on `text`, else reasoning-gym's local corpus), build a random-init Llama, save both
    as a HF directory."""
    specials, eos, bos, pad, template = _FORMATS[spec.chat_format]
    backend = _train_tokenizer(spec, specials, corpus_text() if text is None else text)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, bos_token=bos, pad_token=pad, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = template
    rows = len(tokenizer)
    if spec.tokenizer == "bytelevel":
        rows = -(-rows // 64) * 64 + 64  # padded past the tokenizer, like Qwen2.5's 151,936 rows
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=rows, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_teacher_like(student_dir: Path, out_dir: Path, hidden_size: int, seed: int) -> Path:
    """A random-init teacher with the student's architecture at `hidden_size` and the student's very tokenizer
    files: a same-tokenizer pair (retraining a tokenizer would not reproduce it: BPE training is not
    deterministic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(student_dir)
    config.hidden_size, config.intermediate_size = hidden_size, 2 * hidden_size
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(out_dir)
    return out_dir
