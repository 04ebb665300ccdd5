"""Per-position statistics of a model's next-token distribution, computed in chunks of positions.

Vocabularies reach 262k rows, so a full fp32 [B, T, V] log-softmax is never materialised: the output
head runs on a slice of positions at a time (`positions.map_positions`, checkpointed under gradients), in
fp32, and only [B, T] (or [B, T, k]) results are kept.

Row convention (shared with the stored teacher logits): row `j` describes the distribution *after* token
`j`, i.e. the prediction of token `j + 1`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenbridge.losses.positions import map_positions

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class NextTokenStats:
    token_logprobs: torch.Tensor  # [B, T] log p(x_{j+1} | x_{<=j}); the last row is 0 (nothing to predict)
    boundary_logprobs: torch.Tensor | None  # [B, T] log P(token j+1 starts a word or is special); None: not asked
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logprobs: torch.Tensor | None = None  # [B, T, k], descending
    topk_counts: torch.Tensor | None = None  # [B, T]: entries kept by top-p (at T = 1), at most k


def output_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits, including the final soft-capping some families (Gemma) apply."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda hidden: torch.tanh(head(hidden) / cap) * cap
    return head


def hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states, without running the output head over the whole sequence."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _slice_stats(
    hidden: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int, boundary: torch.Tensor | None, temperature: float,
) -> tuple[torch.Tensor, ...]:
    # Padded embedding rows (Qwen2.5: 151,936 rows for a smaller tokenizer) are sliced off before the
    # softmax, or probability mass would leak to tokens that do not exist.
    logits = head(hidden)[..., :vocab_size].float()
    logits = logits / temperature if temperature != 1 else logits
    log_norm = torch.logsumexp(logits, dim=-1)
    token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    outputs: tuple[torch.Tensor, ...] = (token.clamp(max=0.0),)
    if boundary is not None:
        on_boundary = torch.logsumexp(logits.masked_fill(~boundary[:vocab_size], float("-inf")), dim=-1) - log_norm
        outputs += (on_boundary.clamp(max=0.0),)
    return outputs


def next_token_stats(
    hidden: torch.Tensor, input_ids: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int, boundary_mask: torch.Tensor | None, temperature: float = 1.0, chunk_size: int = 128,
) -> NextTokenStats:
    """Next-token log-probs of the observed tokens and boundary log-probs (unless `boundary_mask` is None),
    chunk by chunk.

    Ask for boundary log-probs only when a loss uses them: under gradients a checkpointed slice keeps the
    recomputed tensors of every output until the graph is freed, so an unused output costs a slice of
    [B, c, V] memory per slice.
    """
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    boundary = None if boundary_mask is None else boundary_mask.to(hidden.device)
    rows = map_positions(_slice_stats, [hidden, targets], chunk_size, head, vocab_size, boundary, temperature)
    rows[0][:, -1] = 0.0
    return NextTokenStats(rows[0], None if boundary is None else rows[1])


class _OnlineLogSumExp:
    """Row-wise log-sum-exp over vocabulary blocks seen one at a time, with one sum per weight column (all
    ones: the normaliser; the boundary mask: the boundary mass). Sums are kept relative to the running
    maximum and rescaled when it rises, so no block's exp overflows or underflows."""

    def __init__(self, rows: int, columns: int, device: torch.device):
        self.maximum = torch.full((rows, 1), float("-inf"), device=device)
        self.sums = torch.zeros(rows, columns, device=device)

    def add(self, logits: torch.Tensor, block_maximum: torch.Tensor, weights: torch.Tensor) -> None:
        """`logits` [N, Vb] fp32 is consumed (exponentiated in place); `weights` is [Vb, columns]."""
        maximum = torch.maximum(self.maximum, block_maximum)
        self.sums = self.sums * (self.maximum - maximum).exp() + logits.sub_(maximum).exp_() @ weights
        self.maximum = maximum

    def log(self) -> torch.Tensor:
        return self.maximum + self.sums.log()


def _head_blocks(model: PreTrainedModel, hidden: torch.Tensor, vocab_size: int, block: int
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits[N, block]) over the real vocabulary rows of the output head (padded rows are never
    computed), with the final soft-capping some families (Gemma) apply."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    for start in range(0, vocab_size, block):
        stop = min(start + block, vocab_size)
        bias = None if head.bias is None else head.bias[start:stop]
        logits = torch.nn.functional.linear(hidden, head.weight[start:stop], bias)
        yield start, torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def truncated_next_token_stats(
    hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, model: PreTrainedModel,
    vocab_size: int, boundary_mask: torch.Tensor, temperature: float, top_k: int, top_p: float,
    block_elements: int = 2**25,
) -> NextTokenStats:
    """The extraction path (a teacher, no gradient): observed-token and boundary log-probs, the top-k after a
    top-p cut (at T = 1) and its size, at `temperature`, for the real (unpadded) positions only.

    The output head streams over blocks of vocabulary rows, so each block's [N, Vb] logits are used while
    still in cache: a block top-k, an online log-sum-exp with the boundary mass, and the observed tokens'
    logits; a last top-k merges the blocks' candidates. Separate passes over whole [N, V] logits cost as
    much as the forward pass itself on a CPU (bench/logits.py). At most `block_elements` logits are alive.
    """
    device = hidden.device
    real = attention_mask.bool()
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)[real]
    rows = hidden[real]
    block = max(top_k, block_elements // max(len(rows), 1))
    weights = torch.stack([torch.ones(vocab_size, device=device), boundary_mask[:vocab_size].float()], -1)
    tempered = _OnlineLogSumExp(len(rows), 2, device)
    # Top-p is cut on the untempered distribution, so the temperature never changes what is kept.
    untempered = _OnlineLogSumExp(len(rows), 1, device) if temperature != 1 and top_p < 1 else None
    token = torch.zeros(len(rows), device=device)
    candidates, candidate_ids = [], []
    for start, logits in _head_blocks(model, rows, vocab_size, block):
        values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        candidates.append(values)
        candidate_ids.append(ids + start)
        inside = ((targets >= start) & (targets < start + logits.shape[-1])).nonzero().squeeze(1)
        token[inside] = logits[inside, targets[inside] - start].float()
        block_maximum, logits = values[:, :1].float(), logits.float()
        if untempered is not None:
            untempered.add(logits.clone(), block_maximum, weights[start : start + logits.shape[-1], :1])
        if temperature != 1:
            logits.div_(temperature)
        tempered.add(logits, block_maximum / temperature, weights[start : start + logits.shape[-1]])
    values, order = torch.cat(candidates, 1).topk(top_k, dim=-1)
    ids = torch.cat(candidate_ids, 1).gather(1, order)
    log_sums = tempered.log()
    topk_logprobs = (values.float() / temperature - log_sums[:, :1]).clamp(max=0.0)
    if top_p >= 1:
        counts = torch.full((len(rows),), top_k, dtype=torch.long, device=device)
    else:
        kept = topk_logprobs.exp() if untempered is None else (values.float() - untempered.log()).exp()
        counts = ((kept.cumsum(-1) < top_p).sum(-1) + 1).clamp(max=top_k)

    def padded(per_row: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*real.shape, *per_row.shape[1:], dtype=per_row.dtype, device=device)
        out[real] = per_row
        return out

    token_logprobs = padded((token / temperature - log_sums[:, 0]).clamp(max=0.0))
    token_logprobs[:, -1] = 0.0
    return NextTokenStats(token_logprobs, padded((log_sums[:, 1] - log_sums[:, 0]).clamp(max=0.0)),
                          padded(ids), padded(topk_logprobs), padded(counts))
