"""The registry, complete: every module of `tokenbridge/losses/` is imported here, so each loss it registers
(`base.register`) is known, and adding a loss is adding its file. Everything that lists losses derives the list
from LOSSES: the params sections (`tokenbridge.params`), the allowed `distill.loss` names, the methods compared.
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import BaseModel

import tokenbridge.losses
from tokenbridge.losses.base import LOSSES, DistillLoss, LossSetup

for _module in pkgutil.iter_modules(tokenbridge.losses.__path__, f"{tokenbridge.losses.__name__}."):
    importlib.import_module(_module.name)


def cross_tokenizer_losses() -> list[str]:
    """The distillation losses that accept two different tokenizers, in registry order."""
    return [name for name, cls in LOSSES.items() if cls.reads_teacher() and not cls.same_tokenizer_only]


def transfer_losses() -> list[str]:
    """The losses the transfer stage trains with: every cross-tokenizer loss, and `sft` (next-token alone)."""
    return [*cross_tokenizer_losses(), "sft"]


def params_sections(names: list[str]) -> dict[str, type[BaseModel]]:
    """`<section>` -> its options model for these losses, one per section (losses may share one)."""
    return {section: cls.params_model for name in names
            if (section := (cls := LOSSES[name]).section()) is not None and cls.params_model is not None}


def build_losses(names: list[str], distill: BaseModel, setup: LossSetup) -> dict[str, DistillLoss]:
    """One loss module per name, with its options from the validated `distill` params (which already refused
    what the params alone rule out); refuses what the two models rule out."""
    built = {}
    for name in names:
        cls = LOSSES[name]
        if cls.same_tokenizer_only and not setup.same_tokenizer:
            raise ValueError(
                f"distill.loss {name!r} compares next-token distributions over one shared vocabulary, but the teacher "
                f"and the student have different tokenizers ({setup.teacher_dir} vs {setup.student_dir}): use a "
                f"cross-tokenizer loss ({', '.join(cross_tokenizer_losses())}), or a teacher with the student's "
                "tokenizer")
        built[name] = cls(cls.params_in(distill), setup)
    return built


def teacher_fields(losses: dict[str, DistillLoss]) -> tuple[str, ...]:
    """What stored teacher data must hold for these losses (offline mode)."""
    return tuple(sorted({field for loss in losses.values() for field in loss.teacher_fields}))
