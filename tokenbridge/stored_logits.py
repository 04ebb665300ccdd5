"""Stored teacher logits on disk: the contract between the `teacher_logits` stage, which writes it, and
training, which reads it (`tokenbridge.training.teachers.StoredTeacher`).

Layout (`data/teacher_logits/`): `plan.json` (what the shards belong to), `shard-00000.safetensors` (every
field a zstd-compressed byte stream; examples concatenated with an `offsets` index), its sidecar
`shard-00000.json` (checksum, counts, who extracted it), and `manifest.json` (what was stored, how, from what,
every shard's checksum). Fields per teacher position `j` (row `j` predicts token `j + 1`): the truncated
distribution as `topk_ids` / `topk_logprobs` (padded with (0, -inf)), `token_logprobs` (the observed next
token), `boundary_logprobs` (next token starts a word or is special), and the teacher's tokens, byte spans and
loss mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenbridge import logit_codec
from tokenbridge.contracts import MANIFEST, TEACHER_LOGITS_FORMAT, ModelCard, TeacherLogitsManifest
from tokenbridge.data.chat import Encoded
from tokenbridge.io import atomic_path, sha256_file

FIELDS = ("input_ids", "spans", "loss_mask", "topk_ids", "topk_logprobs", "token_logprobs", "boundary_logprobs")
# Per-token fields stored as plain (compressed) arrays; the distribution goes through the codec.
_PLAIN = {"input_ids": np.int32, "spans": np.int32, "loss_mask": np.uint8, "token_logprobs": np.float32,
          "boundary_logprobs": np.float32}
_CODEC_PREFIX = "distribution."


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
        save_file(tensors, str(temporary), metadata={"format": TEACHER_LOGITS_FORMAT})
    return logit_codec.encoded_bytes(distribution)


def read_shard(path: Path, expected_sha256: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Verify (when a checksum is given), decompress and split a shard into examples."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rerun 'dvc repro teacher_logits': it re-extracts the shards the "
                                "manifest lists but the folder lacks")
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
                 teacher_card: ModelCard | None = None):
        self.directory = Path(directory)
        self.manifest = TeacherLogitsManifest.read(self.directory / MANIFEST)
        missing = [field for field in required if field not in self.manifest.fields]
        if missing:
            raise ValueError(f"{directory}: stored teacher data lacks {missing}; rerun teacher_logits with a version "
                             "that stores them")
        if self.manifest.prepared_sha256 != expected_prepared_sha256:
            raise ValueError(f"{directory} was extracted from other prepared data: rerun 'dvc repro teacher_logits'")
        if teacher_card is not None:
            for label, stored, configured in (
                    ("tokenizer sha256", self.manifest.tokenizer_sha256, teacher_card.tokenizer_sha256),
                    ("vocabulary size", self.manifest.vocab_size, teacher_card.tokenizer_size)):
                if stored != configured:
                    raise ValueError(f"{directory} was extracted with a teacher whose {label} is {stored}, but the "
                                     f"configured teacher's is {configured}: rerun 'dvc repro teacher_logits' "
                                     "(or point models.teacher at the teacher the logits came from)")
        self._shards = self.manifest.shards
        self._cache: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self.shard_reads = 0

    def __len__(self) -> int:
        return self.manifest.n_examples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for number, shard in enumerate(self._shards):
            if shard.holds(index):
                if self._cache is None or self._cache[0] != number:
                    self._cache = None  # drop the previous shard before decoding the next
                    self._cache = (number, read_shard(self.directory / shard.file, shard.sha256))
                    self.shard_reads += 1
                return self._cache[1][index - shard.first_index]
        raise IndexError(index)
