"""The distill stage's training loop: resumable from checkpoints, and the same with stored or live teacher."""

from __future__ import annotations

import csv
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenbridge.config import HfModelSpec
from tokenbridge.losses.registry import cross_tokenizer_losses
from tokenbridge.models import materialize
from tokenbridge.models.tiny import build_tiny_teacher_like
from tokenbridge.runtime import Runtime
from tokenbridge.stages.distill import train


@pytest.fixture(scope="module")
def inputs(cross_tokenizer_pair):
    return cross_tokenizer_pair[0]


def _train(inputs, tiny_params, tiny_dirs, name, log_metrics=lambda metrics, step: None, **overrides):
    params = tiny_params.distill.model_copy(update={"steps": 4, "checkpoint_every": 2, **overrides})
    summary = train(inputs / "prepared", tiny_dirs["student"], inputs / name / "model", inputs / name / "checkpoints",
                    inputs / name / "history.csv", params, tiny_params.teacher_logits, tiny_dirs["teacher"],
                    inputs / "logits", log_metrics=log_metrics,
                    runtime=Runtime.resolve(tiny_params.runtime))
    return summary, load_file(str(inputs / name / "model" / "model.safetensors"))


def _losses(path):
    with open(path) as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
        inputs, tiny_params, tiny_dirs):
    _, reference = _train(inputs, tiny_params, tiny_dirs, "uninterrupted")

    def crash_at_step_3(metrics, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(inputs, tiny_params, tiny_dirs, "interrupted", log_metrics=crash_at_step_3)
    assert (inputs / "interrupted" / "checkpoints" / "state.pt").exists()
    assert not (inputs / "interrupted" / "model").exists(), "no half-written model after an interruption"
    summary, resumed = _train(inputs, tiny_params, tiny_dirs, "interrupted")
    assert summary.resumed_from_step == 2
    assert _losses(inputs / "interrupted" / "history.csv") == pytest.approx(
        _losses(inputs / "uninterrupted" / "history.csv"), rel=1e-5)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_checkpoint_of_another_configuration_is_not_resumed(inputs, tiny_params, tiny_dirs):
    _train(inputs, tiny_params, tiny_dirs, "other", learning_rate=1e-4)
    summary, _ = _train(inputs, tiny_params, tiny_dirs, "other", learning_rate=2e-4)
    assert summary.resumed_from_step == 0


def test_stored_and_live_teachers_give_the_same_training(inputs, tiny_params, tiny_dirs):
    _train(inputs, tiny_params, tiny_dirs, "offline", teacher_mode="offline")
    _train(inputs, tiny_params, tiny_dirs, "online", teacher_mode="online")
    assert _losses(inputs / "online" / "history.csv") == pytest.approx(_losses(inputs / "offline" / "history.csv"),
                                                                        rel=1e-5)


def test_both_loss_terms_are_logged_and_training_lowers_the_loss(inputs, tiny_params, tiny_dirs):
    logged = []
    _train(inputs, tiny_params, tiny_dirs, "logged", log_metrics=lambda metrics, step: logged.append(metrics), steps=8,
           learning_rate=3e-3)
    assert all({"alm_loss", "sft_loss", "loss", "grad_norm", "learning_rate", "alpha"} <= set(m) for m in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]


@pytest.mark.parametrize("loss, overrides", [
    ("uld", {}), ("mined", {}), ("multilevel_ot", {}), ("sft", {}), (["alm", "uld"], {"combine": "gradmag"}),
    ("dskd", {"teacher_mode": "online"}), ("alm", {"alpha_schedule": "wsd", "alpha_warmup": 0.5, "alpha_decay": 0.25}),
])
def test_every_cross_tokenizer_loss_trains_the_tiny_pair_and_logs_its_term(inputs, tiny_params, tiny_dirs, loss,
                                                                            overrides):
    logged = []
    name = "-".join(loss) if isinstance(loss, list) else loss
    summary, _ = _train(inputs, tiny_params, tiny_dirs, f"loss-{name}", log_metrics=lambda m, step: logged.append(m),
                        loss=loss, **overrides)
    terms = loss if isinstance(loss, list) else [loss]
    assert summary.loss == "+".join(terms)
    for term in terms:
        assert any(f"{term}_loss" in metrics for metrics in logged)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in logged)
    with open(inputs / f"loss-{name}" / "history.csv") as handle:
        header = handle.readline().strip().split(",")
    assert header[:2] == ["step", "loss"] and all(f"{term}_loss" in header for term in terms)
    if overrides.get("combine") == "gradmag":
        assert all(sum(v for k, v in m.items() if k.startswith("weight.")) == pytest.approx(1.0) for m in logged)


def test_a_same_tokenizer_loss_with_two_tokenizers_is_refused_naming_the_alternatives(inputs, tiny_params, tiny_dirs):
    alternatives = ", ".join(cross_tokenizer_losses())
    with pytest.raises(ValueError,
                       match=rf"'forward_kl' .*different tokenizers.*use a cross-tokenizer loss \({alternatives}\)"):
        _train(inputs, tiny_params, tiny_dirs, "refused", loss="forward_kl")
    assert not (inputs / "refused" / "model").exists()


@pytest.mark.parametrize("loss, overrides", [
    ("forward_kl", {"teacher": {"top_p": 0.9, "top_k": 4, "temperature": 2.0}}), ("jsd", {}), ("tvd", {}),
    ("skew_forward_kl", {}), ("skew_reverse_kl", {}), ("reverse_kl", {"teacher_mode": "online"}),
    ("alm", {}), ("uld", {}),
])
def test_same_tokenizer_losses_train_a_pair_that_shares_the_tokenizer(same_tokenizer_pair, tiny_params, loss,
                                                                       overrides):
    root, dirs = same_tokenizer_pair
    params = tiny_params.distill.model_copy(update={"steps": 3, "checkpoint_every": 2, "loss": loss,
                                                    "learning_rate": 3e-3})
    params = type(params).model_validate({**params.model_dump(), **overrides})
    logged = []
    train(root / "prepared", dirs["student"], root / loss / "model", root / loss / "checkpoints",
          root / loss / "history.csv", params, tiny_params.teacher_logits, dirs["teacher"], root / "logits",
          log_metrics=lambda m, step: logged.append(m), runtime=Runtime.resolve(tiny_params.runtime))
    assert all(math.isfinite(m[f"{loss}_loss"]) and m[f"{loss}_loss"] >= 0 for m in logged)
    assert logged[-1][f"{loss}_loss"] != logged[0][f"{loss}_loss"]


def test_a_checkpoint_of_another_teacher_is_discarded_saying_so(inputs, tiny_params, tiny_dirs, tmp_path, capsys):
    """The same student and data, the teacher swapped for another of the same tokenizer: the old teacher's run
    used to be resumed."""
    build_tiny_teacher_like(tiny_dirs["teacher"], tmp_path / "source", hidden_size=32, seed=11)
    materialize(HfModelSpec(source="hf", path=str(tmp_path / "source")), tmp_path / "other", tmp_path / "cache")
    params = tiny_params.distill.model_copy(update={"steps": 4, "checkpoint_every": 2, "teacher_mode": "online"})
    runs = []
    for teacher in (tiny_dirs["teacher"], tmp_path / "other"):
        runs.append(train(inputs / "prepared", tiny_dirs["student"], inputs / "swap" / "model",
                          inputs / "swap" / "checkpoints", inputs / "swap" / "history.csv", params,
                          tiny_params.teacher_logits, teacher, None, runtime=Runtime.resolve(tiny_params.runtime)))
    assert runs[1].resumed_from_step == 0
    assert "what shaped it changed: teacher; training from the start" in capsys.readouterr().err


def test_a_checkpoint_of_a_teacher_whose_weights_changed_in_place_is_discarded(inputs, tiny_params, tiny_dirs,
                                                                                tmp_path, capsys):
    """Same card (name, shapes, tokenizer), other weights: the checkpoint knows the teacher by its weights' hash."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dirs["teacher"], teacher)
    params = tiny_params.distill.model_copy(update={"steps": 2, "checkpoint_every": 1, "teacher_mode": "online"})

    def run() -> int:
        return train(inputs / "prepared", tiny_dirs["student"], inputs / "edited" / "model",
                     inputs / "edited" / "checkpoints", inputs / "edited" / "history.csv", params,
                     tiny_params.teacher_logits, teacher, None, runtime=Runtime.resolve(tiny_params.runtime)
                     ).resumed_from_step

    run()
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({name: tensor * 1.01 for name, tensor in weights.items()}, str(teacher / "model.safetensors"),
              metadata={"format": "pt"})
    assert run() == 0
    assert "what shaped it changed: teacher; training from the start" in capsys.readouterr().err


def test_a_finished_run_is_rewritten_from_its_final_checkpoint_without_training(inputs, tiny_params, tiny_dirs):
    _, reference = _train(inputs, tiny_params, tiny_dirs, "final")
    summary, again = _train(inputs, tiny_params, tiny_dirs, "final")
    assert summary.resumed_from_step == 4 and summary.steps == 4
    assert all(torch.equal(again[name], tensor) for name, tensor in reference.items())
    state = torch.load(inputs / "final" / "checkpoints" / "state.pt", weights_only=True)
    parts = {"params", "prepared", "student", "teacher", "stored_logits", "teacher_temperature", "heldout", "code"}
    assert set(state["identity"]) == parts, "keyed on everything that shaped the run"


def test_weights_that_stop_being_finite_are_never_checkpointed(inputs, tiny_params, tiny_dirs, monkeypatch):
    """A step that leaves NaN weights behind a finite loss (injected into the optimizer's second step): the run
    stops there, and the checkpoint of step 1 stays the last one."""
    original, calls = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(FloatingPointError, match="step 2: the weights are no longer finite, so they were not saved"):
        _train(inputs, tiny_params, tiny_dirs, "diverged", checkpoint_every=1)
    assert torch.load(inputs / "diverged" / "checkpoints" / "state.pt", weights_only=True)["step"] == 1
    assert not (inputs / "diverged" / "model").exists()


class _RunsCode:
    """A pickle whose loading would run a command: what a crafted checkpoint on a shared remote could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(inputs, tiny_params, tiny_dirs, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    planted = inputs / "planted" / "checkpoints" / "state.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"format": "tokenbridge.checkpoint/v3", "payload": _RunsCode(marker)}, planted)
    summary, _ = _train(inputs, tiny_params, tiny_dirs, "planted")
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert summary.resumed_from_step == 0
    assert "cannot be read as plain tensors" in capsys.readouterr().err


def test_the_held_out_curve_ends_at_the_evaluations_numbers_of_the_saved_student(inputs, tiny_params, tiny_dirs,
                                                                                  tmp_path):
    """The in-run learning curve a claim's budget is read from: every heldout_every steps and at the last, on the
    test answers and on the teacher's answers; its last point is what the evaluate stage measures on the saved
    student, interval included."""
    from tokenbridge.contracts import HELDOUT
    from tokenbridge.evaluation.answers import spelled_by
    from tokenbridge.io import read_jsonl, write_jsonl
    from tokenbridge.stages.evaluate import run_evaluate

    test = read_jsonl(inputs / "prepared" / "test.jsonl")
    answers = tmp_path / "answers.jsonl"
    write_jsonl(answers, spelled_by([{"question": record["question"], "answer": record["answer"][: 20 + 9 * index],
                                      "ended": index % 2 == 0} for index, record in enumerate(test[:4])],
                                    [tiny_dirs["student"]]))
    runtime = Runtime.resolve(tiny_params.runtime)
    params = tiny_params.distill.model_copy(update={"steps": 5, "checkpoint_every": 5, "heldout_every": 2})
    train(inputs / "prepared", tiny_dirs["student"], tmp_path / "model", tmp_path / "checkpoints",
          tmp_path / "history.csv", params, tiny_params.teacher_logits, tiny_dirs["teacher"], inputs / "logits",
          runtime=runtime, heldout_examples=6, teacher_answers=answers)
    with open(tmp_path / "history.csv") as handle:
        curve = {int(row["step"]): row for row in csv.DictReader(handle) if row[f"{HELDOUT}bits_per_byte"]}
    assert list(curve) == [2, 4, 5], "every heldout_every steps and at the last"
    evaluated = run_evaluate(inputs / "prepared", tmp_path / "model", tmp_path / "eval", tmp_path / "metrics.json",
                             tiny_params.evaluate.model_copy(update={"bpb_examples": 6}), runtime, limit=0,
                             teacher_answers=answers).numbers()
    for score in ("bits_per_byte", "teacher_answers_bits_per_byte"):
        for end in ("", "_low", "_high"):
            assert float(curve[5][f"{HELDOUT}{score}{end}"]) == pytest.approx(evaluated[f"{score}{end}"], rel=1e-4)
        assert curve[2][f"{HELDOUT}{score}"] != curve[5][f"{HELDOUT}{score}"], "the points move as the student trains"
