"""Token-by-token decoding of a batch of left-padded prompts with a KV cache: the student's on-policy samples
(`tokenbridge.on_policy`) and the ensemble's `generate`.

One forward pass over the prompts fills the cache; every later step feeds one token per row. Rows that
finished (an end-of-sequence id, or `stopping_criteria`) are padded until every row has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Pick = Callable[[torch.Tensor], torch.Tensor]  # last-position scores [B, V] -> next ids [B]


class StepOutput(Protocol):
    """What one forward of the decoded model returns (any transformers causal LM's output)."""

    @property
    def logits(self) -> torch.Tensor: ...  # [B, L, V]

    @property
    def past_key_values(self) -> object: ...  # the KV cache, passed back as it is


def sample_next(scores: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row from softmax(scores / temperature), restricted to the top-p nucleus when top_p < 1."""
    probs = (scores.float() / temperature).softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(model: Callable[..., StepOutput], input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           pick: Pick, eos_ids: set[int], pad_id: int,
           stopping_criteria: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Prompts [B, L] (left-padded) -> [B, L + n] with n <= max_new_tokens new columns; a row's tokens after
    its end are `pad_id`. `model(ids, attention_mask=, position_ids=, past_key_values=, use_cache=True)` must
    return `.logits` and `.past_key_values` (any transformers causal LM does)."""
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=input_ids.device)
    sequences, mask = input_ids, attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache: object = None
    step_ids = input_ids
    for _ in range(max_new_tokens):
        out = model(step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache, scores = out.past_key_values, out.logits[:, -1]
        following = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), pick(scores))
        sequences = torch.cat([sequences, following[:, None]], 1)
        done |= torch.isin(following, eos)
        if stopping_criteria is not None:
            done |= torch.as_tensor(stopping_criteria(sequences, scores), dtype=torch.bool).expand_as(done)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions, step_ids = positions[:, -1:] + 1, following[:, None]
    return sequences


def generation_end_ids(model: PreTrainedModel) -> set[int]:
    """The ids that end a model's turn in its generation config (one id or a list: chat models often list several)."""
    ids = model.generation_config.eos_token_id
    return set(ids if isinstance(ids, list) else [ids]) - {None}


def completions(sequences: torch.Tensor, prompt_width: int, eos_ids: set[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first end-of-sequence id (the padding after it dropped)."""
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        end = next((index + 1 for index, token in enumerate(row) if token in eos_ids), len(row))
        rows.append(row[:end])
    return rows
