"""Stage `ensemble`: models that share one tokenizer, combined by averaging next-token probabilities
(docs/algorithms/tokenizer-transfer.md#ensembles; the model is `tokenbridge/models/ensemble.py`).

Inputs: the members' HF directories (the student, the teacher, transferred models). Outputs:
`models/ensemble/` (with a model card naming members and weights), which transformers and lm-eval load like
any causal LM. The stage only writes files (config, hard links, tokenizer), so it needs no device: whoever loads
the ensemble (`evaluate_transfer`) places it on `runtime.device` in the runtime's dtype.
"""

from __future__ import annotations

from pathlib import Path

from tokenbridge.contracts import MODEL_CARD, ContractError, ModelCard
from tokenbridge.io import atomic_path, read_json, sha256_file
from tokenbridge.models import copy_tokenizer_files, link_tree
from tokenbridge.models.ensemble import EnsembleConfig


def build_ensemble(members: dict[str, Path], weights: list[float], out_dir: Path) -> ModelCard:
    """Write the ensemble directory; refuses members whose tokenizers differ (their ids would not mean the
    same tokens), naming each member's tokenizer and the fix."""
    hashes = {name: sha256_file(Path(directory) / "tokenizer.json") for name, directory in members.items()}
    if len(set(hashes.values())) > 1:
        listing = "; ".join(f"{name}: tokenizer.json sha256 {digest[:12]}, {_tokenizer_size(members[name])} tokens"
                            for name, digest in hashes.items())
        raise ValueError(f"ensemble: members use different tokenizers ({listing}). Move them onto one tokenizer "
                         "first: stage transfer with transfer.tokenizer naming the shared one, then list the "
                         "transferred models in ensemble.members")
    weights = weights or [1.0] * len(members)
    weights = [weight / sum(weights) for weight in weights]
    first = Path(next(iter(members.values())))
    configs = {name: read_json(Path(directory) / "config.json") for name, directory in members.items()}
    cards = {name: ModelCard.of(directory) for name, directory in members.items()}
    size = cards[next(iter(cards))].tokenizer_size
    first_config = configs[next(iter(configs))]
    config = EnsembleConfig(
        members=list(members), weights=weights, vocab_size=size,
        max_position_embeddings=min(c.get("max_position_embeddings", 2048) for c in configs.values()),
        bos_token_id=first_config.get("bos_token_id"), eos_token_id=first_config.get("eos_token_id"),
        pad_token_id=first_config.get("pad_token_id"))
    with atomic_path(out_dir) as temporary:
        temporary.mkdir(parents=True)
        config.save_pretrained(temporary)
        for name, directory in members.items():
            link_tree(Path(directory), temporary / "members" / name)
        copy_tokenizer_files(first, temporary)
        label = ", ".join(f"{cards[n].name} x{w:.2f}" for n, w in zip(members, weights, strict=True))
        card = ModelCard(name=f"ensemble({label})",
                         members={name: cards[name].name for name in members}, weights=dict(zip(members, weights)),
                         tokenizer_sha256=hashes[next(iter(hashes))], tokenizer_size=size,
                         parameters=sum(cards[name].parameters for name in members),
                         eos_token=cards[next(iter(cards))].eos_token)
        card.write(temporary / MODEL_CARD)
    return card


def _tokenizer_size(directory: Path) -> int | str:
    try:
        return ModelCard.of(directory).tokenizer_size
    except ContractError:
        return "?"

