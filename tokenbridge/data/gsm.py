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
    """Read a GSM8K-format JSONL file; every line needs `question` and an `answer` ending in `#### N`. A byte-order
    mark is skipped (editors on Windows write one); any other bad line stops the read naming `path:line`."""
    records = []
    with open(path, "rb") as handle:  # bytes, decoded line by line, so a decoding error has its line
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not UTF-8 ({error.reason} at byte {error.start + 1} of the "
                                 "line): save the file as UTF-8") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.pos + 1}): write "
                                 "each record as one JSON object on one line") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: not a JSON object ({line.strip()[:40]}): write each record "
                                 "as one object such as {\"question\": ..., \"answer\": ...}")
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
