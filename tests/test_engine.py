"""The training engine: gradient accumulation and gradient checkpointing change memory and time, never the
result; the counting pass that makes accumulation exact reads units that never depend on the student."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from tokenbridge.config import RuntimeParams
from tokenbridge.contracts import PreparedManifest
from tokenbridge.data.chat import Encoded
from tokenbridge.io import read_jsonl
from tokenbridge.losses.base import LossSetup
from tokenbridge.losses.latents import HiddenStateTerm
from tokenbridge.losses.registry import LOSSES, build_losses
from tokenbridge.models import load_model, load_tokenizer
from tokenbridge.models.gguf import default_cache_dir
from tokenbridge.runtime import Runtime
from tokenbridge.stages.distill import train
from tokenbridge.stored_logits import TeacherLogitsReader
from tokenbridge.token_bytes import boundary_mask
from tokenbridge.training.batching import batch_indices, make_batch, split
from tokenbridge.training.teachers import LiveTeacher, StoredTeacher, Teacher, signals_read
from tokenbridge.training.views import student_forward


def _runtime(**settings) -> Runtime:
    return Runtime.resolve(RuntimeParams(device="cpu", precision="fp32", **settings))


def _train(pair, tiny_params, name, runtime, **overrides):
    root, dirs = pair
    params = type(tiny_params.distill).model_validate(
        {**tiny_params.distill.model_dump(), "steps": 2, "batch_size": 8, "checkpoint_every": 10, **overrides})
    out = root / "engine" / name
    train(root / "prepared", dirs["student"], out / "model", out / "checkpoints", out / "history.csv", params,
          tiny_params.teacher_logits, dirs["teacher"], root / "logits", runtime=runtime)
    with open(out / "history.csv") as handle:
        history = [{key: float(value) for key, value in row.items() if key.endswith("loss")}
                   for row in csv.DictReader(handle)]
    return history, load_file(str(out / "model" / "model.safetensors"))


def _assert_same_training(first, second, label):
    (history, weights), (other_history, other_weights) = first, second
    for row, other in zip(history, other_history, strict=True):
        assert other == pytest.approx(row, rel=1e-5, abs=1e-7), label
    for key, tensor in weights.items():  # Adam turns float rounding in near-zero gradients into up to ~1e-5
        torch.testing.assert_close(other_weights[key], tensor, rtol=1e-5, atol=5e-5,
                                   msg=lambda m, key=key: f"{label} {key}: {m}")


@pytest.mark.parametrize("pair_name, overrides", [
    ("cross", {}),  # ALM (units: chunks) + next-token CE (units: target tokens), stored teacher
    ("same", {"loss": "forward_kl"}),  # a same-tokenizer loss (units: the student's target rows)
    ("same", {"loss": "forward_kl", "teacher_mode": "online"}),  # live teacher, one view per micro-batch
])
def test_four_micro_batches_of_two_train_exactly_like_one_batch_of_eight(cross_tokenizer_pair, same_tokenizer_pair,
                                                                          tiny_params, pair_name, overrides):
    pair = cross_tokenizer_pair if pair_name == "cross" else same_tokenizer_pair
    label = f"{pair_name}-{'-'.join(str(v) for v in overrides.values()) or 'alm'}"
    whole = _train(pair, tiny_params, f"{label}-whole", _runtime(), **overrides)
    accumulated = _train(pair, tiny_params, f"{label}-micro", _runtime(micro_batch_size=2), **overrides)
    _assert_same_training(whole, accumulated, label)


def test_gradient_checkpointing_gives_the_same_training(cross_tokenizer_pair, tiny_params):
    plain = _train(cross_tokenizer_pair, tiny_params, "plain", _runtime())
    checkpointed = _train(cross_tokenizer_pair, tiny_params, "checkpointed", _runtime(gradient_checkpointing=True))
    _assert_same_training(plain, checkpointed, "gradient checkpointing")


def test_gradmag_with_gradient_accumulation_is_refused_naming_the_fix(cross_tokenizer_pair, tiny_params):
    with pytest.raises(ValueError, match="micro_batch_size"):
        _train(cross_tokenizer_pair, tiny_params, "gradmag", _runtime(micro_batch_size=2), loss=["alm", "uld"],
               combine="gradmag")


def _batches_and_teacher(root, dirs, tiny_params, live: bool):
    """Two micro-batches of the tiny pair's training data, and the teacher (live or stored) that views them."""
    tokenizers = {role: load_tokenizer(dirs[role]) for role in ("student", "teacher")}
    word_starts = {role: boundary_mask(tokenizer, len(tokenizer)) for role, tokenizer in tokenizers.items()}
    students = [Encoded.from_json(r) for r in read_jsonl(root / "prepared" / "train.student.jsonl")]
    if live:
        teachers = [Encoded.from_json(r) for r in read_jsonl(root / "prepared" / "train.teacher.jsonl")]
        teacher = LiveTeacher(Teacher.load(dirs["teacher"], torch.float32, torch.device("cpu")), teachers,
                              tiny_params.distill.teacher, 1.0, 16)
    else:
        prepared = PreparedManifest.read(root / "prepared" / "manifest.json")
        reader = TeacherLogitsReader(root / "logits", (), prepared.splits.train.sha256.teacher)
        teacher = StoredTeacher(reader, tiny_params.distill.teacher)
    batches = []
    for part in split(batch_indices(0, 6, len(students), 6, 1), 3):
        teacher_side, stored = teacher.examples(part)
        batches.append(make_batch([students[i] for i in part], teacher_side, word_starts, stored))
    return batches, teacher


@pytest.mark.parametrize("name", sorted(set(LOSSES)))
def test_a_losss_units_never_depend_on_the_students_values(cross_tokenizer_pair, same_tokenizer_pair, tiny_params,
                                                           name):
    """What makes accumulation exact: the counting pass (placeholder student, no decoder) finds the units the
    real forward averages over, for every registered loss."""
    loss_class = LOSSES[name]
    root, dirs = same_tokenizer_pair if loss_class.same_tokenizer_only else cross_tokenizer_pair
    teacher_mode = "online" if loss_class.needs_online_teacher else "offline"
    params = tiny_params.distill.model_copy(update={"teacher_mode": teacher_mode})
    setup = LossSetup(dirs["teacher"], dirs["student"], loss_class.same_tokenizer_only, default_cache_dir())
    losses = torch.nn.ModuleDict(build_losses([name], params, setup))
    student = load_model(dirs["student"], torch.float32)
    tokenizer = load_tokenizer(dirs["student"])
    boundary = boundary_mask(tokenizer, student.get_output_embeddings().weight.shape[0])
    forward = student_forward(student, losses, len(tokenizer), boundary, 16)
    batches, teacher = _batches_and_teacher(root, dirs, tiny_params, live=loss_class.needs_online_teacher)
    for batch in batches:
        view = teacher.view(batch)
        with torch.no_grad():
            counted = [int(part.count) for part in forward(batch, view, [name], True)[name].parts]
            real = [int(part.count) for part in forward(batch, view, [name], False)[name].parts]
        assert counted == real and sum(real) > 0, f"{name}: counting pass {counted}, forward {real}"


def test_a_step_that_reads_no_teacher_skips_its_forward_and_computes_the_same_loss(cross_tokenizer_pair,
                                                                                   tiny_params):
    """Next-token training alone (transfer's `sft` arm, distill at alpha 0) reads none of the teacher's signals, so
    the live teacher's forward is skipped; any other weighted term (a distillation loss, the hidden-state term)
    reads them."""
    root, dirs = cross_tokenizer_pair
    setup = LossSetup(dirs["teacher"], dirs["student"], False, default_cache_dir())
    terms = {**build_losses(["alm", "sft"], tiny_params.distill, setup), "hidden_state": HiddenStateTerm()}
    assert not signals_read(terms, {"sft": 1.0})
    assert not signals_read(terms, {"alm": 0.0, "sft": 1.0, "hidden_state": 0.0})
    assert signals_read(terms, {"alm": 0.1, "sft": 0.9})
    assert signals_read(terms, {"sft": 1.0, "hidden_state": 0.5})

    batches, teacher = _batches_and_teacher(root, dirs, tiny_params, live=True)
    calls = []
    teacher.teacher.model.get_input_embeddings().register_forward_hook(lambda module, args, output: calls.append(1))
    unread, read = teacher.view(batches[0], False), teacher.view(batches[0])
    assert (len(calls), unread.token_logprobs, unread.hidden) == (1, None, None)

    student = load_model(dirs["student"], torch.float32)
    tokenizer = load_tokenizer(dirs["student"])
    boundary = boundary_mask(tokenizer, student.get_output_embeddings().weight.shape[0])
    forward = student_forward(student, torch.nn.ModuleDict(terms), len(tokenizer), boundary, 16)
    with torch.no_grad():
        without, with_signals = (forward(batches[0], view, ["sft"], False)["sft"].parts[0] for view in (unread, read))
    assert (float(without.value), int(without.count)) == (float(with_signals.value), int(with_signals.count))


def test_a_compiled_student_trains_like_the_eager_one(cross_tokenizer_pair, tiny_params):
    eager = _train(cross_tokenizer_pair, tiny_params, "eager", _runtime())
    compiled = _train(cross_tokenizer_pair, tiny_params, "compiled", _runtime(compile=True))
    _assert_same_training(eager, compiled, "torch.compile")
