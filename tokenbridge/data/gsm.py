"""GSM-style maths problems: reasoning-gym's `gsm_symbolic` generator, or any GSM8K-format JSONL.

A record is `{"question": str, "answer": str}` where `answer` is a worked solution ending in `#### N`
(the GSM8K format that lm-eval's gsm8k task and our evaluation parse).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

_SUFFIX = re.compile(r"\s*Give the result as your final answer\. Do not include units\.\s*$")
_FINAL = re.compile(r"####\s*(-?[0-9.,]+)\s*$")


def final_answer(answer: str) -> str | None:
    """The number after `####`, or None when the answer is not in GSM8K format."""
    match = _FINAL.search(answer.strip())
    return match.group(1).replace(",", "") if match else None


def generate_gsm_symbolic(n_train: int, n_test: int, test_template_fraction: float,
                          seed: int) -> tuple[list[dict], list[dict]]:
    """Train/test records split BY TEMPLATE, so no test question is a variant of a training one."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=max(4 * (n_train + n_test), 400), seed=seed)
    templates = sorted(set(dataset.task_indices))
    rng = random.Random(seed)
    test_templates = set(rng.sample(templates, max(1, round(len(templates) * test_template_fraction))))
    train: list[dict] = []
    test: list[dict] = []
    for index, template in enumerate(dataset.task_indices):
        split = test if template in test_templates else train
        limit = n_test if split is test else n_train
        if len(split) >= limit:
            continue
        item = dataset[index]
        split.append({
            "question": _SUFFIX.sub("", item["question"]),
            "answer": item["metadata"]["answer_cot"].strip(),
            "template": int(template),
        })
        if len(train) >= n_train and len(test) >= n_test:
            break
    if len(train) < n_train or len(test) < n_test:
        raise ValueError(f"gsm_symbolic gave {len(train)} train / {len(test)} test records; lower n_train/n_test")
    return train, test


def read_gsm_jsonl(path: Path, limit: int) -> list[dict]:
    """Read a GSM8K-format JSONL file; every line needs `question` and an `answer` ending in `#### N`."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                raise ValueError(f"{path}:{line_number}: needs string fields 'question' and 'answer'")
            if final_answer(record["answer"]) is None:
                raise ValueError(f"{path}:{line_number}: answer must end with '#### <number>' (GSM8K format)")
            records.append({"question": record["question"], "answer": record["answer"].strip()})
            if len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records
