"""Stage `teacher_logits`: run the teacher once over the training data and store what the losses need.

Per teacher position `j` (row `j` = the distribution after token `j`, predicting token `j + 1`):
- the truncated distribution (docs/algorithms/pretraining-distillation.md#truncation-and-temperature): the
  smallest prefix reaching `top_p` (at temperature 1, the crossing token included), capped at `top_k`,
  with log-probs at `temperature` normalised over the full vocabulary, so `1 - sum(exp)` is the missing
  mass and training can re-temper; compact-encoded
  (`tokenbridge/logit_codec.py`) and decoded as `topk_ids` / `topk_logprobs` padded with (0, -inf);
- `token_logprobs`: log-prob of the *observed* next token, in or out of the kept set (ALM's chunk likelihoods);
- `boundary_logprobs`: log-prob that the next token starts a word or is special (ALM's debiasing), which
  needs the full distribution at extraction time, so it is computed here and stored as one scalar;
- the teacher's tokens, their common byte spans and loss mask, so distill can align them with the student's.

The layout on disk is `tokenbridge/stored_logits.py`'s. A shard and then its sidecar are written atomically, so
a run killed at any point (even SIGKILL) resumes with the shards it lacks. The teacher runs on
`runtime.device` in the runtime's inference dtype (bf16 where the hardware has it natively); log-probs are fp32.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenbridge import logit_codec
from tokenbridge.config import TeacherLogitsParams
from tokenbridge.contracts import (
    MANIFEST,
    TEACHER_LOGITS_FORMAT,
    ModelCard,
    PreparedManifest,
    StoredDistribution,
    StoredShard,
    TeacherLogitsManifest,
)
from tokenbridge.data.chat import Encoded
from tokenbridge.data.padding import pad_batch
from tokenbridge.io import fingerprint, read_json, sha256_file, write_json
from tokenbridge.losses.token_stats import NextTokenStats
from tokenbridge.runtime import Runtime
from tokenbridge.stored_logits import FIELDS, write_shard
from tokenbridge.training.teachers import Teacher


@dataclass(frozen=True)
class ExtractionPlan:
    """What one extraction produces: shard `s` holds training examples `shard_range(s)`, from `prepared_dir`'s
    teacher tokenization, under a fingerprint that decides whether saved shards can be kept."""

    prepared_dir: Path
    teacher_dir: Path
    out_dir: Path
    params: TeacherLogitsParams
    device: str  # where the teacher runs: "cuda" / "cuda:N" / "cpu"
    dtype: str  # its weights' dtype: "bfloat16" / "float32"
    key: str
    prepared_sha256: str
    n_examples: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_examples // self.params.examples_per_shard)

    def shard_range(self, shard: int) -> range:
        start = shard * self.params.examples_per_shard
        return range(start, min(start + self.params.examples_per_shard, self.n_examples))

    def shard_path(self, shard: int) -> Path:
        return self.out_dir / f"shard-{shard:05d}.safetensors"


def plan_extraction(prepared_dir: Path, teacher_dir: Path, out_dir: Path, params: TeacherLogitsParams,
                    runtime: Runtime) -> ExtractionPlan:
    """Fix the shards of this configuration; shards saved under another configuration are deleted."""
    train = PreparedManifest.read(Path(prepared_dir) / MANIFEST).splits.train
    prepared_sha256 = train.sha256.teacher
    dtype = runtime.inference_dtype_name
    teacher = ModelCard.of(teacher_dir).model_dump(mode="json", exclude_none=True)
    key = fingerprint({"format": TEACHER_LOGITS_FORMAT, "prepared": prepared_sha256, "teacher": teacher, "dtype": dtype,
                       **params.model_dump(exclude={"batch_size", "workers"})})
    plan_path = Path(out_dir) / "plan.json"
    if not plan_path.exists() or read_json(plan_path).get("fingerprint") != key:
        shutil.rmtree(out_dir, ignore_errors=True)
        write_json(plan_path, {"fingerprint": key})
    for leftover in Path(out_dir).glob(".*"):  # temporaries of a write that was killed (SIGKILL skips clean-up)
        shutil.rmtree(leftover, ignore_errors=True)
    return ExtractionPlan(Path(prepared_dir), Path(teacher_dir), Path(out_dir), params, str(runtime.device), dtype, key,
                          prepared_sha256, train.examples)


@functools.lru_cache(maxsize=1)
def _process_teacher(model_dir: Path, dtype: str, device: str) -> Teacher:
    """One teacher per process: every shard a worker extracts reuses it."""
    return Teacher.load(model_dir, getattr(torch, dtype), torch.device(device))


def _example_arrays(encoded: Encoded, stats: NextTokenStats, row: int) -> dict[str, np.ndarray]:
    assert stats.boundary_logprobs is not None and stats.topk_ids is not None, "extraction asks for every field"
    assert stats.topk_logprobs is not None and stats.topk_counts is not None
    length = len(encoded.input_ids)
    token_logprobs = stats.token_logprobs[row, :length].float().cpu().numpy().copy()
    token_logprobs[-1] = 0.0  # in a padded batch the last row "predicts" padding; nothing follows the example
    return {
        "input_ids": np.array(encoded.input_ids, dtype=np.int32),
        "spans": np.array([list(span) if span else [-1, -1] for span in encoded.spans], dtype=np.int32).reshape(-1, 2),
        "loss_mask": np.array(encoded.loss_mask, dtype=np.uint8),
        "token_logprobs": token_logprobs,
        "boundary_logprobs": stats.boundary_logprobs[row, :length].float().cpu().numpy(),
        "topk_ids": stats.topk_ids[row, :length].cpu().numpy(),
        "topk_logprobs": stats.topk_logprobs[row, :length].float().cpu().numpy(),
        "topk_counts": stats.topk_counts[row, :length].cpu().numpy(),
    }


def _sidecar(plan: ExtractionPlan, shard: int) -> Path:
    return plan.shard_path(shard).with_suffix(".json")


def extract_shard(plan: ExtractionPlan, shard: int, on_examples: Callable[[int], None] = lambda count: None) -> dict:
    """Extract one shard, or keep it when a finished copy (shard file matching its sidecar's checksum) exists."""
    path, sidecar = plan.shard_path(shard), _sidecar(plan, shard)
    if sidecar.exists() and path.exists():
        info = read_json(sidecar)
        if info["sha256"] == sha256_file(path):
            on_examples(info["n_examples"])
            return info
    started = time.perf_counter()
    params = plan.params
    teacher = _process_teacher(plan.teacher_dir, plan.dtype, plan.device)
    indices = plan.shard_range(shard)
    with open(plan.prepared_dir / "train.teacher.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in itertools.islice(handle, indices.start, indices.stop)]
    examples = []
    for offset in range(0, len(records), params.batch_size):
        batch = [Encoded.from_json(record) for record in records[offset : offset + params.batch_size]]
        ids, mask = pad_batch([encoded.input_ids for encoded in batch])
        stats = teacher.stats(ids, mask, params.temperature, params.top_k, top_p=params.top_p)
        examples += [_example_arrays(encoded, stats, row) for row, encoded in enumerate(batch)]
        on_examples(len(batch))
    distribution_bytes = write_shard(path, examples)
    info = {"file": path.name, "sha256": sha256_file(path), "first_index": indices.start, "n_examples": len(examples),
            "n_tokens": int(sum(len(e["input_ids"]) for e in examples)),
            "n_kept": int(sum(e["topk_counts"].sum() for e in examples)),
            "bytes": path.stat().st_size, "distribution_bytes": distribution_bytes,
            "extracted_by": {"host": socket.gethostname(), "pid": os.getpid()},
            "seconds": round(time.perf_counter() - started, 3)}
    write_json(sidecar, info)
    return info


def write_manifest(plan: ExtractionPlan, shards: list[dict]) -> TeacherLogitsManifest:
    """The contract distill reads: what was stored, how, from what, and every shard's checksum."""
    card = ModelCard.of(plan.teacher_dir)
    params = plan.params
    n_tokens = sum(s["n_tokens"] for s in shards)
    manifest = TeacherLogitsManifest(
        teacher=card.name, tokenizer_sha256=card.tokenizer_sha256, vocab_size=card.tokenizer_size,
        top_p=params.top_p, top_k=params.top_k, temperature=params.temperature, dtype=plan.dtype,
        device=plan.device, fields=list(FIELDS),
        row_semantics="row j is the teacher distribution after token j (it predicts token j+1)",
        distribution=StoredDistribution(
            kept="smallest prefix with probability >= top_p at temperature 1 (crossing token included), "
                 "then at most top_k entries",
            logprobs="at `temperature`, normalised over the full vocabulary: 1 - sum(exp) is the missing mass",
            encoding=f"ids: frequency-ranked set gaps; values: p^(1/{logit_codec.COMPANDING:g}) in "
                     f"{logit_codec.LEVELS + 1} levels; zstd",
            mean_kept=sum(s["n_kept"] for s in shards) / max(1, n_tokens),
            bytes_per_token=sum(s["distribution_bytes"] for s in shards) / max(1, n_tokens)),
        bytes_per_token=sum(s["bytes"] for s in shards) / max(1, n_tokens),
        prepared_sha256=plan.prepared_sha256, examples_per_shard=params.examples_per_shard,
        n_examples=sum(s["n_examples"] for s in shards), n_tokens=n_tokens,
        shards=[StoredShard(**{key: s[key] for key in StoredShard.model_fields})
                for s in sorted(shards, key=lambda s: s["first_index"])])
    manifest.write(plan.out_dir / MANIFEST)
    return manifest


def extract_in_process(plan: ExtractionPlan) -> list[dict]:
    """Every shard of the plan, one after another in this process."""
    from tqdm import tqdm

    with tqdm(total=plan.n_examples, desc="teacher logits", unit="ex") as bar:
        return [extract_shard(plan, shard, bar.update) for shard in range(plan.n_shards)]


def run_teacher_logits(prepared_dir: Path, teacher_dir: Path, out_dir: Path, params: TeacherLogitsParams,
                       runtime: Runtime, extract: Callable[[ExtractionPlan], list[dict]] = extract_in_process
                       ) -> TeacherLogitsManifest:
    """Plan the shards, extract the ones missing (`extract` maps them over processes: the flow passes its
    Prefect tasks), and write the manifest."""
    plan = plan_extraction(prepared_dir, teacher_dir, out_dir, params, runtime)
    return write_manifest(plan, extract(plan))
