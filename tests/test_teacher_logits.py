"""The teacher-logits contract: shards round-trip exactly, extraction resumes, stored signals equal live ones."""

from __future__ import annotations

import pytest
import torch

from components.data.chat import Encoded
from components.io import read_json, read_jsonl
from components.prepare import run_prepare
from components.teacher_logits import FIELDS, Teacher, TeacherLogitsReader, pad_batch, read_shard, run_teacher_logits, write_shard


def test_shard_round_trip_is_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (5, 1, 9):
        examples.append({
            "input_ids": torch.randint(0, 1000, (length,), generator=generator, dtype=torch.int32),
            "spans": torch.randint(-1, 50, (length, 2), generator=generator, dtype=torch.int32),
            "loss_mask": torch.rand(length, generator=generator) > 0.5,
            "topk_ids": torch.randint(0, 1000, (length, 4), generator=generator, dtype=torch.int32),
            "topk_logprobs": -torch.rand(length, 4, generator=generator).to(torch.float16),
            "token_logprobs": -torch.rand(length, generator=generator),
            "boundary_logprobs": -torch.rand(length, generator=generator),
        })
    write_shard(tmp_path / "shard.safetensors", examples)
    loaded = read_shard(tmp_path / "shard.safetensors")
    assert len(loaded) == len(examples)
    for original, restored in zip(examples, loaded):
        assert set(restored) == set(original)
        for field, value in original.items():
            assert restored[field].dtype == value.dtype and torch.equal(restored[field], value), field


@pytest.fixture(scope="module")
def extracted(tiny_params, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    prepared = root / "prepared"
    run_prepare(tiny_dirs, prepared, tiny_params.prepare)
    params = tiny_params.teacher_logits.model_copy(update={"examples_per_shard": 5})
    manifest = run_teacher_logits(prepared, tiny_dirs["teacher"], root / "logits", params)
    return root, prepared, params, manifest


def test_manifest_records_what_was_stored(extracted, tiny_dirs):
    _, prepared, params, manifest = extracted
    assert manifest["top_k"] == params.top_k and manifest["temperature"] == params.temperature
    assert manifest["fields"] == list(FIELDS)
    records = read_jsonl(prepared / "train.teacher.jsonl")
    assert manifest["n_examples"] == len(records) and len(manifest["shards"]) == -(-len(records) // 5)
    assert manifest["n_tokens"] == sum(len(r["input_ids"]) for r in records)
    assert manifest["tokenizer_sha256"] == read_json(tiny_dirs["teacher"] / "tokenbridge.json")["tokenizer_sha256"]


def test_stored_signals_equal_the_live_teachers(extracted, tiny_dirs):
    _, prepared, params, manifest = extracted
    reader = TeacherLogitsReader(extracted[0] / "logits", ("token_logprobs", "boundary_logprobs"), manifest["prepared_sha256"])
    teacher = Teacher.load(tiny_dirs["teacher"], params.dtype)
    records = [Encoded.from_json(r) for r in read_jsonl(prepared / "train.teacher.jsonl")]
    for index in (0, len(records) - 1):
        ids, mask = pad_batch([records[index].input_ids])
        live = teacher.stats(ids, mask, params.temperature, params.top_k)
        stored = reader[index]
        assert stored["input_ids"].tolist() == records[index].input_ids
        torch.testing.assert_close(stored["token_logprobs"], live.token_logprobs[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(stored["boundary_logprobs"], live.boundary_logprobs[0], atol=1e-5, rtol=0)
        assert torch.equal(stored["topk_ids"], live.topk_ids[0].to(torch.int32))
        # Top-k log-probs are stored in fp16 and come out sorted, all <= 0.
        assert (stored["topk_logprobs"][:, :-1] >= stored["topk_logprobs"][:, 1:]).all()


def test_an_interrupted_extraction_resumes_with_the_missing_shards_only(extracted, tiny_dirs):
    root, prepared, params, manifest = extracted
    out = root / "logits"
    last = manifest["shards"][-1]["file"]
    progress = read_json(out / "progress.json")
    del progress["done"][last]
    (out / "progress.json").write_text(__import__("json").dumps(progress))
    (out / last).unlink()
    kept = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in manifest["shards"][:-1]}
    resumed = run_teacher_logits(prepared, tiny_dirs["teacher"], out, params)
    assert resumed["shards"] == manifest["shards"]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept


def test_reader_refuses_logits_from_other_prepared_data(extracted):
    root, _, _, _ = extracted
    with pytest.raises(ValueError, match="rerun 'dvc repro teacher_logits'"):
        TeacherLogitsReader(root / "logits", ("token_logprobs",), "0" * 64)
    with pytest.raises(ValueError, match="lacks"):
        TeacherLogitsReader(root / "logits", ("hidden_states",), read_json(root / "logits" / "manifest.json")["prepared_sha256"])
