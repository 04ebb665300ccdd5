"""The benchmark suite of `evaluate.tasks`: which lm-eval tasks each evaluated model runs.

An entry of `evaluate.tasks` is one of:

- `gsm`: GSM-style maths on the prepared test split (generated here, `gsm_lmeval.py`; exact match, generated
  answers);
- `arithmetic`: sums, differences and products as four-way choices scored by log-likelihood (generated here,
  `arithmetic.py`);
- a local folder of lm-eval task YAML files: every task in it (a relative path is read from the project root);
- any other name: a stock lm-eval task or group. Stock tasks read their data from the Hugging Face hub, so they
  are for machines that can reach it (or whose datasets cache holds them).

Each task runs in the model's chat format (the question as the user turn; few-shot examples as earlier turns), on
the first `limit` documents when it generates answers and the first `choice_limit` when it scores given
continuations by log-likelihood (multiple choice, perplexity): generation costs a forward pass per token.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tokenbridge.config import is_task_folder
from tokenbridge.evaluation.arithmetic import write_arithmetic_task
from tokenbridge.evaluation.gsm_lmeval import write_gsm_task
from tokenbridge.evaluation.harness import Task


def folder_tasks(folder: Path) -> list[str]:
    """The task names the YAML files under `folder` define (`task: <name>`), in file order."""
    names = []
    for path in sorted(Path(folder).rglob("*.yaml")):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_LenientLoader)
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            names.append(config["task"])
    return names


class _LenientLoader(yaml.SafeLoader):
    """Reads lm-eval YAML, whose `!function` tags name Python callables, without resolving them."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def resolve_tasks(entries: list[str], task_dir: Path, prepared_dir: Path) -> list[Task]:
    """The suite's tasks, generating `gsm` and `arithmetic` under `task_dir`."""
    tasks = []
    for entry in entries:
        if entry == "gsm":
            folder = task_dir / "gsm"
            tasks.append(Task("gsm", write_gsm_task(folder, prepared_dir / "test.jsonl", prepared_dir / "train.jsonl"),
                              folder))
        elif entry == "arithmetic":
            folder = task_dir / "arithmetic"
            tasks.append(Task("arithmetic", write_arithmetic_task(folder), folder))
        elif is_task_folder(entry):
            tasks += [Task(name, name, Path(entry).resolve()) for name in folder_tasks(Path(entry))]
        else:
            tasks.append(Task(entry, entry, None))
    return tasks


