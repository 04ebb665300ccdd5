"""Stage `teacher_logits`: run the teacher once over the training data and store what the losses need.

Per teacher position `j` (row `j` = the distribution after token `j`, predicting token `j + 1`):
- the truncated distribution (spec 2.3): the smallest prefix reaching `top_p` (at temperature 1, the
  crossing token included), capped at `top_k`, with log-probs at `temperature` normalised over the full
  vocabulary, so `1 - sum(exp)` is the missing mass and training can re-temper; compact-encoded
  (`components/logit_codec.py`) and decoded as `topk_ids` / `topk_logprobs` padded with (0, -inf);
- `token_logprobs`: log-prob of the *observed* next token, in or out of the kept set (ALM's chunk likelihoods);
- `boundary_logprobs`: log-prob that the next token starts a word or is special (ALM's debiasing), which
  needs the full distribution at extraction time, so it is computed here and stored as one scalar;
- the teacher's tokens, their common byte spans and loss mask, so distill can align them with the student's.

Layout (`data/teacher_logits/`): `plan.json` (what the shards belong to), `shard-00000.safetensors` (every
field a zstd-compressed byte stream; examples concatenated with an `offsets` index), its sidecar
`shard-00000.json` (checksum, counts, who extracted it), and `manifest.json`. A shard and then its sidecar
are written atomically, so a run killed at any point (even SIGKILL) resumes with the shards it lacks.
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
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from components import logit_codec
from components.config import TeacherLogitsParams
from components.data.chat import Encoded
from components.io import atomic_path, fingerprint, read_json, require_manifest, sha256_file, write_json
from components.losses.token_stats import NextTokenStats, hidden_states, truncated_next_token_stats
from components.models import load_model, load_tokenizer, model_card
from components.models.token_bytes import boundary_mask

FORMAT = "tokenbridge.teacher_logits/v2"
FIELDS = ("input_ids", "spans", "loss_mask", "topk_ids", "topk_logprobs", "token_logprobs", "boundary_logprobs")
# Per-token fields stored as plain (compressed) arrays; the distribution goes through the codec.
_PLAIN = {"input_ids": np.int32, "spans": np.int32, "loss_mask": np.uint8, "token_logprobs": np.float32,
          "boundary_logprobs": np.float32}
_CODEC_PREFIX = "distribution."


def teacher_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto`: bfloat16 where the device computes in it (CPUs, CUDA from Ampere on), else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "float32"


@dataclass
class Teacher:
    """A loaded teacher and what its statistics need: the output head, real vocab size, boundary mask."""

    model: torch.nn.Module
    vocab_size: int
    boundary: torch.Tensor

    @classmethod
    def load(cls, model_dir: Path, dtype: str, device: torch.device | str = "cpu") -> "Teacher":
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, resolve_dtype(dtype, torch.device(device))).to(device).eval()
        rows = model.get_output_embeddings().weight.shape[0]
        return cls(model, len(tokenizer), boundary_mask(tokenizer, rows).to(device))

    @torch.no_grad()
    def stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float, top_k: int,
              top_p: float = 1.0) -> NextTokenStats:
        device = self.boundary.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = hidden_states(self.model, input_ids, attention_mask)
        return truncated_next_token_stats(hidden, input_ids, attention_mask, self.model, self.vocab_size,
                                          self.boundary, temperature, top_k, top_p)


@functools.lru_cache(maxsize=1)
def _process_teacher(model_dir: Path, dtype: str) -> Teacher:
    """One teacher per process: every shard a worker extracts reuses it."""
    return Teacher.load(model_dir, dtype, teacher_device())


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask)."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- shard files

def write_shard(path: Path, examples: list[dict[str, np.ndarray]]) -> int:
    """Concatenate per-example arrays (first dim = tokens), compress, write atomically; returns the
    distribution's encoded bytes. Each example holds the `_PLAIN` fields plus `topk_ids`, `topk_logprobs`
    ([L, k], full width) and `topk_counts` ([L]: how many of the k are kept)."""
    def joined(field: str) -> np.ndarray:
        return np.concatenate([example[field] for example in examples])

    streams = {field: logit_codec.compress(joined(field).astype(dtype)) for field, dtype in _PLAIN.items()}
    distribution = logit_codec.encode(joined("topk_ids"), joined("topk_logprobs"), joined("topk_counts"))
    streams.update({_CODEC_PREFIX + name: blob for name, blob in distribution.items()})
    tensors = {name: torch.frombuffer(bytearray(blob), dtype=torch.uint8) for name, blob in streams.items()}
    lengths = np.array([len(example["input_ids"]) for example in examples])
    tensors["offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": FORMAT})
    return logit_codec.encoded_bytes(distribution)


def read_shard(path: Path, expected_sha256: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Verify (when a checksum is given), decompress and split a shard into examples."""
    if expected_sha256 is not None and (actual := sha256_file(path)) != expected_sha256:
        raise ValueError(f"{path} is corrupted: its sha256 is {actual}, the manifest says {expected_sha256}. "
                         "Rerun 'dvc repro teacher_logits': it re-extracts shards whose checksum does not match")
    try:
        tensors = load_file(str(path))
        blobs = {name: tensor.numpy().tobytes() for name, tensor in tensors.items() if name != "offsets"}
        columns = {field: logit_codec.decompress(blobs[field], dtype) for field, dtype in _PLAIN.items()}
        topk_ids, topk_logprobs = logit_codec.decode(
            {name[len(_CODEC_PREFIX):]: blob for name, blob in blobs.items() if name.startswith(_CODEC_PREFIX)})
    except (SafetensorError, zstandard.ZstdError, KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path} cannot be read ({error}); delete it and rerun 'dvc repro teacher_logits'") from error
    columns["spans"] = columns["spans"].reshape(-1, 2)
    columns["loss_mask"] = columns["loss_mask"].astype(bool)
    columns.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    offsets = tensors["offsets"].tolist()
    return [{field: torch.from_numpy(np.array(value[start:end])) for field, value in columns.items()}
            for start, end in zip(offsets, offsets[1:])]


# ---------------------------------------------------------------------------------------------- extraction

@dataclass(frozen=True)
class ExtractionPlan:
    """What one extraction produces: shard `s` holds training examples `shard_range(s)`, from `prepared_dir`'s
    teacher tokenization, under a fingerprint that decides whether saved shards can be kept."""

    prepared_dir: Path
    teacher_dir: Path
    out_dir: Path
    params: TeacherLogitsParams
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


def plan_extraction(prepared_dir: Path, teacher_dir: Path, out_dir: Path, params: TeacherLogitsParams) -> ExtractionPlan:
    """Fix the shards of this configuration; shards saved under another configuration are deleted."""
    prepared = require_manifest(prepared_dir, "prepare")
    prepared_sha256 = prepared["splits"]["train"]["sha256"]["teacher"]
    dtype = resolve_dtype(params.dtype, teacher_device())
    key = fingerprint({"format": FORMAT, "prepared": prepared_sha256, "teacher": model_card(teacher_dir), "dtype": dtype,
                       **params.model_dump(exclude={"batch_size", "workers", "dtype"})})
    plan_path = Path(out_dir) / "plan.json"
    if not plan_path.exists() or read_json(plan_path).get("fingerprint") != key:
        shutil.rmtree(out_dir, ignore_errors=True)
        write_json(plan_path, {"fingerprint": key})
    for leftover in Path(out_dir).glob(".*"):  # temporaries of a write that was killed (SIGKILL skips clean-up)
        shutil.rmtree(leftover, ignore_errors=True)
    n_examples = prepared["splits"]["train"]["examples"]
    return ExtractionPlan(Path(prepared_dir), Path(teacher_dir), Path(out_dir), params, key, prepared_sha256, n_examples)


def _example_arrays(encoded: Encoded, stats: NextTokenStats, row: int) -> dict[str, np.ndarray]:
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
    teacher = _process_teacher(plan.teacher_dir, params.dtype)
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


def write_manifest(plan: ExtractionPlan, shards: list[dict]) -> dict:
    """The contract distill reads: what was stored, how, from what, and every shard's checksum."""
    card = model_card(plan.teacher_dir)
    params = plan.params
    n_tokens = sum(s["n_tokens"] for s in shards)
    manifest = {
        "format": FORMAT, "teacher": card["name"], "tokenizer_sha256": card["tokenizer_sha256"],
        "vocab_size": card["tokenizer_size"], "top_p": params.top_p, "top_k": params.top_k,
        "temperature": params.temperature, "dtype": resolve_dtype(params.dtype, teacher_device()),
        "device": teacher_device().type, "fields": list(FIELDS),
        "row_semantics": "row j is the teacher distribution after token j (it predicts token j+1)",
        "distribution": {
            "kept": "smallest prefix with probability >= top_p at temperature 1 (crossing token included), "
                    "then at most top_k entries",
            "logprobs": "at `temperature`, normalised over the full vocabulary: 1 - sum(exp) is the missing mass",
            "encoding": f"ids: frequency-ranked set gaps; values: p^(1/{logit_codec.COMPANDING:g}) in "
                        f"{logit_codec.LEVELS + 1} levels; zstd",
            "mean_kept": sum(s["n_kept"] for s in shards) / max(1, n_tokens),
            "bytes_per_token": sum(s["distribution_bytes"] for s in shards) / max(1, n_tokens),
        },
        "bytes_per_token": sum(s["bytes"] for s in shards) / max(1, n_tokens),
        "prepared_sha256": plan.prepared_sha256, "examples_per_shard": params.examples_per_shard,
        "n_examples": sum(s["n_examples"] for s in shards), "n_tokens": n_tokens,
        "shards": [{key: s[key] for key in ("file", "sha256", "first_index", "n_examples", "n_tokens", "bytes")}
                   for s in sorted(shards, key=lambda s: s["first_index"])],
    }
    write_json(plan.out_dir / "manifest.json", manifest)
    return manifest


def run_teacher_logits(prepared_dir: Path, teacher_dir: Path, out_dir: Path, params: TeacherLogitsParams) -> dict:
    """Extract every shard in this process (the flow maps them as Prefect tasks instead) and write the manifest."""
    from tqdm import tqdm

    plan = plan_extraction(prepared_dir, teacher_dir, out_dir, params)
    with tqdm(total=plan.n_examples, desc="teacher logits", unit="ex") as bar:
        shards = [extract_shard(plan, shard, bar.update) for shard in range(plan.n_shards)]
    return write_manifest(plan, shards)


# ---------------------------------------------------------------------------------------------- reading

def stored_encoded(example: dict[str, torch.Tensor]) -> Encoded:
    """The teacher's tokenization as stored beside its logits: what distill aligns with the student's."""
    return Encoded(example["input_ids"].tolist(),
                   [None if start < 0 else (start, end) for start, end in example["spans"].tolist()],
                   example["loss_mask"].tolist())


class TeacherLogitsReader:
    """Stored teacher examples by training-example index, checked against the manifest and the configured
    teacher. One decoded shard is held at a time: read in shard-blocked order (`distill.batch_indices`), each
    shard is read once per epoch and memory stays bounded by one shard."""

    def __init__(self, directory: Path, required: tuple[str, ...], expected_prepared_sha256: str,
                 teacher_card: dict | None = None):
        self.directory = Path(directory)
        self.manifest = require_manifest(self.directory, "teacher_logits")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{directory} holds teacher logits in format {self.manifest.get('format')!r}, this "
                             f"version reads {FORMAT!r}: rerun 'dvc repro teacher_logits'")
        missing = [field for field in required if field not in self.manifest["fields"]]
        if missing:
            raise ValueError(f"{directory}: stored teacher data lacks {missing}; rerun teacher_logits with a version that stores them")
        if self.manifest["prepared_sha256"] != expected_prepared_sha256:
            raise ValueError(f"{directory} was extracted from other prepared data: rerun 'dvc repro teacher_logits'")
        if teacher_card is not None:
            for key, label in (("tokenizer_sha256", "tokenizer sha256"), ("vocab_size", "vocabulary size")):
                stored, configured = self.manifest[key], teacher_card["tokenizer_size" if key == "vocab_size" else key]
                if stored != configured:
                    raise ValueError(f"{directory} was extracted with a teacher whose {label} is {stored}, but the "
                                     f"configured teacher's is {configured}: rerun 'dvc repro teacher_logits' "
                                     "(or point models.teacher at the teacher the logits came from)")
        self._shards = self.manifest["shards"]
        self._cache: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self.shard_reads = 0

    def __len__(self) -> int:
        return self.manifest["n_examples"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for number, shard in enumerate(self._shards):
            if shard["first_index"] <= index < shard["first_index"] + shard["n_examples"]:
                if self._cache is None or self._cache[0] != number:
                    self._cache = None  # drop the previous shard before decoding the next
                    self._cache = (number, read_shard(self.directory / shard["file"], shard["sha256"]))
                    self.shard_reads += 1
                return self._cache[1][index - shard["first_index"]]
        raise IndexError(index)
