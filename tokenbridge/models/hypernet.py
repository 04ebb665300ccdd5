"""A ZeTT-style embedding hypernetwork: predicts a model's embedding rows for any tokenizer from how the model's own
tokenizer spells each new token (docs/algorithms/hypernetwork.md).

A target token is spelled as at most `max_pieces` base tokens (`token_pieces`: a token the base has is its own
single piece). The pieces' original rows (input and, for an untied head, output rows side by side) are
standardised with the base rows' per-dimension mean and std, get a position embedding, and pass through a small
pre-norm transformer; the mean of its outputs goes through a zero-initialised linear layer and is added to the
mean of the pieces' rows:

    row = mean(E[pieces]) + std * W_out · mean(transformer((E[pieces] - mean) / std + position))

So an untrained hypernetwork is FVT (the mean of the pieces), and maps every base token to its own row.
Special tokens are never predicted: they keep the row of the base special token of the same role or name.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional

from tokenbridge.models.vocabulary import VocabularyMap

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS = "hypernet.pt"  # the state dict, beside its card
CARD = "hypernet.json"  # tokenbridge.contracts.HypernetCard


class Hypernet(torch.nn.Module):
    mean: torch.Tensor  # buffers: the base rows' per-dimension mean and std, fixed at construction
    std: torch.Tensor

    def __init__(self, width: int, layers: int, heads: int, max_pieces: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        if width % heads:
            raise ValueError(f"hypernet.heads ({heads}) must divide the embedding width {width}")
        self.max_pieces = max_pieces
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp_min(1e-6).clone())
        self.position = torch.nn.Embedding(max_pieces, width)
        torch.nn.init.normal_(self.position.weight, std=0.02)
        layer = torch.nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, width)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, pieces: torch.Tensor) -> torch.Tensor:
        """pieces: [N, P, width], the original rows of N tokens' P pieces each (P <= max_pieces) -> [N, width]."""
        standard = (pieces.float() - self.mean) / self.std + self.position.weight[: pieces.shape[1]]
        encoded = self.norm(self.encoder(standard)).mean(1)
        return pieces.float().mean(1) + self.std * self.out(encoded)


def base_rows(input_rows: torch.Tensor, output_rows: torch.Tensor | None) -> torch.Tensor:
    """The base rows the hypernetwork reads and writes: input rows, with the output head's beside them when untied."""
    return input_rows if output_rows is None else torch.cat([input_rows, output_rows[: input_rows.shape[0]]], -1)


def standardisation(rows: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the real (unpadded) base rows: the hypernetwork's fixed input scale."""
    real = rows[:vocab_size].float()
    return real.mean(0), real.std(0)


def token_pieces(mapping: VocabularyMap, max_pieces: int) -> dict[int, list[int]]:
    """Target id -> the base ids the hypernetwork reads: exact tokens are their own piece, spelled ones at most
    `max_pieces` pieces of their spelling (ZeTT truncates the same way). Special tokens are left out: they keep
    FVT's rows (the base row of the same role or name, else their text's spelling)."""
    pieces = {index: [source_id] for index, source_id in mapping.exact.items()}
    pieces.update({index: parts[:max_pieces] for index, parts in mapping.spelled.items()})
    return {index: parts for index, parts in pieces.items() if index not in mapping.target_specials}


def predict_rows(hypernet: Hypernet, rows: torch.Tensor, pieces: dict[int, list[int]],
                 chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ids, predicted rows) for every token in `pieces`. Tokens are grouped by their number of pieces, so
    no padding or attention mask is needed, and run `chunk_size` tokens at a time."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, parts in pieces.items():
        by_length[len(parts)].append(index)
    ids, outputs = [], []
    for _, indices in sorted(by_length.items()):
        for start in range(0, len(indices), chunk_size):
            chunk = indices[start: start + chunk_size]
            piece_ids = torch.tensor([pieces[index] for index in chunk], device=rows.device)
            outputs.append(hypernet(functional.embedding(piece_ids, rows)))
            ids.extend(chunk)
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=rows.device), rows.new_zeros(0, rows.shape[1])
    return torch.tensor(ids, device=rows.device), torch.cat(outputs)


def save_hypernet(hypernet: Hypernet, directory: Path) -> None:
    torch.save(hypernet.state_dict(), Path(directory) / WEIGHTS)


def load_hypernet(directory: Path, width: int, layers: int, heads: int, max_pieces: int) -> Hypernet:
    state = torch.load(Path(directory) / WEIGHTS, map_location="cpu", weights_only=True)
    hypernet = Hypernet(width, layers, heads, max_pieces, state["mean"], state["std"])
    hypernet.load_state_dict(state)
    return hypernet


class PredictedRows(torch.nn.Module):
    """A model's embedding or output head computing with rows set from outside (`rows`, the hypernetwork's
    predictions for the current vocabulary, with their gradient) instead of its own weight. The original module
    runs with the rows in place of its weight, so what it adds (Gemma's embedding scale) still applies."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.original = original.requires_grad_(False)
        self.rows: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        assert self.rows is not None, "set the predicted rows before running the model"
        return self.rows

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.original, {"weight": self.weight}, (inputs,))


def on_predicted_rows(model: PreTrainedModel) -> tuple[PredictedRows, PredictedRows]:
    """Give the (frozen) model an input embedding and an output head that read predicted rows; returns both
    (set `.rows` on each before every forward: the same rows for a tied head, or each half of the rows)."""
    embedding = PredictedRows(model.get_input_embeddings())
    head = PredictedRows(model.get_output_embeddings())
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(head)
    return embedding, head
