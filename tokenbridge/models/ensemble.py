"""The ensemble as a model: causal LMs over one tokenizer combined by averaging next-token probabilities
(docs/algorithms/tokenizer-transfer.md#ensembles, `mean_prob`): log p_ens = log sum_m w_m softmax(z_m), each
member's padded vocabulary rows dropped before its softmax.

Saved as a directory that transformers loads like any causal LM (`config.json` with model_type
`tokenbridge_ensemble`, the members in `members/<name>/`, the shared tokenizer at the top), so lm-eval's hf
backend scores it by log-likelihood (its logits are the mixture's log-probs) and by generation (`generate`:
greedy or sampled, each member with its own KV cache, a left-padded batch of prompts at once). It loads in the
dtype it is asked for and moves with `.to(device)` like any module, so the evaluation's runtime decides both.
Importing this module registers the model type with transformers' Auto classes. The `ensemble` stage
(`tokenbridge/stages/ensemble.py`) writes such a directory.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenbridge.models import load_model
from tokenbridge.sampling import decode, sample_next

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
    log_weights: torch.Tensor  # [M] log of the members' weights (a buffer)

    def __init__(self, config: EnsembleConfig, members: list[torch.nn.Module]):
        super().__init__(config)
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("log_weights", torch.tensor(config.weights, dtype=torch.float32).log(), persistent=False)

    # Loads its members, not one checkpoint: transformers' loading options do not apply.
    @classmethod
    def from_pretrained(cls, path: str | Path, *args, dtype: str | torch.dtype | None = None, config=None,  # type: ignore[override]
                        **kwargs) -> EnsembleForCausalLM:
        """Load every member from `path/members/<name>` (other loading options do not apply)."""
        config = config if isinstance(config, EnsembleConfig) else EnsembleConfig.from_pretrained(path)
        dtype = torch.float32 if dtype in (None, "auto") else dtype
        members = [load_model(Path(path) / "members" / name, dtype).eval() for name in config.members]
        return cls(config, members).eval()

    def get_output_embeddings(self) -> None:
        return None  # no single head: the mixture is computed from each member's own logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: list | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """`logits_to_keep` (transformers' convention; 0: every position): the last positions only, as
        generation needs, so a batch's prompt never holds B x L x V logits per member."""
        vocab = self.config.vocab_size
        mixture, caches = None, []
        for index, member in enumerate(self.members):
            out = member(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=None if past_key_values is None else past_key_values[index],
                         use_cache=use_cache, logits_to_keep=logits_to_keep)
            weighted = out.logits[..., :vocab].float().log_softmax(-1) + self.log_weights[index]
            mixture = weighted if mixture is None else torch.logaddexp(mixture, weighted)
            caches.append(out.past_key_values)
        # one cache per member, in member order, where transformers expects one model's Cache
        return CausalLMOutputWithPast(logits=mixture, past_key_values=caches if use_cache else None)  # type: ignore[arg-type]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, stopping_criteria=None,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, **ignored) -> torch.Tensor:
        """Token by token from the mixture, every member keeping its own KV cache (`tokenbridge.sampling.decode`).
        A batch comes left-padded, as lm-eval's hf backend sends it: the padding is read from `attention_mask`
        (or inferred from `pad_token_id`), positions count real tokens only, and finished rows are padded until
        the last row stops, so each row's greedy answer is the one it gets alone."""
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id or 0
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        if attention_mask is None:
            attention_mask = (input_ids != pad).long() if input_ids.shape[0] > 1 else torch.ones_like(input_ids)
        new_tokens = (max_new_tokens if max_new_tokens is not None
                      else (max_length or input_ids.shape[1] + 20) - input_ids.shape[1])
        pick = ((lambda scores: sample_next(scores, temperature, top_p)) if do_sample
                else (lambda scores: scores.argmax(-1)))
        return decode(functools.partial(self, logits_to_keep=1), input_ids, attention_mask, new_tokens, pick, eos, pad,
                      stopping_criteria)


AutoConfig.register(MODEL_TYPE, EnsembleConfig)
AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM)
