"""The loss registry is the only list of losses: each loss declares its options model and its needs, and the params,
the allowed names and the distill build path are derived from it, so a new loss is one new file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from tokenbridge.config import Strict
from tokenbridge.losses.base import DECLARATIONS, LOSSES, DistillLoss, register
from tokenbridge.losses.registry import cross_tokenizer_losses, params_sections
from tokenbridge.losses.sft import sft_mean
from tokenbridge.params import DistillParams, distill_params_model
from tokenbridge.stored_logits import FIELDS

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_declares_its_options_and_needs(name):
    cls = LOSSES[name]
    assert all(hasattr(cls, attribute) for attribute in DECLARATIONS) and cls.name == name
    assert all(isinstance(flag, bool) for flag in (cls.needs_online_teacher, cls.same_tokenizer_only,
                                                   cls.needs_student_boundary))
    assert set(cls.teacher_fields) <= set(FIELDS), "stored teacher data holds only stored_logits.FIELDS"
    assert cls.params_model is None or issubclass(cls.params_model, BaseModel)


@pytest.mark.parametrize("section, model", sorted(params_sections(list(LOSSES)).items()))
def test_each_loss_options_model_is_a_distill_section_with_its_defaults(section, model):
    field = DistillParams.model_fields[section]
    assert field.annotation is model and field.default_factory() == model()
    minimal = DistillParams(teacher_mode="offline", steps=1, batch_size=1, learning_rate=1e-3, checkpoint_every=1)
    assert getattr(minimal, section) == model()


def test_cross_tokenizer_losses_are_the_distillation_losses_that_accept_two_tokenizers():
    assert cross_tokenizer_losses() == ["alm", "dskd", "mined", "multilevel_ot", "uld"]


def test_only_the_declared_needs_decide_the_online_rule():
    online = [name for name, cls in LOSSES.items() if cls.needs_online_teacher]
    assert online == ["dskd"]
    with pytest.raises(ValueError, match="'dskd' needs the live teacher.*teacher_mode: online"):
        DistillParams(teacher_mode="offline", loss="dskd", steps=1, batch_size=1, learning_rate=1e-3,
                      checkpoint_every=1)


def test_register_refuses_a_loss_that_leaves_a_need_undeclared():
    class Undeclared(DistillLoss):
        name = "undeclared"
        params_model = None
        same_tokenizer_only = False
        teacher_fields = ()
        needs_student_boundary = False

    with pytest.raises(TypeError, match="Undeclared must declare needs_online_teacher"):
        register(Undeclared)
    assert "undeclared" not in LOSSES


def test_register_refuses_a_second_options_model_for_a_shared_section():
    class OtherSkew(Strict):
        weight: float = 0.5

    class Clashing(DistillLoss):
        name = "clashing"
        params_model = OtherSkew
        params_section = "skew"
        needs_online_teacher = False
        same_tokenizer_only = True
        teacher_fields = ("topk_ids", "topk_logprobs")
        needs_student_boundary = False

    with pytest.raises(TypeError, match="distill.skew already holds"):
        register(Clashing)
    assert "clashing" not in LOSSES


def test_register_refuses_a_name_already_taken():
    class SecondAlm(DistillLoss):
        name = "alm"
        params_model = None
        needs_online_teacher = False
        same_tokenizer_only = False
        teacher_fields = ()
        needs_student_boundary = False

    with pytest.raises(TypeError, match="'alm' of SecondAlm is already taken by AlmLoss"):
        register(SecondAlm)
    assert LOSSES["alm"] is not SecondAlm


def test_a_loss_section_may_not_replace_a_distill_key(monkeypatch):
    class Shadowing(DistillLoss):
        name = "teacher"  # its section would be distill.teacher, the truncation every loss shares
        params_model = Strict
        needs_online_teacher = False
        same_tokenizer_only = False
        teacher_fields = ()
        needs_student_boundary = False

    monkeypatch.setitem(LOSSES, "teacher", Shadowing)
    with pytest.raises(TypeError, match=r"params_section \['teacher'\] would replace distill keys"):
        distill_params_model()


NEW_LOSS = '''
"""A loss added as one file: its options, its needs and its math."""
from pydantic import Field

from tokenbridge.config import Strict
from tokenbridge.losses.base import DistillLoss, LossOutput, register
from tokenbridge.losses.sft import sft_mean


class ScaledParams(Strict):
    scale: float = Field(1.0, gt=0, description="multiplies the next-token loss")


@register
class ScaledLoss(DistillLoss):
    name = "scaled"
    params_model = ScaledParams
    needs_online_teacher = False
    same_tokenizer_only = False
    teacher_fields = ("token_logprobs",)
    needs_student_boundary = False

    def forward(self, student, teacher, alignment):
        mean = sft_mean(student.token_logprobs, student.loss_mask)
        return LossOutput((mean._replace(value=mean.value * self.params.scale),))
'''

PROBE = '''
import json, sys
from pathlib import Path
from types import SimpleNamespace

import torch

import tokenbridge.losses
tokenbridge.losses.__path__.append(sys.argv[1])  # the new file, as if saved in tokenbridge/losses/

from tokenbridge.config import ParamsError
from tokenbridge.losses.base import LossSetup
from tokenbridge.losses.registry import build_losses, cross_tokenizer_losses, teacher_fields
from tokenbridge.params import load_params
from tokenbridge.training.schedules import term_weights

params = load_params(Path(sys.argv[2]))
setup = LossSetup(Path("teacher"), Path("student"), same_tokenizer=False, cache_dir=Path(sys.argv[1]))
losses = build_losses(params.distill.losses, params.distill, setup)
student = SimpleNamespace(token_logprobs=torch.tensor([[-1.0, -2.0, -3.0]]),
                          loss_mask=torch.tensor([[False, True, True]]))
try:
    load_params(Path(sys.argv[3]))
    refused = ""
except ParamsError as error:
    refused = str(error)
print(json.dumps({"scale": params.distill.scaled.scale, "built": type(losses["scaled"]).__name__,
                  "loss": float(losses["scaled"](student, None, None).loss), "fields": teacher_fields(losses),
                  "weights": term_weights(params.distill, 0), "cross": cross_tokenizer_losses(), "refused": refused}))
'''


def test_a_new_loss_is_one_file_that_params_and_the_distill_build_path_pick_up(tmp_path):
    (tmp_path / "scaled.py").write_text(NEW_LOSS)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"].update(loss=["scaled"], scaled={"scale": 3.0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    raw["distill"]["scaled"] = {"scal": 3.0}
    (tmp_path / "misspelt.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), str(tmp_path), str(tmp_path / "params.yaml"),
                             str(tmp_path / "misspelt.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["scale"] == 3.0 and seen["built"] == "ScaledLoss"
    unscaled = sft_mean(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[False, True, True]])).value
    assert seen["loss"] == pytest.approx(3.0 * float(unscaled))  # its options reach its math
    assert seen["fields"] == ["token_logprobs"] and seen["weights"] == {"scaled": 0.5, "sft": 0.5}
    assert "scaled" in seen["cross"]
    assert "distill.scaled.scal: unknown key" in seen["refused"]
