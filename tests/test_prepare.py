"""The prepare stage: GSM8K-format JSONL is accepted in place of reasoning-gym, and split by template."""

from __future__ import annotations

import json

import pytest

from tokenbridge.config import PrepareParams
from tokenbridge.contracts import PreparedManifest
from tokenbridge.data.gsm import generate_gsm_symbolic
from tokenbridge.io import read_jsonl
from tokenbridge.stages.prepare import run_prepare

RECORDS = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Weng earns $12 an hour. She did 50 minutes of babysitting. How much did she earn?",
     "answer": "Per minute she earns 12/60 = $<<12/60=0.2>>0.2.\nSo 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_local_gsm8k_jsonl_is_tokenized_for_both_models(tmp_path, tiny_dirs):
    params = PrepareParams(source="jsonl", train_jsonl=_jsonl(tmp_path / "train.jsonl", RECORDS),
                           test_jsonl=_jsonl(tmp_path / "test.jsonl", RECORDS[:1]), n_train=10, n_test=10,
                           max_length=1024)
    manifest = run_prepare(tiny_dirs, tmp_path / "out", params)
    assert manifest.splits.train.examples == 2 and manifest.splits.test.examples == 1
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == RECORDS
    for role in ("teacher", "student"):
        encoded = read_jsonl(tmp_path / "out" / f"train.{role}.jsonl")
        assert [e["index"] for e in encoded] == [0, 1]
        assert all(len(e["input_ids"]) == len(e["spans"]) == len(e["loss_mask"]) for e in encoded)
        assert any(encoded[0]["loss_mask"]) and not encoded[0]["loss_mask"][0]
    assert PreparedManifest.read(tmp_path / "out" / "manifest.json") == manifest
    assert manifest.models.teacher.name.startswith("tiny-")


def test_a_record_without_a_final_answer_is_rejected_with_its_line(tmp_path, tiny_dirs):
    bad = [RECORDS[0], {"question": "q", "answer": "no final number"}]
    params = PrepareParams(source="jsonl", train_jsonl=_jsonl(tmp_path / "train.jsonl", bad),
                           test_jsonl=_jsonl(tmp_path / "test.jsonl", RECORDS), n_train=10, n_test=10, max_length=1024)
    with pytest.raises(ValueError, match=r"train\.jsonl:2: answer must end with '#### <number>'"):
        run_prepare(tiny_dirs, tmp_path / "out", params)


def test_gsm_symbolic_test_questions_come_from_templates_never_seen_in_training():
    train, test = generate_gsm_symbolic(40, 20, 0.2, seed=7)
    assert len(train) == 40 and len(test) == 20
    assert not {r["template"] for r in train} & {r["template"] for r in test}
    assert all(r["answer"].rstrip().split("#### ")[-1] for r in train + test)
    assert not any(r["question"].endswith("Do not include units.") for r in train)
