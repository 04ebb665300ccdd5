"""Stage `teacher_logits`: run the teacher once over the training data and store what the losses need.

Per teacher position `j` (row `j` = the distribution after token `j`, predicting token `j + 1`):
- `topk_ids`, `topk_logprobs`: the top-k of the teacher's distribution at `temperature` (KD-type losses);
- `token_logprobs`: log-prob of the *observed* next token, in or out of the top-k (ALM's chunk likelihoods);
- `boundary_logprobs`: log-prob that the next token starts a word or is special (ALM's debiasing), which
  needs the full distribution at extraction time, so it is computed here and stored as one scalar.
Plus the teacher's tokens, their common byte spans and loss mask, so the distill stage can align chunks.

Layout (`data/teacher_logits/`): `shard-00000.safetensors`, ... (ragged examples concatenated, with an
`offsets` index) and `manifest.json` (teacher, tokenizer hash, k, temperature, fields, counts, shard hashes).
A rerun after an interruption keeps the finished shards (`progress.json`) and continues with the next.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from components.config import TeacherLogitsParams
from components.data.chat import Encoded
from components.io import atomic_path, fingerprint, read_json, read_jsonl, require_manifest, sha256_file, write_json
from components.losses.token_stats import NextTokenStats, hidden_states, next_token_stats, output_head
from components.models import load_model, load_tokenizer, model_card
from components.models.token_bytes import boundary_mask

FORMAT = "tokenbridge.teacher_logits/v1"
FIELDS = ("input_ids", "spans", "loss_mask", "topk_ids", "topk_logprobs", "token_logprobs", "boundary_logprobs")


@dataclass
class Teacher:
    """A loaded teacher and what its statistics need: the output head, real vocab size, boundary mask."""

    model: torch.nn.Module
    vocab_size: int
    boundary: torch.Tensor

    @classmethod
    def load(cls, model_dir: Path, dtype: str) -> "Teacher":
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, dtype).eval()
        rows = model.get_output_embeddings().weight.shape[0]
        return cls(model, len(tokenizer), boundary_mask(tokenizer, rows))

    @torch.no_grad()
    def stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float, top_k: int,
              chunk_size: int = 128) -> NextTokenStats:
        hidden = hidden_states(self.model, input_ids, attention_mask)
        return next_token_stats(hidden, input_ids, output_head(self.model), self.vocab_size, self.boundary,
                                temperature, top_k, chunk_size)


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask)."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def write_shard(path: Path, examples: list[dict[str, torch.Tensor]]) -> None:
    """Concatenate ragged per-example tensors (first dim = tokens) into one safetensors file, atomically."""
    lengths = torch.tensor([len(example["input_ids"]) for example in examples])
    tensors = {field: torch.cat([example[field] for example in examples]).contiguous() for field in examples[0]}
    tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary))


def read_shard(path: Path) -> list[dict[str, torch.Tensor]]:
    tensors = load_file(str(path))
    offsets = tensors.pop("offsets").tolist()
    return [{field: value[start:end] for field, value in tensors.items()} for start, end in zip(offsets, offsets[1:])]


def _example_tensors(encoded: Encoded, stats: NextTokenStats, row: int) -> dict[str, torch.Tensor]:
    length = len(encoded.input_ids)
    token_logprobs = stats.token_logprobs[row, :length].float().clone()
    token_logprobs[-1] = 0.0  # in a padded batch the last row "predicts" padding; nothing follows the example
    return {
        "input_ids": torch.tensor(encoded.input_ids, dtype=torch.int32),
        "spans": torch.tensor([list(span) if span else [-1, -1] for span in encoded.spans], dtype=torch.int32),
        "loss_mask": torch.tensor(encoded.loss_mask, dtype=torch.bool),
        "topk_ids": stats.topk_ids[row, :length].to(torch.int32),
        "topk_logprobs": stats.topk_logprobs[row, :length].to(torch.float16),
        "token_logprobs": token_logprobs,
        "boundary_logprobs": stats.boundary_logprobs[row, :length].float(),
    }


def run_teacher_logits(prepared_dir: Path, teacher_dir: Path, out_dir: Path, params: TeacherLogitsParams) -> dict:
    prepared = require_manifest(prepared_dir, "prepare")
    card = model_card(teacher_dir)
    config = {"prepared": prepared["splits"]["train"]["sha256"]["teacher"], "teacher": card,
              **params.model_dump(exclude={"batch_size"})}
    key = fingerprint(config)
    progress_path = out_dir / "progress.json"
    progress = read_json(progress_path) if progress_path.exists() else {}
    if progress.get("fingerprint") != key:
        shutil.rmtree(out_dir, ignore_errors=True)  # saved shards belong to another configuration
        progress = {"fingerprint": key, "done": {}}
    out_dir.mkdir(parents=True, exist_ok=True)

    records = read_jsonl(prepared_dir / "train.teacher.jsonl")
    per_shard = params.examples_per_shard
    shard_starts = list(range(0, len(records), per_shard))
    teacher: Teacher | None = None
    bar = tqdm(total=len(records), desc="teacher logits", unit="ex", initial=sum(v["n_examples"] for v in progress["done"].values()))
    for shard, start in enumerate(shard_starts):
        name = f"shard-{shard:05d}.safetensors"
        if name in progress["done"] and (out_dir / name).exists():
            continue
        teacher = teacher or Teacher.load(teacher_dir, params.dtype)
        examples = []
        chunk = records[start : start + per_shard]
        for offset in range(0, len(chunk), params.batch_size):
            batch = [Encoded.from_json(record) for record in chunk[offset : offset + params.batch_size]]
            ids, mask = pad_batch([encoded.input_ids for encoded in batch])
            stats = teacher.stats(ids, mask, params.temperature, params.top_k)
            examples += [_example_tensors(encoded, stats, row) for row, encoded in enumerate(batch)]
            bar.update(len(batch))
        write_shard(out_dir / name, examples)
        progress["done"][name] = {"n_examples": len(examples), "n_tokens": sum(len(e["input_ids"]) for e in examples),
                                  "first_index": start, "sha256": sha256_file(out_dir / name)}
        write_json(progress_path, progress)
    bar.close()

    shards = [{"file": name, **info} for name, info in sorted(progress["done"].items())]
    manifest = {
        "format": FORMAT, "teacher": card["name"], "tokenizer_sha256": card["tokenizer_sha256"],
        "vocab_size": card["tokenizer_size"], "top_k": params.top_k, "temperature": params.temperature,
        "dtype": params.dtype, "fields": list(FIELDS),
        "row_semantics": "row j is the teacher distribution after token j (it predicts token j+1)",
        "prepared_sha256": config["prepared"], "n_examples": sum(s["n_examples"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards), "shards": shards,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


class TeacherLogitsReader:
    """Random access to stored teacher examples by training-example index, checked against the manifest."""

    def __init__(self, directory: Path, required: tuple[str, ...], expected_prepared_sha256: str):
        self.directory = Path(directory)
        self.manifest = require_manifest(self.directory, "teacher_logits")
        missing = [field for field in required if field not in self.manifest["fields"]]
        if missing:
            raise ValueError(f"{directory}: stored teacher data lacks {missing}; rerun teacher_logits with a version that stores them")
        if self.manifest["prepared_sha256"] != expected_prepared_sha256:
            raise ValueError(f"{directory} was extracted from other prepared data: rerun 'dvc repro teacher_logits'")
        self._starts = [(shard["first_index"], shard["n_examples"], shard["file"]) for shard in self.manifest["shards"]]
        self._cache: tuple[str, list[dict[str, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return self.manifest["n_examples"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for first, count, name in self._starts:
            if first <= index < first + count:
                if self._cache is None or self._cache[0] != name:
                    self._cache = (name, read_shard(self.directory / name))
                return self._cache[1][index - first]
        raise IndexError(index)
