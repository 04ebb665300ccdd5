"""The teacher-logits contract: the compact encoding keeps every kept id and each value within its quantisation
step; extraction truncates as pre-training distillation does; shards are checksummed, survive SIGKILL and
are read back in training order one at a time; bad inputs fail naming the fix."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge import logit_codec
from tokenbridge.config import RuntimeParams, TeacherTruncation
from tokenbridge.contracts import ModelCard, TeacherLogitsManifest
from tokenbridge.data.chat import Encoded
from tokenbridge.data.padding import pad_batch
from tokenbridge.io import read_jsonl
from tokenbridge.losses.base import TeacherView
from tokenbridge.losses.teacher_distribution import teacher_log_probs
from tokenbridge.losses.token_stats import truncated_next_token_stats
from tokenbridge.models import load_model, load_tokenizer
from tokenbridge.runtime import Runtime
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.stages.teacher_logits import run_teacher_logits
from tokenbridge.stored_logits import FIELDS, TeacherLogitsReader, read_shard
from tokenbridge.training.batching import batch_indices
from tokenbridge.training.teachers import Teacher

FP32 = Runtime.resolve(RuntimeParams(precision="fp32"))  # the tiny teacher in exact fp32


def _random_truncated(seed: int, n: int, k: int, vocab: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, vocab))
    logprobs = logits - np.logaddexp.reduce(logits, 1, keepdims=True)
    ids = np.argsort(-logprobs, 1)[:, :k]
    values = np.take_along_axis(logprobs, ids, 1).astype(np.float32)
    counts = rng.integers(1, k + 1, n)
    return ids, values, counts


def _companded(logprobs):
    return np.exp(logprobs.astype(np.float64) / logit_codec.COMPANDING)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), k=st.integers(1, 64),
       vocab=st.sampled_from([70, 300, 70_000, 262_144]))
def test_codec_keeps_every_id_and_each_value_within_half_a_step(seed, n, k, vocab):
    k = min(k, vocab)
    ids, values, counts = _random_truncated(seed, n, k, vocab) if vocab < 1000 else _sparse_truncated(seed, n, k, vocab)
    decoded_ids, decoded = logit_codec.decode(logit_codec.encode(ids, values, counts))
    assert decoded_ids.shape == decoded.shape == (n, counts.max())
    for row in range(n):
        kept = counts[row]
        assert sorted(decoded_ids[row, :kept].tolist()) == sorted(ids[row, :kept].tolist())
        assert np.isneginf(decoded[row, kept:]).all() and (decoded_ids[row, kept:] == 0).all()
        assert (np.diff(decoded[row, :kept]) <= 0).all(), "most probable first"
        by_id = dict(zip(ids[row, :kept].tolist(), values[row, :kept]))
        original = np.array([by_id[i] for i in decoded_ids[row, :kept].tolist()])
        step = 1 / logit_codec.LEVELS
        error = np.abs(_companded(decoded[row, :kept]) - _companded(original))
        assert (error <= step / 2 + 1e-6).all()


def _sparse_truncated(seed: int, n: int, k: int, vocab: int):
    """Ids spread over a large vocabulary (gaps past the 255 and 65,535 escapes), including 0 and vocab - 1."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    ids[0, 0], ids[-1, -1] = 0, vocab - 1
    values = np.sort(np.log(rng.dirichlet(np.ones(k) * 0.3, n) + 1e-30), 1)[:, ::-1].astype(np.float32)
    return ids, values, rng.integers(1, k + 1, n)


def test_codec_meets_its_size_and_fidelity_on_a_peaked_teacher():
    # 128 of 150k ids per position with Zipf-like values: the shape of a real LM's top-128.
    rng = np.random.default_rng(0)
    n, k, vocab = 2000, 128, 151_646
    popular = rng.zipf(1.3, (n, 4 * k)) % vocab
    ids = np.stack([np.unique(row)[:k] if len(np.unique(row)) >= k else rng.choice(vocab, k, replace=False)
                    for row in popular])
    logits = -np.log(np.arange(1, k + 1))[None, :] * 2 + rng.normal(0, 0.3, (n, k))
    values = (np.sort(logits, 1)[:, ::-1] - np.log(np.exp(logits).sum(1, keepdims=True) / 0.97)).astype(np.float32)
    counts = np.full(n, k)
    streams = logit_codec.encode(ids, values, counts)
    assert logit_codec.encoded_bytes(streams) / n < 6 * k / 3, "at least 3x below int32 id + fp16 log-prob"
    decoded_ids, decoded = logit_codec.decode(streams)
    exact = torch.full((n, vocab), float("-inf")).scatter(1, torch.from_numpy(ids), torch.from_numpy(values))
    approx = torch.full((n, vocab), float("-inf")).scatter(1, torch.from_numpy(decoded_ids), torch.from_numpy(decoded))
    p, q = exact.log_softmax(-1), approx.log_softmax(-1)
    kl = torch.where(p.isfinite(), p.exp() * (p - q), 0.0).sum(-1)
    assert kl.mean() < 1e-3


@pytest.fixture(scope="module")
def prepared(tiny_params, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    run_prepare(tiny_dirs, root, tiny_params.prepare)
    return root


@pytest.fixture(scope="module")
def extracted(tiny_params, tiny_dirs, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "logits"
    params = tiny_params.teacher_logits.model_copy(update={"examples_per_shard": 5, "top_p": 0.9, "top_k": 32})
    manifest = run_teacher_logits(prepared, tiny_dirs["teacher"], out, params, FP32)
    return out, params, manifest


def _reader(out, manifest, **overrides):
    return TeacherLogitsReader(out, ("token_logprobs", "boundary_logprobs", "topk_ids"), manifest.prepared_sha256,
                               **overrides)


def test_manifest_records_the_truncation_so_training_can_re_temper(extracted, tiny_dirs, prepared):
    out, params, manifest = extracted
    assert (manifest.top_p, manifest.top_k, manifest.temperature) == (0.9, 32, params.temperature)
    assert manifest.fields == list(FIELDS) and "missing mass" in manifest.distribution.logprobs
    records = read_jsonl(prepared / "train.teacher.jsonl")
    assert manifest.n_examples == len(records) and len(manifest.shards) == -(-len(records) // 5)
    assert manifest.n_tokens == sum(len(r["input_ids"]) for r in records)
    assert manifest.tokenizer_sha256 == ModelCard.of(tiny_dirs["teacher"]).tokenizer_sha256
    assert TeacherLogitsManifest.read(out / "manifest.json") == manifest
    assert 1 <= manifest.distribution.mean_kept <= 32


def test_stored_distributions_are_the_top_p_prefix_capped_at_k_of_the_live_teacher(extracted, tiny_dirs, prepared):
    out, params, manifest = extracted
    reader = _reader(out, manifest)
    teacher = Teacher.load(tiny_dirs["teacher"], torch.float32, torch.device("cpu"))
    records = [Encoded.from_json(r) for r in read_jsonl(prepared / "train.teacher.jsonl")]
    for index in (0, len(records) - 1):
        ids, mask = pad_batch([records[index].input_ids])
        stored = reader[index]
        assert stored["input_ids"].tolist() == records[index].input_ids
        full = teacher.model(ids, attention_mask=mask).logits[0, :, : teacher.vocab_size].float().log_softmax(-1)
        torch.testing.assert_close(stored["token_logprobs"][:-1], full[:-1].gather(-1, ids[0, 1:, None])[:, 0],
                                   atol=1e-5, rtol=0)
        for position in range(len(records[index].input_ids)):
            ranked = full[position].sort(descending=True)
            reach = int((ranked.values.exp().cumsum(0) < 0.9).sum()) + 1
            kept = min(reach, 32)
            stored_ids = stored["topk_ids"][position][stored["topk_logprobs"][position].isfinite()]
            assert sorted(stored_ids.tolist()) == sorted(ranked.indices[:kept].tolist())
            stored_p = stored["topk_logprobs"][position, :kept].double().exp()
            assert torch.allclose(stored_p, ranked.values[:kept].double().exp(), atol=0.02), "within the 7-bit step"
            mass = stored_p.sum()  # 1 - mass is the missing mass
            assert mass <= 1 + 0.02 and (kept == 32 or mass >= 0.9 - 0.02), "top-p reached unless capped at k"


def test_temperature_changes_stored_values_but_never_which_ids_are_kept(tiny_params, tiny_dirs, prepared, tmp_path):
    manifests = {}
    for temperature in (1.0, 3.0):
        params = tiny_params.teacher_logits.model_copy(update={"top_p": 0.8, "temperature": temperature})
        manifests[temperature] = run_teacher_logits(prepared, tiny_dirs["teacher"], tmp_path / str(temperature),
                                                    params, FP32)
    cold = _reader(tmp_path / "1.0", manifests[1.0])[3]
    hot = _reader(tmp_path / "3.0", manifests[3.0])[3]
    assert [sorted(r[r >= 0].tolist())
            for r in torch.where(cold["topk_logprobs"].isfinite(), cold["topk_ids"], -1)] == \
           [sorted(r[r >= 0].tolist()) for r in torch.where(hot["topk_logprobs"].isfinite(), hot["topk_ids"], -1)]
    assert not torch.equal(cold["topk_logprobs"], hot["topk_logprobs"])


class _HeadOnly(torch.nn.Module):
    """What the extraction path reads from a model: its output head (with padded rows) and config."""

    def __init__(self, hidden: int, rows: int, cap: float | None):
        super().__init__()
        self.head = torch.nn.Linear(hidden, rows)
        self.config = SimpleNamespace(final_logit_softcapping=cap)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


@pytest.mark.parametrize("temperature,top_p,cap", [(1.0, 1.0, None), (2.0, 0.9, None), (0.5, 0.6, 2.0)])
@torch.no_grad()
def test_vocabulary_blocked_statistics_equal_a_dense_softmax_at_every_real_position(temperature, top_p, cap):
    torch.manual_seed(0)
    vocab, padded_rows, k = 301, 19, 12  # 301: the last vocabulary block holds a single row
    model = _HeadOnly(16, vocab + padded_rows, cap)
    hidden, ids = torch.randn(3, 7, 16) * 3, torch.randint(0, vocab, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:], mask[2, 2:] = 0, 0
    boundary = torch.rand(vocab + padded_rows) < 0.3
    stats = truncated_next_token_stats(hidden, ids, mask, model, vocab, boundary, temperature, k, top_p,
                                       block_elements=100)

    logits = model.head(hidden)[..., :vocab]
    logits = torch.tanh(logits / cap) * cap if cap else logits
    tempered, untempered = (logits / temperature).log_softmax(-1), logits.log_softmax(-1)
    real = mask.bool()
    targets = ids[:, 1:].unsqueeze(-1)
    expected_token = tempered[:, :-1].gather(-1, targets).squeeze(-1)
    torch.testing.assert_close(stats.token_logprobs[:, :-1][real[:, :-1]], expected_token[real[:, :-1]])
    assert (stats.token_logprobs[:, -1] == 0).all()
    expected_boundary = tempered.masked_fill(~boundary[:vocab], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(stats.boundary_logprobs[real], expected_boundary[real])
    expected_values, expected_ids = tempered.topk(k, -1)
    torch.testing.assert_close(stats.topk_logprobs[real], expected_values[real])
    assert torch.equal(stats.topk_ids[real], expected_ids[real])
    kept = untempered.gather(-1, expected_ids).exp().cumsum(-1)
    expected_counts = ((kept < top_p).sum(-1) + 1).clamp(max=k) if top_p < 1 else torch.full_like(ids, k)
    assert torch.equal(stats.topk_counts[real], expected_counts[real])
    for field in (stats.token_logprobs, stats.boundary_logprobs, stats.topk_logprobs, stats.topk_counts):
        assert (field[~real] == 0).all(), "padding positions hold nothing"


def test_padded_stored_rows_add_no_mass_to_a_real_id_0():
    # A row that keeps id 0 (log-prob -0.1) next to rows padded with (0, -inf): the dense view keeps -0.1.
    ids = torch.tensor([[[5, 0, 0, 0], [0, 7, 0, 0]]])
    values = torch.tensor([[[-0.2, -1.0, float("-inf"), float("-inf")], [-0.1, -2.5, float("-inf"), float("-inf")]]])
    view = TeacherView(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2),
                       loss_mask=torch.ones(1, 2, dtype=torch.bool), vocab_size=10, truncation=TeacherTruncation(),
                       token_logprobs=torch.zeros(1, 2), boundary_logprobs=None, topk_ids=ids, topk_logprobs=values,
                       stored_temperature=1.0)
    dense = teacher_log_probs(ids, values, None, view)
    expected = torch.tensor([-0.1, -2.5]).log_softmax(-1)
    torch.testing.assert_close(dense[0, 1, [0, 7]], expected)


def test_reading_in_training_order_decodes_each_shard_once_per_epoch(extracted):
    out, params, manifest = extracted
    reader = _reader(out, manifest)
    n, epochs, batch = len(reader), 3, 4
    steps = epochs * n // batch
    seen = [i for step in range(steps) for i in batch_indices(step, batch, n, params.examples_per_shard, seed=7)]
    assert sorted(seen) == sorted(list(range(n)) * epochs)
    for index in seen:
        reader[index]
    assert reader.shard_reads == epochs * len(manifest.shards)


def test_a_corrupted_shard_fails_naming_the_file_and_a_rerun_re_extracts_it(tiny_params, tiny_dirs, prepared, tmp_path):
    out = tmp_path / "logits"
    params = tiny_params.teacher_logits.model_copy(update={"examples_per_shard": 8})
    manifest = run_teacher_logits(prepared, tiny_dirs["teacher"], out, params, FP32)
    victim = out / manifest.shards[1].file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    reader = _reader(out, manifest)
    with pytest.raises(ValueError, match=f"{victim.name} is corrupted.*sha256"):
        reader[manifest.shards[1].first_index]
    with pytest.raises(ValueError, match=f"{victim.name} cannot be read"):
        victim.write_bytes(b"not a shard")
        read_shard(victim)
    assert run_teacher_logits(prepared, tiny_dirs["teacher"], out, params, FP32).shards == manifest.shards


def test_logits_from_another_teacher_or_prepared_data_are_refused_with_both_values(extracted):
    out, _, manifest = extracted
    card = ModelCard(name="teacher", tokenizer_sha256=manifest.tokenizer_sha256, tokenizer_size=manifest.vocab_size,
                     parameters=1)
    _reader(out, manifest, teacher_card=card)
    with pytest.raises(ValueError,
                       match=f"tokenizer sha256 is {manifest.tokenizer_sha256}.*configured teacher's is abc"):
        _reader(out, manifest, teacher_card=card.model_copy(update={"tokenizer_sha256": "abc"}))
    with pytest.raises(ValueError, match=f"vocabulary size is {manifest.vocab_size}.*configured teacher's is 151936"):
        _reader(out, manifest, teacher_card=card.model_copy(update={"tokenizer_size": 151936}))
    with pytest.raises(ValueError, match="rerun 'dvc repro teacher_logits'"):
        TeacherLogitsReader(out, ("token_logprobs",), "0" * 64)
    with pytest.raises(ValueError, match="lacks"):
        TeacherLogitsReader(out, ("hidden_states",), manifest.prepared_sha256)


def test_padded_vocabulary_rows_never_receive_probability(tiny_params, tiny_dirs, prepared, tmp_path):
    # A teacher whose embedding matrix has 40 more rows than its tokenizer, each a copy of a real token's row:
    # unless they are sliced off, they take mass (and top-k places) from real tokens.
    padded_dir = tmp_path / "padded_teacher"
    shutil.copytree(tiny_dirs["teacher"], padded_dir)
    model = load_model(padded_dir)
    size = len(load_tokenizer(padded_dir))
    model.resize_token_embeddings(size + 40)
    with torch.no_grad():
        model.get_output_embeddings().weight[size:] = model.get_output_embeddings().weight[:40] * 3
    model.save_pretrained(padded_dir)
    teacher = Teacher.load(padded_dir, torch.float32, torch.device("cpu"))
    assert teacher.model.get_output_embeddings().weight.shape[0] == size + 40 and teacher.vocab_size == size
    ids, mask = pad_batch([read_jsonl(prepared / "train.teacher.jsonl")[0]["input_ids"]])
    stats = teacher.stats(ids, mask, 1.0, top_k=size)
    assert stats.topk_ids.max() < size
    torch.testing.assert_close(stats.topk_logprobs.exp().sum(-1), torch.ones(ids.shape), atol=1e-4, rtol=0)
    params = tiny_params.teacher_logits.model_copy(update={"top_k": 64})
    manifest = run_teacher_logits(prepared, padded_dir, tmp_path / "logits", params, FP32)
    assert manifest.vocab_size == size
    stored = _reader(tmp_path / "logits", manifest)[0]
    assert stored["topk_ids"].max() < size


_EXTRACT = """
import sys
from pathlib import Path
from tokenbridge.config import RuntimeParams, TeacherLogitsParams
from tokenbridge.runtime import Runtime
from tokenbridge.stages.teacher_logits import run_teacher_logits
run_teacher_logits(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                   TeacherLogitsParams.model_validate_json(sys.argv[4]),
                   Runtime.resolve(RuntimeParams(precision="fp32")))
"""


def test_extraction_killed_mid_shard_resumes_with_every_position_stored_exactly_once(tiny_params, tiny_dirs, prepared,
                                                                                      tmp_path):
    params = tiny_params.teacher_logits.model_copy(update={"examples_per_shard": 6, "batch_size": 1})
    reference = run_teacher_logits(prepared, tiny_dirs["teacher"], tmp_path / "clean", params, FP32)
    out = tmp_path / "killed"
    command = [sys.executable, "-c", _EXTRACT, str(prepared), str(tiny_dirs["teacher"]), str(out),
               params.model_dump_json()]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "extraction ended before its first shard"
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "shard-00001.json").exists(), "the kill must land inside the second shard"
    assert not (out / "manifest.json").exists()

    resumed = run_teacher_logits(prepared, tiny_dirs["teacher"], out, params, FP32)
    covered = sorted(i for s in resumed.shards for i in range(s.first_index, s.first_index + s.n_examples))
    assert covered == list(range(reference.n_examples)), "every example exactly once"
    assert resumed.n_tokens == reference.n_tokens
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["plan.json", "manifest.json", *(s.file for s in resumed.shards),
         *(s.file.replace(".safetensors", ".json") for s in resumed.shards)]), "no temporaries left behind"
    clean, restarted = _reader(tmp_path / "clean", reference), _reader(out, resumed)
    for index in range(reference.n_examples):
        for field, value in clean[index].items():
            assert torch.equal(restarted[index][field], value), (index, field)
