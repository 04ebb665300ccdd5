"""A generated arithmetic task scored by log-likelihood: lm-eval's `multiple_choice`, built offline.

Watches a student's general ability beside GSM at a fraction of GSM's cost: no generation, one forward pass per
choice. Each question asks for one sum, difference or product of whole numbers; the four choices are the answer
and three near misses (off by 1, 2, 10 or 100, or the digits of the answer reordered), so a model must compute
rather than spot the only plausible number. Scored by lm-eval's `acc` (the most likely choice is the answer) and
`acc_norm` (likelihood per byte), with their standard errors. Deterministic: the questions come from fixed seeds,
so every model and every run sees the same ones.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from tokenbridge.io import write_jsonl, write_text

TASK_NAME = "tokenbridge_arithmetic"
CHOICES = 4
TEST_QUESTIONS = 1000  # evaluate.choice_limit takes the first ones
FEWSHOT_QUESTIONS = 20
_SEEDS = {"test": 20261130, "train": 7}


def _operation(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice("+-*")
    if kind == "*":
        a, b = rng.randint(3, 99), rng.randint(3, 19)
        return f"{a} * {b}", a * b
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if kind == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b}", a - b
    return f"{a} + {b}", a + b


def _near_misses(answer: int, rng: random.Random) -> list[int]:
    candidates = {answer + sign * step for sign in (-1, 1) for step in (1, 2, 10, 100)}
    digits = list(str(answer))
    rng.shuffle(digits)
    candidates.add(int("".join(digits)))
    return rng.sample(sorted(value for value in candidates if value >= 0 and value != answer), CHOICES - 1)


def arithmetic_questions(n: int, seed: int) -> list[dict]:
    """`n` records `{"question", "choices": [4 numbers as text], "label": index of the answer}`."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        expression, answer = _operation(rng)
        choices = [answer, *_near_misses(answer, rng)]
        rng.shuffle(choices)
        records.append({"question": f"What is {expression}? Answer with the number alone.",
                        "choices": [str(choice) for choice in choices], "label": choices.index(answer)})
    return records


def write_arithmetic_task(task_dir: Path) -> str:
    """Write the questions (`test.jsonl`, few-shot examples in `train.jsonl`) and `task_dir/<TASK_NAME>.yaml`;
    returns the task name. The question is the user turn, a choice the whole answer (no leading space)."""
    task_dir = Path(task_dir).resolve()
    files = {split: task_dir / f"{split}.jsonl" for split in _SEEDS}
    write_jsonl(files["test"], arithmetic_questions(TEST_QUESTIONS, _SEEDS["test"]))
    write_jsonl(files["train"], arithmetic_questions(FEWSHOT_QUESTIONS, _SEEDS["train"]))
    config = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
        "test_split": "test",
        "fewshot_split": "train",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True}
                        for name in ("acc", "acc_norm")],
        "metadata": {"version": 1},
    }
    write_text(task_dir / f"{TASK_NAME}.yaml", yaml.safe_dump(config, sort_keys=False))
    return TASK_NAME
