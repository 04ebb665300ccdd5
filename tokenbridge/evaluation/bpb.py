"""Held-out bits-per-byte: a likelihood metric comparable across tokenizers.

Bits are summed over a model's target tokens (the answer and its end-of-turn token, in that model's own
chat format) and divided by the bytes those tokens cover on the common byte stream (the end-of-turn
token counts as one byte). Dividing by bytes, not tokens, makes models with different vocabularies
comparable. Always fp32 (a likelihood metric needs the precision), on the runtime's device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import tokenbridge.models.ensemble  # noqa: F401  registers the ensemble model type, so an ensemble loads like any model
from tokenbridge.alignment import counted_chunks
from tokenbridge.data.chat import Encoded
from tokenbridge.data.padding import pad_batch
from tokenbridge.intervals import bootstrap_interval
from tokenbridge.io import read_jsonl
from tokenbridge.losses.positions import rows_to_tokens
from tokenbridge.losses.token_stats import hidden_states, next_token_stats, output_head
from tokenbridge.models import load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _row_logprobs(model: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(x_{j+1} | x_{<=j}) per row. A model without a single output head (an ensemble) returns its
    log-probs as logits; any other model's head runs in chunks of positions."""
    if model.get_output_embeddings() is None:
        logprobs = model(input_ids=ids, attention_mask=attention).logits.log_softmax(-1)
        rows = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.cat([rows, torch.zeros_like(rows[:, :1])], 1)
    stats = next_token_stats(hidden_states(model, ids, attention), ids, output_head(model), vocab_size, None)
    return stats.token_logprobs


def token_logprobs(model_dir: Path, examples: list[Encoded], device: torch.device,
                   batch_size: int = 4) -> list[list[float]]:
    """Per example, log p(token | the tokens before it) at each position (0.0 at position 0, which nothing
    predicts), in fp32."""
    model = load_model(model_dir, torch.float32).eval().to(device)
    return model_token_logprobs(model, examples, len(load_tokenizer(model_dir)), device, batch_size)


@torch.no_grad()
def model_token_logprobs(model: PreTrainedModel, examples: list[Encoded], vocab_size: int, device: torch.device,
                         batch_size: int = 4) -> list[list[float]]:
    """`token_logprobs` of a model in memory (in eval mode, fp32 weights; a model in training scores itself)."""
    out = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, attention = pad_batch([example.input_ids for example in batch])
        rows = rows_to_tokens(_row_logprobs(model, ids.to(device), attention.to(device), vocab_size)).cpu()
        out += [rows[row, : len(example.input_ids)].tolist() for row, example in enumerate(batch)]
    return out


EXAMPLES = "examples"  # the key under which a score's per-example [bits, bytes] travel (per_example.json)


def _bits_per_byte_and_interval(name: str, nats: list[float], n_bytes: list[int]) -> dict[str, Any]:
    """`name` (bits per byte over all examples), its 95 % bootstrap interval (`<name>_low`, `<name>_high`) and, under
    `EXAMPLES`, each example's [bits, bytes] (for paired comparisons of models scored on the same examples)."""
    low, high = bootstrap_interval(nats, n_bytes)
    return {name: math.fsum(nats) / math.log(2) / max(sum(n_bytes), 1), f"{name}_low": low, f"{name}_high": high,
            EXAMPLES: {name: [[value / math.log(2), size] for value, size in zip(nats, n_bytes)]}}


def bits_per_byte(model_dir: Path, encoded_jsonl: Path, n_examples: int, device: torch.device,
                  batch_size: int = 4) -> dict[str, Any]:
    """Bits-per-byte over the first `n_examples` test answers, with its 95 % bootstrap interval over them
    (`bits_per_byte_low`, `bits_per_byte_high`)."""
    examples = [Encoded.from_json(record) for record in read_jsonl(encoded_jsonl)[:n_examples]]
    return bits_per_byte_of(examples, token_logprobs(model_dir, examples, device, batch_size))


def bits_per_byte_of(examples: list[Encoded], logprobs: list[list[float]], name: str = "bits_per_byte",
                     bytes_name: str = "bpb_bytes") -> dict[str, Any]:
    """Bits-per-byte of the examples' targets (answer and end of turn) from their token log-probs, as `name`,
    with its interval (`<name>_low`, `<name>_high`), the bytes scored (`bytes_name`) and the per-example parts
    (`EXAMPLES`)."""
    nats = [0.0] * len(examples)
    n_bytes = [0] * len(examples)
    for index, example in enumerate(examples):
        for position, (span, target) in enumerate(zip(example.spans, example.loss_mask)):
            if target and position > 0:
                assert span is not None, "a target token always covers bytes of the stream"
                nats[index] -= logprobs[index][position]
                n_bytes[index] += span[1] - span[0]
    return {**_bits_per_byte_and_interval(name, nats, n_bytes), bytes_name: sum(n_bytes)}


def chunk_gap(teacher: list[Encoded], teacher_logprobs: list[list[float]], student: list[Encoded],
              student_logprobs: list[list[float]], name: str = "chunk_gap_bits_per_byte") -> dict[str, Any]:
    """How far the student's likelihoods are from the teacher's, comparable across tokenizers: over the answer's
    byte-exact target chunks (`alignment.counted_chunks`: minimal token spans of the two tokenizations covering
    the same bytes, as ALM trains on them), the absolute difference of the two chunk log-likelihoods, in bits per
    byte of the chunks, with its 95 % bootstrap interval over the answers (`chunk_gap_bits_per_byte`, `_low`,
    `_high`). 0 exactly when the student gives every chunk the teacher's likelihood; the quantity ALM's loss
    drives down. `name`: the score's name."""
    gaps, n_bytes = [0.0] * len(teacher), [0] * len(teacher)
    for index, (t, s) in enumerate(zip(teacher, student)):
        for chunk, target in counted_chunks(t, s):
            if not target:
                continue  # the question or the template: not the answer
            teacher_nats = math.fsum(teacher_logprobs[index][chunk.t0 : chunk.t1])
            student_nats = math.fsum(student_logprobs[index][chunk.s0 : chunk.s1])
            gaps[index] += abs(teacher_nats - student_nats)
            n_bytes[index] += chunk.b1 - chunk.b0
    return _bits_per_byte_and_interval(name, gaps, n_bytes)
