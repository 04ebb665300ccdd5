"""The distill stage's training loop: resumable from checkpoints, and the same with stored or live teacher."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from components.distill import train
from components.prepare import run_prepare
from components.teacher_logits import run_teacher_logits


@pytest.fixture(scope="module")
def inputs(tiny_params, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    run_prepare(tiny_dirs, root / "prepared", tiny_params.prepare)
    run_teacher_logits(root / "prepared", tiny_dirs["teacher"], root / "logits", tiny_params.teacher_logits)
    return root


def _train(inputs, tiny_params, tiny_dirs, name, log_metrics=lambda metrics, step: None, **overrides):
    params = tiny_params.distill.model_copy(update={"steps": 4, "checkpoint_every": 2, **overrides})
    summary = train(inputs / "prepared", tiny_dirs["student"], inputs / name / "model", inputs / name / "checkpoints",
                    inputs / name / "history.csv", params, tiny_params.teacher_logits, tiny_dirs["teacher"],
                    inputs / "logits", log_metrics=log_metrics)
    return summary, load_file(str(inputs / name / "model" / "model.safetensors"))


def _losses(path):
    with open(path) as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(inputs, tiny_params, tiny_dirs):
    _, reference = _train(inputs, tiny_params, tiny_dirs, "uninterrupted")

    def crash_at_step_3(metrics, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(inputs, tiny_params, tiny_dirs, "interrupted", log_metrics=crash_at_step_3)
    assert (inputs / "interrupted" / "checkpoints" / "state.pt").exists()
    assert not (inputs / "interrupted" / "model").exists(), "no half-written model after an interruption"
    summary, resumed = _train(inputs, tiny_params, tiny_dirs, "interrupted")
    assert summary["resumed_from_step"] == 2
    assert _losses(inputs / "interrupted" / "history.csv") == pytest.approx(_losses(inputs / "uninterrupted" / "history.csv"), rel=1e-5)
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_configuration_is_not_resumed(inputs, tiny_params, tiny_dirs):
    _train(inputs, tiny_params, tiny_dirs, "other", learning_rate=1e-4)
    summary, _ = _train(inputs, tiny_params, tiny_dirs, "other", learning_rate=2e-4)
    assert summary["resumed_from_step"] == 0


def test_stored_and_live_teachers_give_the_same_training(inputs, tiny_params, tiny_dirs):
    _train(inputs, tiny_params, tiny_dirs, "offline", teacher_mode="offline")
    _train(inputs, tiny_params, tiny_dirs, "online", teacher_mode="online")
    assert _losses(inputs / "online" / "history.csv") == pytest.approx(_losses(inputs / "offline" / "history.csv"), rel=1e-5)


def test_both_loss_terms_are_logged_and_training_lowers_the_loss(inputs, tiny_params, tiny_dirs):
    logged = []
    _train(inputs, tiny_params, tiny_dirs, "logged", log_metrics=lambda metrics, step: logged.append(metrics), steps=8,
           learning_rate=3e-3)
    assert all({"alm_loss", "sft_loss", "loss", "grad_norm", "learning_rate"} <= set(m) for m in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
