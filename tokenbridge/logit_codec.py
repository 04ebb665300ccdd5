"""Compact, lossy-by-design encoding of truncated teacher distributions (docs/stored-logits.md).

Per position `t` the extraction keeps `n_t <= k` entries (top-p, then top-k) with their log-probs, normalised
over the full vocabulary (so `1 - sum(exp)` is the missing mass). The naive layout, an int32 id and an fp16
log-prob per entry, costs 6 bytes an entry: 768 bytes a token at k = 128. This encoding spends about 1.4:

- **ids** are stored as a *set*: their order carries no information once the values travel with them. Each
  id is replaced by its rank in the shard's own id-frequency table (ids the teacher proposes often get small
  ranks), each position's ranks are sorted, and the gaps between them are written as uint8 (255 escapes to a
  uint32 side stream). Lossless; about 6 bits an id instead of 32 on a 150k vocabulary.
- **values** are probabilities companded as `p ** (1/4)` and rounded to 7 bits, in the same order. Companding
  with `p ** (1 / (2 * tau))` makes the quantisation error's contribution to KL the same for every entry of
  the distribution re-tempered at `tau`; the 1/4 keeps training-time re-tempering up to tau = 2 (the
  pre-training-distillation recommendation) faithful, at the cost of a few bits over `sqrt` at tau = 1.
- per-position counts and the frequency table (the shard's used ids and how often each was kept).

Every stream is zstd-compressed. `bench/logits.py` measures bytes a token and the KL divergence between the
decoded and the exact truncated distribution.
"""

from __future__ import annotations

import numpy as np
import zstandard

LEVELS = 127  # 7-bit codes 0..127; 8 bits cost ~10% more bytes for ~4x lower KL (measured: docs/stored-logits.md)
COMPANDING = 4.0  # codes quantise p ** (1 / COMPANDING)
ZSTD_LEVEL = 3
ID_ZSTD_LEVEL = 9  # the id gaps are the largest stream; level 9 saves ~5% at ~40 MB/s
_SMALLEST = 0.25 / LEVELS  # code 0 decodes here (a quarter step), never to probability 0


def compress(array: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """An array's bytes, zstd-compressed (the shard writer stores its plain per-token fields this way too)."""
    return zstandard.ZstdCompressor(level=level).compress(np.ascontiguousarray(array).tobytes())


def decompress(blob: bytes, dtype: type) -> np.ndarray:
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(blob), dtype=dtype)


def encode(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray) -> dict[str, bytes]:
    """[N, k] ids and full-vocabulary log-probs, of which row `t` keeps its first `counts[t]` -> named streams."""
    kept = np.arange(ids.shape[1])[None, :] < counts[:, None]
    frequency = np.bincount(ids[kept])
    used = np.flatnonzero(frequency)
    by_frequency = used[np.argsort(-frequency[used], kind="stable")]  # ties by id: the decoder rebuilds it
    rank_of = np.zeros(len(frequency), dtype=np.int64)
    rank_of[by_frequency] = np.arange(len(used))
    codes = np.rint(np.exp(logprobs.astype(np.float64) / COMPANDING) * LEVELS).clip(0, LEVELS).astype(np.int64)
    # One sort orders each row's ranks and carries the codes along: key = rank * 256 + code.
    keys = np.where(kept, (rank_of[np.where(kept, ids, 0)] << 8) | codes, np.iinfo(np.int64).max)
    keys.sort(axis=1)
    gaps = (np.diff(keys >> 8, axis=1, prepend=-1) - 1)[kept]
    escapes = gaps[gaps >= 255]
    return {
        "counts": compress(counts.astype(np.uint16)),
        "table_gaps": compress((np.diff(used, prepend=-1) - 1).astype(np.uint32)),
        "table_frequency": compress(frequency[used].astype(np.uint32)),
        "id_gaps": compress(np.minimum(gaps, 255).astype(np.uint8), ID_ZSTD_LEVEL),
        "id_gap_escapes_low": compress((escapes & 0xFFFF).astype(np.uint16)),
        "id_gap_escapes_high": compress((escapes >> 16).astype(np.uint8)),
        "values": compress((keys & 0xFF)[kept].astype(np.uint8)),
    }


def decode(streams: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Named streams -> [N, max count] ids (int64) and log-probs (float32), most probable first, each row padded
    with (id 0, -inf) after its kept entries."""
    counts = decompress(streams["counts"], np.uint16).astype(np.int64)
    used = np.cumsum(decompress(streams["table_gaps"], np.uint32).astype(np.int64) + 1) - 1
    frequency = decompress(streams["table_frequency"], np.uint32).astype(np.int64)
    by_frequency = used[np.argsort(-frequency, kind="stable")]
    gaps = decompress(streams["id_gaps"], np.uint8).astype(np.int64)
    gaps[gaps == 255] = (decompress(streams["id_gap_escapes_low"], np.uint16).astype(np.int64)
                         | decompress(streams["id_gap_escapes_high"], np.uint8).astype(np.int64) << 16)
    steps = gaps + 1
    starts = np.cumsum(counts) - counts
    running = np.cumsum(steps)
    # Each row's ranks restart from -1: subtract the running total reached just before the row's first entry.
    ranks = running - np.repeat(running[starts] - steps[starts], counts) - 1
    codes = decompress(streams["values"], np.uint8).astype(np.float64)
    kept = np.arange(int(counts.max(initial=1)))[None, :] < counts[:, None]
    ids = np.zeros(kept.shape, dtype=np.int64)
    logprobs = np.full(kept.shape, -np.inf, dtype=np.float32)
    ids[kept] = by_frequency[ranks]
    logprobs[kept] = COMPANDING * np.log(np.where(codes == 0, _SMALLEST, codes / LEVELS))
    order = np.argsort(-logprobs, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def encoded_bytes(streams: dict[str, bytes]) -> int:
    return sum(len(blob) for blob in streams.values())
