"""Chat examples on the common byte stream: the question's and the answer's positions come from the template's
structure, so every training target is answer bytes or the end-of-turn token, whatever the text says.
The property tests are derandomized, so CI runs the same examples every time.

Checked over arbitrary questions and answers (empty, one character, text that occurs in the template, special-token
strings, non-ASCII) on every kind of template we support: ChatML with and without a default system prompt, the
plain 'Question:/Answer:' format, Gemma-3's turns, and the real models' own templates."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tokenbridge.config import PrepareParams
from tokenbridge.contracts import MANIFEST, PreparedManifest
from tokenbridge.data.chat import UnalignableExample, encode_continuation, encode_example
from tokenbridge.models.gguf import GEMMA_CHAT_TEMPLATE
from tokenbridge.models.tiny import CHATML_TEMPLATE
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.token_bytes import is_byte_level, special_ids, vocab_bytes

SYSTEM_PROMPT_TEMPLATE = (  # Qwen2.5's shape: a default system prompt when the chat has none
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + CHATML_TEMPLATE)
TRIMMING_TEMPLATE = CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim")
REAL_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m")

# Text that the templates themselves contain, special-token strings, our own sentinels, and non-ASCII.
FRAGMENTS = ["a", "s", "e", "▁", "assistant", "user", "system", "model", "\n", " ", "  ", "You", "helpful", "Question:",
             "Answer:", "<|im_end|>", "<|im_start|>", "<eot>", "<bos>", "<end_of_turn>", "<start_of_turn>",
             "<|endoftext|>", "\ue000question\ue001", "\ue000answer\ue001", "é", "😀", "中文", "\r\n", "\t", "#### 4"]
contents = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=6).map("".join)


def _tokenizer_with(tokenizer, template: str, turn_tokens: tuple[str, str] | None = None):
    """A copy of `tokenizer` with another chat template (and that template's (start, end) turn tokens, the end
    one its eos)."""
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    if turn_tokens:
        changed.add_special_tokens({"eos_token": turn_tokens[1], "additional_special_tokens": [turn_tokens[0]]})
    return changed


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizers, converted) -> dict:
    """name -> (tokenizer, its vocabulary's bytes), one per template kind (the real models' when their packages are
    installed)."""
    chatml, plain = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    found = {"chatml": chatml, "plain": plain, "system_prompt": _tokenizer_with(chatml, SYSTEM_PROMPT_TEMPLATE),
             "gemma_turns": _tokenizer_with(plain, GEMMA_CHAT_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"))}
    for name in REAL_MODELS:
        try:
            found[name] = converted(name)[0]
        except pytest.skip.Exception:
            continue
    return {name: (tokenizer, vocab_bytes(tokenizer)) for name, tokenizer in found.items()}


def assert_exact_targets(tokenizer, table: list[bytes], encoded, question: str, answer: str, ended: bool = True):
    """Every target is answer bytes or the end-of-turn token; every answer byte and every question byte is covered
    once; no content token is a control token."""
    specials = special_ids(tokenizer)
    stream = question.encode("utf-8") + answer.encode("utf-8")
    prompt_bytes, end = len(question.encode("utf-8")), len(stream)
    covered: list[int] = []
    turn_ends = 0
    for token, span, target in zip(encoded.input_ids, encoded.spans, encoded.loss_mask):
        if span == (end, end + 1):
            assert target and table[token] == tokenizer.eos_token.encode("utf-8")
            turn_ends += 1
            continue
        if span is None:
            assert not target, "a template token is a training target"
            continue
        assert token not in specials, f"content became the control token {table[token]!r}"
        assert table[token] == stream[span[0]:span[1]], "a token's bytes are not the content bytes of its span"
        assert target == (span[0] >= prompt_bytes), "question tokens are never targets; answer tokens always are"
        covered.extend(range(*span))
    assert covered == list(range(end)), "some question or answer byte is missing or covered twice"
    assert turn_ends == int(ended)


def _may_refuse(name: str, tokenizer, text: str) -> bool:
    """Whether a model may call this text unalignable: the real ones (their templates and vocabularies are
    theirs), and SentencePiece-style tokenizers on text holding '▁', which they cannot tell from a space."""
    return name in REAL_MODELS or ("▁" in text and not is_byte_level(tokenizer))


def test_every_supported_template_is_covered(tokenizers):
    assert {"chatml", "plain", "system_prompt", "gemma_turns"} <= set(tokenizers)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=contents, answer=contents)
@example(question="What is 2+2?", answer="")  # the end-of-turn target is the assistant's, not the user's
@example(question="Why?", answer="assistant")  # the answer occurs in the template before it
@example(question="Why?", answer="a")  # ... as a single letter inside a role name
@example(question="Why?", answer="\n")
@example(question="You", answer="helpful")  # the question occurs in the default system prompt
@example(question="<|im_end|><|im_start|>assistant\n", answer="<|im_end|><eot><end_of_turn>")
@example(question="", answer="▁")  # SentencePiece's space mark, typed: unalignable there, text elsewhere
def test_targets_are_exactly_the_answer_bytes_and_the_end_of_turn(tokenizers, question, answer):
    for name, (tokenizer, table) in tokenizers.items():
        try:
            encoded = encode_example(tokenizer, question, answer, table)
        except UnalignableExample:
            assert _may_refuse(name, tokenizer, question + answer), f"{name} reads this text byte for byte"
            continue
        assert_exact_targets(tokenizer, table, encoded, question, answer)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=contents, answer=contents, ended=st.booleans())
def test_a_sampled_continuation_is_placed_exactly_too(tokenizers, question, answer, ended):
    for name, (tokenizer, table) in tokenizers.items():
        try:
            encoded = encode_continuation(tokenizer, question, answer, ended, table)
        except UnalignableExample:  # SmolLM2's vocabulary lacks some bytes (0xf1, for one): it cannot read them
            assert _may_refuse(name, tokenizer, question + answer), f"{name} reads this text byte for byte"
            continue
        assert_exact_targets(tokenizer, table, encoded, question, answer, ended)


def test_a_special_token_string_in_user_text_is_text(tokenizers):
    tokenizer, _ = tokenizers["chatml"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encoded = encode_example(tokenizer, "Say <|im_end|> please", "<|im_end|>")
    # One <|im_end|> closes the user turn and one the assistant turn; the typed ones are plain text.
    assert encoded.input_ids.count(im_end) == 2


def test_the_real_templates_give_the_ids_of_the_whole_rendered_chat(tokenizers):
    question, answer = "Janet has 3 apples and buys 4 more. How many?", "She has 3 + 4 = 7.\n#### 7"
    for name in ("chatml", "system_prompt", *REAL_MODELS):
        if name not in tokenizers:
            continue
        tokenizer, table = tokenizers[name]
        text = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert encode_example(tokenizer, question, answer, table).input_ids == whole, name


def test_a_template_that_rewrites_content_makes_the_example_unalignable(tokenizers):
    trimming = _tokenizer_with(tokenizers["chatml"][0], TRIMMING_TEMPLATE)
    table = tokenizers["chatml"][1]
    assert_exact_targets(trimming, table, encode_example(trimming, "Why?", "Because.", table), "Why?", "Because.")
    with pytest.raises(UnalignableExample, match="rewrites this example's question or answer"):
        encode_example(trimming, "Why? ", "Because.", table)


def test_prepare_skips_and_counts_examples_a_model_cannot_read_verbatim(tiny_dirs, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for path in tiny_dirs["teacher"].iterdir():
        (teacher / path.name).write_bytes(path.read_bytes())
    (teacher / "chat_template.jinja").write_text(TRIMMING_TEMPLATE)
    records = [{"question": f"What is {n} + 1?" + (" " if n == 2 else ""), "answer": f"It is {n + 1}.\n#### {n + 1}"}
               for n in range(4)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    params = PrepareParams(source="jsonl", train_jsonl=str(tmp_path / "train.jsonl"),
                           test_jsonl=str(tmp_path / "test.jsonl"), n_train=4, n_test=4, max_length=512)
    run_prepare({"teacher": teacher, "student": tiny_dirs["student"]}, tmp_path / "prepared", params)
    train = PreparedManifest.read(tmp_path / "prepared" / MANIFEST).splits.train
    assert (train.examples, train.dropped_unalignable, train.dropped_too_long) == (3, 1, 0)
    kept = [json.loads(line)["question"] for line in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    assert "What is 2 + 1? " not in kept
