"""Stage `ensemble`: models that share one tokenizer, combined by averaging next-token probabilities
(spec 1.18, `mean_prob`): log p_ens = log sum_m w_m softmax(z_m), each member's padded vocabulary rows
dropped before its softmax.

The ensemble is saved as a directory that transformers loads like any causal LM (`config.json` with
model_type `tokenbridge_ensemble`, the members in `members/<name>/`, the shared tokenizer at the top), so
lm-eval's hf backend scores it by log-likelihood (its logits are the mixture's log-probs) and by generation
(`generate`: greedy or sampled, each member with its own KV cache), and MLflow logs it as a directory.
Importing this module registers the model type with transformers' Auto classes.

Inputs: the members' HF directories (the student, the teacher, transferred models). Outputs:
`models/ensemble/` (with a model card naming members and weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from components.io import atomic_path, read_json, sha256_file, write_json
from components.models import MODEL_CARD, _link_tree, load_model
from components.sampling import decode, sample_next
from components.transfer import TOKENIZER_FILES

MODEL_TYPE = "tokenbridge_ensemble"


class EnsembleConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, members: list[str] | None = None, weights: list[float] | None = None, vocab_size: int = 0,
                 max_position_embeddings: int = 2048, **kwargs):
        self.members = members or []
        self.weights = weights or []
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class EnsembleForCausalLM(PreTrainedModel):
    """M causal LMs over one tokenizer; `forward` returns log of the weighted mean of their probabilities."""

    config_class = EnsembleConfig
    base_model_prefix = "ensemble"

    def __init__(self, config: EnsembleConfig, members: list[torch.nn.Module]):
        super().__init__(config)
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("log_weights", torch.tensor(config.weights, dtype=torch.float32).log(), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, *args, dtype: str | torch.dtype | None = None, config=None,
                        **kwargs) -> "EnsembleForCausalLM":
        """Load every member from `path/members/<name>` (other loading options do not apply)."""
        config = config if isinstance(config, EnsembleConfig) else EnsembleConfig.from_pretrained(path)
        dtype = torch.float32 if dtype in (None, "auto") else dtype
        members = [load_model(Path(path) / "members" / name, dtype).eval() for name in config.members]
        return cls(config, members).eval()

    def get_output_embeddings(self) -> None:
        return None  # no single head: the mixture is computed from each member's own logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: list | None = None,
                use_cache: bool = False, **kwargs) -> CausalLMOutputWithPast:
        vocab = self.config.vocab_size
        mixture, caches = None, []
        for index, member in enumerate(self.members):
            out = member(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=None if past_key_values is None else past_key_values[index], use_cache=use_cache)
            weighted = out.logits[..., :vocab].float().log_softmax(-1) + self.log_weights[index]
            mixture = weighted if mixture is None else torch.logaddexp(mixture, weighted)
            caches.append(out.past_key_values)
        return CausalLMOutputWithPast(logits=mixture, past_key_values=caches if use_cache else None)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, stopping_criteria=None,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, **ignored) -> torch.Tensor:
        """Token by token from the mixture, every member keeping its own KV cache. Left-padded batches are
        read from `attention_mask` (or inferred from `pad_token_id`); finished rows are padded."""
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id or 0
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        if attention_mask is None:
            attention_mask = (input_ids != pad).long() if input_ids.shape[0] > 1 else torch.ones_like(input_ids)
        new_tokens = max_new_tokens if max_new_tokens is not None else (max_length or input_ids.shape[1] + 20) - input_ids.shape[1]
        pick = (lambda scores: sample_next(scores, temperature, top_p)) if do_sample else (lambda scores: scores.argmax(-1))
        return decode(self, input_ids, attention_mask, new_tokens, pick, eos, pad, stopping_criteria)


AutoConfig.register(MODEL_TYPE, EnsembleConfig)
AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM)


def build_ensemble(members: dict[str, Path], weights: list[float], out_dir: Path) -> dict:
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
    cards = {name: read_json(Path(directory) / MODEL_CARD) for name, directory in members.items()}
    size = cards[next(iter(cards))]["tokenizer_size"]
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
            _link_tree(Path(directory), temporary / "members" / name)
        for file in TOKENIZER_FILES:
            if (first / file).exists():
                shutil.copy2(first / file, temporary / file)
        card = {"name": "ensemble(" + ", ".join(f"{cards[n]['name']} x{w:.2f}" for n, w in zip(members, weights)) + ")",
                "members": {name: cards[name]["name"] for name in members}, "weights": dict(zip(members, weights)),
                "tokenizer_sha256": hashes[next(iter(hashes))], "tokenizer_size": size,
                "parameters": sum(cards[name]["parameters"] for name in members), "eos_token": cards[next(iter(cards))]["eos_token"]}
        write_json(temporary / MODEL_CARD, card)
    return card


def _tokenizer_size(directory: Path) -> int | str:
    card = Path(directory) / MODEL_CARD
    return read_json(card).get("tokenizer_size", "?") if card.exists() else "?"

