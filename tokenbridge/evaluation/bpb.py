"""Held-out bits-per-byte: a likelihood metric comparable across tokenizers.

Bits are summed over a model's target tokens (the answer and its end-of-turn token, in that model's own
chat format) and divided by the bytes those tokens cover on the common byte stream (the end-of-turn
token counts as one byte). Dividing by bytes, not tokens, makes models with different vocabularies
comparable. Always fp32 (a likelihood metric needs the precision), on the runtime's device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import tokenbridge.models.ensemble  # noqa: F401  registers the ensemble model type, so an ensemble loads like any model
from tokenbridge.data.chat import Encoded
from tokenbridge.data.padding import pad_batch
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


@torch.no_grad()
def bits_per_byte(model_dir: Path, encoded_jsonl: Path, n_examples: int, device: torch.device,
                  batch_size: int = 4) -> dict[str, float]:
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.float32).eval().to(device)
    examples = [Encoded.from_json(record) for record in read_jsonl(encoded_jsonl)[:n_examples]]
    nats = 0.0
    n_bytes = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, attention = pad_batch([example.input_ids for example in batch])
        rows = _row_logprobs(model, ids.to(device), attention.to(device), len(tokenizer))
        token_logprobs = rows_to_tokens(rows).cpu()
        for row, example in enumerate(batch):
            for position, (span, target) in enumerate(zip(example.spans, example.loss_mask)):
                if target and position > 0:
                    assert span is not None, "a target token always covers bytes of the stream"
                    nats -= token_logprobs[row, position].item()
                    n_bytes += span[1] - span[0]
    return {"bits_per_byte": nats / math.log(2) / max(n_bytes, 1), "bpb_bytes": n_bytes}
