"""Benchmark: stored teacher logits. Bytes a token and fidelity of the compact encoding at several truncation
settings, and extraction throughput as a ratio to a bare teacher forward pass, in one run on real data.

Fidelity: for each (top_p, top_k), the exact truncated distribution (fp32 log-probs of the kept entries,
computed from the full-vocabulary softmax) is encoded, decoded, and both are renormalised over the kept set at
temperature tau; the table shows the mean over positions of KL(exact || decoded) at tau = 1 and tau = 2
(training may re-temper stored log-probs; the 7-bit values are companded for tau up to 2). "Naive" is an
int32 id plus an fp16 log-prob per kept entry (6 bytes an entry); "distribution" is what the encoding
writes for ids, values, counts and its id table; "shard" is everything a shard holds per token, including
ALM's fp32 observed-token and boundary log-probs, the tokens, spans and loss mask.

Throughput: the same batches through (a) `model(input_ids).logits`, the bare forward pass, and (b) the stage's
extraction (`run_teacher_logits`: chunked log-softmax, top-p/top-k, observed-token and boundary log-probs,
encoding, checksummed shard writes), alternating, each repeated; the ratio of median tokens a second is
reported. The teacher is loaded once, before timing.

With `--shape NAME` (a shape of bench/shapes.py, e.g. qwen2.5-0.5b) the teacher is a random-init model of that
shape, its tokenizer (trained here, then grown to the real tokenizer's length, so the extraction spans every
real row) and the prepared data (`--examples` synthetic examples of about `--tokens` tokens) are built in a
scratch folder: the GPU check, where real weights cannot travel. Random weights give near-uniform
distributions, so the fidelity table then describes those, not a trained model's; the throughput is the shape's.

Usage: python bench/logits.py [--teacher models/teacher] [--prepared data/prepared] [--examples 32]
       [--repeats 2] [--json results.json]   (run `dvc repro prepare` first; device: cuda when available)
       python bench/logits.py --shape qwen2.5-0.5b [--tokens 512] ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenbridge import logit_codec  # noqa: E402
from tokenbridge.config import HfModelSpec, RuntimeParams, TeacherLogitsParams  # noqa: E402
from tokenbridge.contracts import MANIFEST, ModelRef, PerRole, PreparedManifest, Splits, SplitSummary  # noqa: E402
from tokenbridge.data.padding import pad_batch  # noqa: E402
from tokenbridge.io import read_jsonl, sha256_file, write_jsonl  # noqa: E402
from tokenbridge.losses.token_stats import hidden_states, output_head  # noqa: E402
from tokenbridge.models import copy_tokenizer_files, materialize  # noqa: E402
from tokenbridge.runtime import Runtime  # noqa: E402
from tokenbridge.stages.teacher_logits import _process_teacher, run_teacher_logits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, build_model, grow_vocabulary, synthetic_examples, tokenizer_dirs  # noqa: E402

SETTINGS = ((1.0, 128), (1.0, 256), (1.0, 64), (0.99, 128), (0.95, 128), (0.95, 50))
TEMPERATURES = (1.0, 2.0)


def _subset(prepared: Path, out: Path, examples: int) -> list[list[int]]:
    """A prepared directory holding the first `examples` training examples (the stage's input contract)."""
    records = read_jsonl(prepared / "train.teacher.jsonl")[:examples]
    write_jsonl(out / "train.teacher.jsonl", records)
    sequences = [record["input_ids"] for record in records]
    # Only the teacher's side of the train split is real: extraction reads nothing else.
    train = SplitSummary(examples=len(records), dropped_too_long=0, dropped_unalignable=0,
                         tokens=PerRole[int](teacher=sum(map(len, sequences)), student=0),
                         sha256=PerRole[str](teacher=sha256_file(out / "train.teacher.jsonl"), student=""))
    nothing = SplitSummary(examples=0, dropped_too_long=0, dropped_unalignable=0,
                           tokens=PerRole[int](teacher=0, student=0), sha256=PerRole[str](teacher="", student=""))
    unnamed = ModelRef(name="bench", tokenizer_sha256="")
    PreparedManifest(source="bench", splits=Splits(train=train, test=nothing),
                     models=PerRole[ModelRef](teacher=unnamed, student=unnamed)).write(out / MANIFEST)
    return sequences


def synthetic_teacher(shape_name: str, root: Path, examples: int, tokens: int, runtime: Runtime) -> tuple[Path, Path]:
    """A random-init teacher of the named shape (weights in the runtime's inference dtype) with a tokenizer of
    the real length, and prepared data of synthetic examples in its tokenization: (teacher dir, prepared dir)."""
    shape = SHAPES[shape_name]
    role = "teacher" if shape.model_type.startswith("gemma") else "student"  # SentencePiece-style or byte-level
    tokenizer_dir = tokenizer_dirs(root / "tokenizers")[role]
    tokenizer = grow_vocabulary(tokenizer_dir, shape.tokenizer_size)
    source = root / "source"
    build_model(shape_name, runtime.device, runtime.inference_dtype).save_pretrained(source)
    copy_tokenizer_files(tokenizer_dir, source)
    materialize(HfModelSpec(source="hf", path=str(source)), root / "teacher", root / "cache")
    prepared = root / "prepared"
    encoded = synthetic_examples({role: tokenizer}, examples, tokens, seed=3)[role]
    write_jsonl(prepared / "train.teacher.jsonl", ({"index": n, **e.to_json()} for n, e in enumerate(encoded)))
    return root / "teacher", prepared


def _kl(exact: np.ndarray, decoded: np.ndarray, tau: float) -> np.ndarray:
    """Per-row KL(exact || decoded) after renormalising both at `tau` over the kept (finite) entries."""
    a, b = exact.astype(np.float64) / tau, decoded.astype(np.float64) / tau
    a -= np.logaddexp.reduce(a, 1, keepdims=True)
    b -= np.logaddexp.reduce(b, 1, keepdims=True)
    kept = np.isfinite(a)
    return np.where(kept, np.exp(np.where(kept, a, 0)) * (np.where(kept, a, 0) - np.where(kept, b, 0)), 0).sum(1)


def _sorted_by_id(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.where(np.isfinite(logprobs), ids, np.iinfo(np.int64).max), 1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


@torch.no_grad()
def fidelity(teacher, sequences: list[list[int]], batch_size: int) -> list[dict]:
    top = max(k for _, k in SETTINGS)
    ids_parts, value_parts = [], []
    head = output_head(teacher.model)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids, mask = pad_batch(batch)
        hidden = hidden_states(teacher.model, ids.to(teacher.boundary.device), mask.to(teacher.boundary.device))
        for row, sequence in enumerate(batch):
            logits = head(hidden[row, : len(sequence)])[:, : teacher.vocab_size].float()
            values, kept_ids = logits.log_softmax(-1).topk(top, dim=-1)
            ids_parts.append(kept_ids.cpu().numpy())
            value_parts.append(values.cpu().numpy())
    all_ids, all_values = np.concatenate(ids_parts), np.concatenate(value_parts)
    rows = []
    for top_p, top_k in SETTINGS:
        ids, values = all_ids[:, :top_k], all_values[:, :top_k]
        reach = (np.cumsum(np.exp(values.astype(np.float64)), 1) < top_p).sum(1) + 1
        counts = np.full(len(ids), top_k) if top_p >= 1 else np.minimum(reach, top_k)
        started = time.perf_counter()
        streams = logit_codec.encode(ids, values, counts)
        encode_seconds = time.perf_counter() - started
        decoded_ids, decoded = logit_codec.decode(streams)
        exact = np.where(np.arange(top_k) < counts[:, None], values, -np.inf)
        exact_ids, exact_sorted = _sorted_by_id(ids, exact)
        decoded_ids, decoded_sorted = _sorted_by_id(decoded_ids, decoded)
        width = decoded_sorted.shape[1]
        assert (np.where(np.isfinite(exact_sorted[:, :width]), exact_ids[:, :width] - decoded_ids, 0) == 0).all()
        n = len(counts)
        rows.append({
            "top_p": top_p, "top_k": top_k, "positions": n, "mean_kept": float(counts.mean()),
            "naive_bytes_per_token": 6 * float(counts.mean()),
            "bytes_per_token": logit_codec.encoded_bytes(streams) / n,
            **{f"kl_tau{tau:g}": float(_kl(exact_sorted[:, :width], decoded_sorted, tau).mean())
               for tau in TEMPERATURES},
            "encode_tokens_per_second": n / encode_seconds,
        })
    return rows


@torch.no_grad()
def bare_forward_seconds(teacher, sequences: list[list[int]], batch_size: int) -> float:
    device = teacher.boundary.device
    started = time.perf_counter()
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[start : start + batch_size])
        _ = teacher.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # timed, not used
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="a random-init teacher of this shape on synthetic data, instead of --teacher/--prepared")
    parser.add_argument("--tokens", type=int, default=512, help="--shape: tokens an example (template included)")
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as runtime.device")
    parser.add_argument("--precision", choices=("auto", "bf16-mixed", "fp32"), default="auto",
                        help="as runtime.precision (the teacher runs in its inference dtype)")
    args = parser.parse_args()
    runtime = Runtime.resolve(RuntimeParams(device=args.device, precision=args.precision))
    with tempfile.TemporaryDirectory() as scratch:
        if args.shape:
            args.teacher, args.prepared = synthetic_teacher(args.shape, Path(scratch) / "synthetic", args.examples,
                                                            args.tokens, runtime)
        if not (args.prepared / "train.teacher.jsonl").exists():
            sys.exit(f"{args.prepared}/train.teacher.jsonl is missing: run 'dvc repro prepare' first")
        result = measure(args, runtime, Path(scratch))
    print(markdown(result, args.repeats))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def measure(args: argparse.Namespace, runtime: Runtime, scratch: Path) -> dict:
    params = TeacherLogitsParams(top_p=1.0, top_k=128, temperature=1.0, batch_size=args.batch_size,
                                 examples_per_shard=args.examples)
    # The extraction below reuses this teacher (one per process).
    teacher = _process_teacher(args.teacher, runtime.inference_dtype_name, str(runtime.device))
    prepared = scratch / "prepared"
    prepared.mkdir()
    sequences = _subset(args.prepared, prepared, args.examples)
    tokens = sum(len(s) for s in sequences)
    rows = fidelity(teacher, sequences, args.batch_size)
    forward, extract, manifest = [], [], None
    for repeat in range(args.repeats):
        forward.append(tokens / bare_forward_seconds(teacher, sequences, args.batch_size))
        started = time.perf_counter()
        manifest = run_teacher_logits(prepared, args.teacher, scratch / f"logits-{repeat}", params, runtime)
        extract.append(tokens / (time.perf_counter() - started))
    return {
        "machine": f"{runtime.describe()['device_name']}, {torch.get_num_threads()} threads, "
                   f"device {runtime.device.type}",
        "teacher": f"random-init {args.shape} (synthetic data)" if args.shape else str(args.teacher),
        "shape": args.shape, "vocab_size": teacher.vocab_size, "dtype": runtime.inference_dtype_name,
        "examples": args.examples, "tokens": tokens, "batch_size": args.batch_size, "repeats": args.repeats,
        "settings": rows,
        "forward_tokens_per_second": statistics.median(forward),
        "extract_tokens_per_second": statistics.median(extract),
        "throughput_ratio": statistics.median(extract) / statistics.median(forward),
        "stage_shard_bytes_per_token_at_k128": manifest.bytes_per_token if manifest else None,
    }


def markdown(result: dict, repeats: int) -> str:
    lines = [f"# stored teacher logits: {result['teacher']}, vocabulary {result['vocab_size']}, {result['tokens']} "
             f"positions, {result['machine']}, {result['dtype']}", "",
             "| top_p | top_k | mean kept | naive B/token | encoded B/token | x smaller | KL tau=1 | KL tau=2 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["settings"]:
        lines.append(f"| {row['top_p']} | {row['top_k']} | {row['mean_kept']:.1f} | "
                     f"{row['naive_bytes_per_token']:.0f} | "
                     f"{row['bytes_per_token']:.1f} | {row['naive_bytes_per_token'] / row['bytes_per_token']:.1f} | "
                     f"{row['kl_tau1']:.1e} | {row['kl_tau2']:.1e} |")
    lines += ["", f"Whole shard (top-1.0-128, with ALM's per-token fields): "
                  f"{result['stage_shard_bytes_per_token_at_k128']:.1f} B/token",
              f"Throughput: bare forward {result['forward_tokens_per_second']:.0f} tokens/s, extraction "
              f"{result['extract_tokens_per_second']:.0f} tokens/s: ratio {result['throughput_ratio']:.2f} "
              f"(median of {repeats})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
