"""Bad data files stop the stage that reads them with the file, its line, and the fix; a byte-order mark is no error."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenbridge.config import HfModelSpec
from tokenbridge.contracts import MANIFEST, TeacherLogitsManifest
from tokenbridge.data.gsm import read_gsm_jsonl
from tokenbridge.models import materialize
from tokenbridge.stored_logits import TeacherLogitsReader

RECORD = {"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\n#### 7"}
GOOD = (json.dumps(RECORD) + "\n").encode()


@pytest.mark.parametrize("bad_line, message", [
    (b'{"question": "q" "answer": "#### 1"}\n', r"train\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column "
                                               r"18\): write each record as one JSON object on one line"),
    (b'{"question": "caf\xe9", "answer": "#### 1"}\n', r"train\.jsonl:2: not UTF-8 \(invalid continuation byte at byte "
                                                       r"18 of the line\): save the file as UTF-8"),
    (b'["q", "#### 1"]\n', r"train\.jsonl:2: not a JSON object \(\[\"q\", \"#### 1\"\]\): write each record as one "
                           r"object such as"),
])
def test_a_bad_line_of_a_jsonl_file_is_named_with_its_line_and_the_fix(tmp_path, bad_line, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + bad_line + GOOD)
    with pytest.raises(ValueError, match=message):
        read_gsm_jsonl(path, limit=10)


def test_a_jsonl_file_starting_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + GOOD)
    assert read_gsm_jsonl(path, limit=10) == [RECORD, RECORD]


def test_a_deleted_logits_shard_is_named_with_the_rerun_that_restores_it(cross_tokenizer_pair, tmp_path):
    root, _ = cross_tokenizer_pair
    logits = shutil.copytree(root / "logits", tmp_path / "logits")  # the session's copy stays whole
    manifest = TeacherLogitsManifest.read(logits / MANIFEST)
    victim = manifest.shards[-1]
    (logits / victim.file).unlink()
    reader = TeacherLogitsReader(logits, ("token_logprobs",), manifest.prepared_sha256)
    reader[0]  # the shards left are read as before
    with pytest.raises(FileNotFoundError, match=rf"{victim.file} is missing: rerun 'dvc repro teacher_logits'"):
        reader[victim.first_index]


def test_a_hf_model_directory_without_weights_is_refused_by_the_models_stage_naming_the_fix(tiny_dirs, tmp_path):
    """It used to be linked in, and distill failed 86 s later."""
    source = tmp_path / "no_weights"
    shutil.copytree(tiny_dirs["student"], source, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"holds no weights .*save_pretrained"):
        materialize(HfModelSpec(source="hf", path=str(source)), tmp_path / "student", tmp_path / "cache")
    assert not (tmp_path / "student").exists()
