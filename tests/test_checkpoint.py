"""A checkpoint is resumed only when every part of what shaped its run is unchanged; otherwise it is discarded
with one line naming the parts that changed."""

from __future__ import annotations

import pytest
import torch

from tokenbridge.training.checkpoint import Checkpoint, code_version
from tokenbridge.training.ranks import Ranks

# What distill's checkpoints are keyed on (tokenbridge/stages/distill.py); transfer's use params, start, source,
# records and code.
DISTILL_PARTS = ("params", "prepared", "student", "teacher", "stored_logits", "teacher_temperature", "code")


def _checkpoint(directory, identity: dict) -> Checkpoint:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return Checkpoint(directory, identity, model, torch.optim.AdamW(model.parameters()), Ranks())


@pytest.mark.parametrize("part", DISTILL_PARTS)
def test_a_change_in_any_part_of_a_runs_identity_discards_its_checkpoint_naming_the_part(tmp_path, part, capsys):
    identity = {name: {"value": name} for name in DISTILL_PARTS}
    first = _checkpoint(tmp_path, identity)
    first.resume()
    first.save(3, [{"step": 3}])
    assert _checkpoint(tmp_path, dict(identity)).resume() == (3, [{"step": 3}])
    assert _checkpoint(tmp_path, {**identity, part: {"value": "changed"}}).resume() == (0, [])
    assert f"what shaped it changed: {part}; training from the start" in capsys.readouterr().err
    assert not (tmp_path / "state.pt").exists(), "the discarded checkpoint is removed"


def test_the_code_version_follows_the_code_that_shapes_training(tmp_path):
    stage = tmp_path / "stage.py"
    stage.write_text("STEP = 1\n")
    before = code_version(str(stage))
    assert code_version(str(stage)) == before
    stage.write_text("STEP = 2\n")
    assert code_version(str(stage)) != before
