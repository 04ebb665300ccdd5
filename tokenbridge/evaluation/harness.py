"""lm-eval's real harness on a local model directory, offline, one task (or group) at a time.

Each task runs in the model's chat format (the question as the user turn; few-shot examples as earlier turns).
Which tasks run, and on how many documents: `suite.py`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenbridge.contracts import TaskScore


@dataclass(frozen=True)
class Task:
    """One lm-eval task (or group) of the suite, as its scores are named in metrics files and reports."""

    name: str  # the report's name: `gsm`, `arithmetic`, or lm-eval's own
    lm_eval_name: str
    include_path: Path | None  # the folder lm-eval reads its YAML from; None: lm-eval's stock tasks

    @functools.cached_property
    def manager(self) -> Any:
        """lm-eval's index of the task's folder (or of every stock task: thousands of files, seconds to read), built
        once for this task and shared by `generates` and `run_harness`."""
        from lm_eval.tasks import TaskManager

        if self.include_path is None:
            return TaskManager()
        return TaskManager(include_path=str(self.include_path), include_defaults=False)


def generates(task: Task) -> bool:
    """Whether any of the task's documents is answered by generation (else every one is scored by likelihood).
    Loads the task, so an unknown name or a dataset out of reach fails here, naming the fix."""
    try:
        leaves = task.manager.load([task.lm_eval_name])["tasks"].values()
    except KeyError as error:
        raise ValueError(f"evaluate.tasks: {task.name!r} is no lm-eval task or group: give gsm, arithmetic, a folder "
                         "of task YAML files, or a stock task name (`lm_eval ls tasks` lists them)") from error
    except ConnectionError as error:
        raise ValueError(f"evaluate.tasks: {task.name!r} reads its dataset from the Hugging Face hub, which this run "
                         "cannot reach (tokenbridge sets HF_DATASETS_OFFLINE=1 unless told otherwise): run it where "
                         "the hub is reachable with HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0, or remove it from "
                         "evaluate.tasks") from error
    return any(leaf.OUTPUT_TYPE == "generate_until" for leaf in leaves)


def run_harness(model_dir: Path, task: Task, limit: int, num_fewshot: int, batch_size: int, max_gen_toks: int,
                dtype: str, device: str) -> dict:
    """lm-eval's `simple_evaluate` on one task, the model loaded from `model_dir` in `dtype` on `device`, in its
    chat format; returns lm-eval's results (with per-document samples)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    import tokenbridge.models.ensemble  # noqa: F401  registers the ensemble model type, so an ensemble loads like any model
    from tokenbridge.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # as tokenbridge reads it: lm-eval's AutoTokenizer may re-split a moved model
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "tokenizer": tokenizer},
        device=device,
        tasks=[task.lm_eval_name],
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        gen_kwargs={"max_gen_toks": max_gen_toks},
        apply_chat_template=True,
        fewshot_as_multiturn=num_fewshot > 0,
        task_manager=task.manager,
        log_samples=True,
    )
    # the run's record names the tokenizer's class, so it stays JSON (lm_eval_config.json)
    results["config"]["model_args"] = {**results["config"]["model_args"], "tokenizer": type(tokenizer).__name__}
    return results


def task_score(results: dict, task: Task) -> TaskScore:
    """The task's scores from lm-eval's results: every metric (`acc`, `exact_match,strict-match`: lm-eval's
    `metric,filter` with the `none` filter dropped) with its standard error, and the headline metric (the
    task's first) that the report's table shows."""
    name = task.lm_eval_name
    values: dict[str, float] = {}
    for key, value in results["results"][name].items():
        if "," in key and isinstance(value, (int, float)):
            metric, kept = key.split(",", 1)
            values[metric if kept == "none" else f"{metric},{kept}"] = float(value)
    directions = results["higher_is_better"].get(name) or {}
    headline = next((key for metric in directions for key in values if key.split(",")[0] == metric), None)
    if headline is None:
        raise ValueError(f"lm-eval gave task {name!r} no score: a group without an aggregate metric; list its "
                         "subtasks in evaluate.tasks instead")
    counts = results.get("n-samples", {}).get(name, {})
    return TaskScore(metric=headline, higher_is_better=bool(directions[headline.split(",")[0]]),
                     n=int(counts.get("effective", 0)), values=values)


def document_samples(results: dict, task: Task) -> list[dict]:
    """One record per scored document: the document, its target, what the model answered (per-choice
    log-likelihoods for a choice task) and each metric's verdict, for reports and for reading failures."""
    directions = results["higher_is_better"].get(task.lm_eval_name) or {}
    return [{"doc_id": sample["doc_id"], "doc": sample["doc"], "target": sample["target"],
             "response": sample["filtered_resps"],
             **{metric: sample[metric] for metric in directions if metric in sample}}
            for sample in results["samples"].get(task.lm_eval_name, [])]
