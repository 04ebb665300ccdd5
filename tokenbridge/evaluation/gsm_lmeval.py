"""GSM-style maths with lm-eval's real harness, offline, on a local model directory.

The task is generated at run time from lm-eval's stock `gsm8k` config (same filters, metric and stop
strings), pointed at local JSONL files by absolute path (lm-eval resolves `data_files` against the CWD),
with the question alone as the prompt: each model sees it as the user turn of its own chat template,
exactly as in training. The hf backend adds the tokenizer's eos to the stop strings, so generation ends at
the model's own end of turn.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tokenbridge.data.gsm import final_answer
from tokenbridge.evaluation.harness import Task, run_harness
from tokenbridge.io import write_jsonl, write_text

TASK_NAME = "tokenbridge_gsm"


def _stock_gsm8k_config() -> dict:
    """The installed lm-eval's own gsm8k task config: read, not copied, so its filters and metric stay stock."""
    import lm_eval

    return yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())


def write_gsm_task(task_dir: Path, test_jsonl: Path, fewshot_jsonl: Path) -> str:
    """Write `task_dir/<TASK_NAME>.yaml` (the stock config on local files, the question as the whole prompt);
    returns the task name. The stock `tag` is dropped: the task must not join `math_word_problems`."""
    config = _stock_gsm8k_config()
    config.pop("tag", None)
    config.update(
        task=TASK_NAME,
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"train": str(Path(fewshot_jsonl).resolve()),
                                       "test": str(Path(test_jsonl).resolve())}},
        doc_to_text="{{question}}",
    )
    write_text(Path(task_dir) / f"{TASK_NAME}.yaml", yaml.safe_dump(config, sort_keys=False))
    return TASK_NAME


def evaluate_gsm(model_dir: Path, task_dir: Path, limit: int, num_fewshot: int, max_gen_toks: int, batch_size: int,
                 dtype: str, device: str, samples_path: Path | None = None) -> dict[str, float | int]:
    """Greedy generation on the first `limit` test questions of the task in `task_dir` (`write_gsm_task`), in the
    model's chat format (few-shot examples as earlier turns), the model loaded in `dtype` on `device` (torch's
    names: "bfloat16", "cuda:0"); `gsm_scores` of the result.

    The hf backend generates `batch_size` questions at once, longest prompt first: left-padded, with the
    attention mask and the KV cache (`HFLM.tok_batch_encode`, `_model_generate(use_cache=True)`), so greedy
    answers match one question at a time; a batch runs until its last row stops."""
    results = run_harness(model_dir, Task("gsm", TASK_NAME, Path(task_dir)), limit, num_fewshot, batch_size,
                          max_gen_toks, dtype, device)
    return gsm_scores(results, samples_path)


def gsm_scores(results: dict, samples_path: Path | None = None) -> dict[str, float | int]:
    """Exact match of the number after `####` (strict) and of the last number generated (flexible), scored by the
    stock gsm8k filters, with lm-eval's standard errors, from the harness's results. `samples_path` gets one JSON
    line per question with the harness's own verdicts, for reports."""
    scores = results["results"][TASK_NAME]
    samples = results["samples"][TASK_NAME]
    if samples_path is not None:
        by_question: dict[int, dict] = {}
        for sample in samples:  # one entry per (question, filter)
            record = by_question.setdefault(sample["doc_id"], {
                "question": sample["doc"]["question"], "target": final_answer(sample["doc"]["answer"]),
                "generation": sample["resps"][0][0]})
            suffix = "" if sample["filter"] == "strict-match" else "_flexible"
            record[f"extracted{suffix}"] = sample["filtered_resps"][0]
            record[f"correct{suffix}"] = bool(sample["exact_match"])
        write_jsonl(samples_path, [by_question[doc_id] for doc_id in sorted(by_question)])
    # lm-eval's standard errors of the mean over questions ("N/A" for a single question)
    errors = {f"gsm_exact_match{suffix}_stderr": scores.get(f"exact_match_stderr,{name}")
              for suffix, name in (("", "strict-match"), ("_flexible", "flexible-extract"))}
    return {
        "gsm_exact_match": float(scores["exact_match,strict-match"]),
        "gsm_exact_match_flexible": float(scores["exact_match,flexible-extract"]),
        **{key: float(value) for key, value in errors.items() if isinstance(value, (int, float))},
        "gsm_n": len({sample["doc_id"] for sample in samples}),
    }
