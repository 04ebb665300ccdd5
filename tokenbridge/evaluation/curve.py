"""The held-out learning curve inside a training run. At some steps the model being trained scores the answers the
evaluate stage scores it on afterwards (the reference test answers; a teacher's or the original model's greedy answers
where given), as the evaluation does (fp32 logits, eval mode), so a run's point at its last step is the evaluation's
number of the saved model. History columns: `heldout_<score>`, with `_low` and `_high` (its 95 % bootstrap interval).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenbridge.contracts import HELDOUT, SCORE_AND_INTERVAL
from tokenbridge.data.chat import Encoded
from tokenbridge.evaluation.answers import continuations, references
from tokenbridge.evaluation.bpb import bits_per_byte_of, model_token_logprobs


def heldout_sets(tokenizer: PreTrainedTokenizerBase, test_records: list[dict],
                 generated: Mapping[str, list[dict]] | None = None) -> dict[str, list[Encoded]]:
    """score -> the answers it is measured on, in `tokenizer`'s encoding: `bits_per_byte` on the test records'
    reference answers; `<name>_bits_per_byte` on each `generated` set of greedy answers (`teacher_answers`: the
    teacher_answers stage's; `original_answers`: a transfer source's own), as the evaluation names them."""
    sets = {"bits_per_byte": references(test_records, tokenizer),
            **{f"{name}_bits_per_byte": continuations(records, tokenizer)
               for name, records in (generated or {}).items()}}
    return {score: answers for score, answers in sets.items() if answers}


def heldout_columns(sets: Mapping[str, list[Encoded]]) -> tuple[str, ...]:
    """The history columns of a curve of these sets."""
    return tuple(f"{HELDOUT}{score}{end}" for score in sets for end in SCORE_AND_INTERVAL)


def is_curve_step(step: int, total_steps: int, every: int) -> bool:
    """Whether the curve has a point after `step` (counted from 1): every `every` steps and at the last; never at 0."""
    return every > 0 and (step == total_steps or step % every == 0)


def heldout_point(model: PreTrainedModel, sets: Mapping[str, list[Encoded]], vocab_size: int,
                  device: torch.device) -> dict[str, float]:
    """One point of the curve: the model's bits-per-byte on each set with its interval (in eval mode, then back to
    training mode)."""
    model.eval()
    try:
        point: dict[str, float] = {}
        for score, answers in sets.items():
            scores = bits_per_byte_of(answers, model_token_logprobs(model, answers, vocab_size, device), score)
            point |= {f"{HELDOUT}{score}{end}": scores[f"{score}{end}"] for end in SCORE_AND_INTERVAL}
    finally:
        model.train()
    return point
