"""Build the losses `distill.loss` names, with their params, refusing combinations that cannot work."""

from __future__ import annotations

from tokenbridge.config import DistillParams
# Importing each loss module registers its losses in LOSSES.
from tokenbridge.losses import alm, dskd, kd, mined, multilevel_ot, sft, uld  # noqa: F401
from tokenbridge.losses.base import LOSSES, DistillLoss, LossSetup


def build_losses(names: list[str], params: DistillParams, setup: LossSetup) -> dict[str, DistillLoss]:
    """One loss module per name, with its `distill.<section>` params."""
    built = {}
    for name in names:
        cls = LOSSES[name]
        if cls.same_tokenizer_only and not setup.same_tokenizer:
            raise ValueError(
                f"distill.loss {name!r} compares next-token distributions over one shared vocabulary, but the teacher "
                f"and the student have different tokenizers ({setup.teacher_dir} vs {setup.student_dir}): use a "
                "cross-tokenizer loss (alm, uld, mined, multilevel_ot, dskd), or a teacher with the student's tokenizer")
        if cls.online_only and params.teacher_mode != "online":
            raise ValueError(f"distill.loss {name!r} needs the live teacher: set distill.teacher_mode: online")
        built[name] = cls(getattr(params, cls.params_field) if cls.params_field else None, setup)
    return built


def teacher_fields(losses: dict[str, DistillLoss]) -> tuple[str, ...]:
    """What stored teacher data must hold for these losses (offline mode)."""
    return tuple(sorted({field for loss in losses.values() for field in loss.teacher_fields}))
