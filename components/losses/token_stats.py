"""Per-position statistics of a model's next-token distribution, computed in chunks of positions.

Vocabularies reach 262k rows, so a full fp32 [B, T, V] log-softmax is never materialised: the output
head runs on a slice of positions at a time (`positions.map_positions`, checkpointed under gradients), in
fp32, and only [B, T] (or [B, T, k]) results are kept.

Row convention (shared with the stored teacher logits): row `j` describes the distribution *after* token
`j`, i.e. the prediction of token `j + 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from components.losses.positions import map_positions


@dataclass
class NextTokenStats:
    token_logprobs: torch.Tensor  # [B, T] log p(x_{j+1} | x_{<=j}); the last row is 0 (nothing to predict)
    boundary_logprobs: torch.Tensor | None  # [B, T] log P(token j+1 starts a word or is special); None: not asked
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logprobs: torch.Tensor | None = None  # [B, T, k], descending
    topk_counts: torch.Tensor | None = None  # [B, T]: entries kept by top-p (at T = 1), at most k


def output_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits, including the final soft-capping some families (Gemma) apply."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda hidden: torch.tanh(head(hidden) / cap) * cap
    return head


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states, without running the output head over the whole sequence."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _slice_stats(
    hidden: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int, boundary: torch.Tensor | None, temperature: float, top_k: int, top_p: float,
) -> tuple[torch.Tensor, ...]:
    # Padded embedding rows (Qwen2.5: 151,936 rows for a smaller tokenizer) are sliced off before the
    # softmax, or probability mass would leak to tokens that do not exist.
    raw = head(hidden)[..., :vocab_size].float()
    if top_k:
        return _truncated_slice_stats(raw, targets, boundary, temperature, top_k, top_p)
    logits = raw / temperature if temperature != 1 else raw
    log_norm = torch.logsumexp(logits, dim=-1)
    token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    outputs: tuple[torch.Tensor, ...] = (token.clamp(max=0.0),)
    if boundary is not None:
        on_boundary = torch.logsumexp(logits.masked_fill(~boundary[:vocab_size], float("-inf")), dim=-1) - log_norm
        outputs += (on_boundary.clamp(max=0.0),)
    return outputs


@torch.no_grad()
def _truncated_slice_stats(raw: torch.Tensor, targets: torch.Tensor, boundary: torch.Tensor | None,
                           temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, ...]:
    """The extraction path (a teacher, no gradient): one in-place exp pass over the slice serves the normaliser,
    the boundary mass and the top-p cut. Separate masked log-sum-exp passes cost as much as the forward pass
    itself on a CPU (bench/logits.py)."""
    untempered_norm = torch.logsumexp(raw, -1, keepdim=True) if temperature != 1 and top_p < 1 else None
    logits = raw.div_(temperature) if temperature != 1 else raw
    values, ids = logits.topk(top_k, dim=-1)
    token = logits.gather(-1, targets.unsqueeze(-1))
    probs = logits.sub_(values[..., :1]).exp_()  # unnormalised, relative to the maximum; `logits` is consumed
    # One matmul sums the whole row and its boundary tokens: [.., V] @ [V, 2].
    columns = [torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)]
    if boundary is not None:
        columns.append(boundary[: probs.shape[-1]].to(probs.dtype))
    log_sums = (probs @ torch.stack(columns, -1)).log()
    log_norm = values[..., :1] + log_sums[..., :1]
    outputs: tuple[torch.Tensor, ...] = ((token - log_norm).squeeze(-1).clamp(max=0.0),)
    if boundary is not None:
        outputs += ((log_sums[..., 1] - log_sums[..., 0]).clamp(max=0.0),)
    topk_logprobs = (values - log_norm).clamp(max=0.0)
    if top_p >= 1:
        counts = torch.full(values.shape[:-1], top_k, dtype=torch.long, device=values.device)
    else:
        # Top-p is cut on the untempered distribution, so the temperature never changes what is kept (spec 2.3).
        kept = topk_logprobs.exp() if untempered_norm is None else (values * temperature - untempered_norm).exp()
        counts = ((kept.cumsum(-1) < top_p).sum(-1) + 1).clamp(max=top_k)
    return (*outputs, ids, topk_logprobs, counts)


def next_token_stats(
    hidden: torch.Tensor, input_ids: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int, boundary_mask: torch.Tensor | None, temperature: float = 1.0, top_k: int = 0,
    chunk_size: int = 128, top_p: float = 1.0,
) -> NextTokenStats:
    """Next-token log-probs of the observed tokens, boundary log-probs (unless `boundary_mask` is None) and
    optional top-k (with how many entries top-p keeps), chunk by chunk.

    Ask for boundary log-probs only when a loss uses them: under gradients a checkpointed slice keeps the
    recomputed tensors of every output until the graph is freed, so an unused output costs a slice of
    [B, c, V] memory per slice.
    """
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    boundary = None if boundary_mask is None else boundary_mask.to(hidden.device)
    merged = list(map_positions(_slice_stats, [hidden, targets], chunk_size, head, vocab_size, boundary,
                                temperature, top_k, top_p))
    merged[0][:, -1] = 0.0
    if boundary is None:
        merged.insert(1, None)
    return NextTokenStats(*merged)
