"""The GPU checks (`pytest -m cuda tests/test_cuda.py`, run by bench/device_check.sh): on CUDA, teacher-logits
extraction and distill keep the models, the optimizer state and every output on the GPU; each registered loss
under bf16-mixed agrees with fp32 on the same inputs; 4 micro-batches of 2 give the step of one batch of 8; and
gradient checkpointing gives the plain backward's gradients; FSDP2 on one GPU trains like the unwrapped student.
Every test is skipped without a CUDA device.

The GPU machine has torch, transformers, peft and accelerate but not reasoning-gym, Prefect or MLflow (the
other packages travel as wheels: `make device-wheels`), so the tiny pair's tokenizers train on synthetic text
and the data is a GSM8K-format JSONL file (tests/test_device_check.py checks these imports).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tokenbridge.config import HfModelSpec, PrepareParams, RuntimeParams
from tokenbridge.contracts import ModelCard
from tokenbridge.data.chat import Encoded
from tokenbridge.io import read_jsonl, write_jsonl
from tokenbridge.losses.base import LossSetup
from tokenbridge.losses.registry import LOSSES, build_losses
from tokenbridge.models import load_model, load_tokenizer, materialize
from tokenbridge.models.tiny import build_tiny_model, build_tiny_teacher_like, synthetic_text
from tokenbridge.params import DistillParams
from tokenbridge.runtime import Runtime
from tokenbridge.stages.distill import train
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.stages.teacher_logits import run_teacher_logits
from tokenbridge.token_bytes import boundary_mask
from tokenbridge.training.batching import make_batch, split
from tokenbridge.training.engine import Engine
from tokenbridge.training.parallel import TrainingModule
from tokenbridge.training.ranks import Ranks
from tokenbridge.training.schedules import term_weights
from tokenbridge.training.teachers import LiveTeacher, Teacher
from tokenbridge.training.views import student_forward

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 keeps 8 significant bits: each rounding errs by at most 2^-9 (about 2e-3) relatively. Under autocast the
# student's matmuls (2 layers, its head) take bf16 inputs, so a logit carries a few such errors; the losses read
# them through fp32 log-sum-exps and average over hundreds of positions, which keeps a loss value far inside 5
# roundings (1e-2); a loss that took its log-probs or divergences in bf16 errs by whole units near log(vocabulary).
# A gradient multiplies a few more rounded factors: within 10 roundings (2e-2) in relative L2 norm. Losses whose
# gradient is a sign or follows a ranking (TVD's |p - q|; ULD's sorted-probability L1; MultiLevelOT's absolute
# differences over a top-k ranking) flip it wherever two values tie to within a rounding, so they get 1e-1.
# (bf16 autocast on a CPU gave at most 3e-5 on values, 4e-3 on smooth losses' gradients, 2.6e-2 on the others.)
VALUE_TOLERANCE = 1e-2
GRADIENT_TOLERANCE = 2e-2
SIGN_GRADIENT_TOLERANCE = 1e-1
SIGN_GRADIENT_LOSSES = ("tvd", "uld", "multilevel_ot")


def _relative_difference(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    difference = torch.cat([(a.float() - b.float()).flatten() for a, b in zip(ours, reference, strict=True)])
    return float(difference.norm() / torch.cat([b.float().flatten() for b in reference]).norm())


@pytest.fixture(scope="module")
def pairs(tiny_params, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The tiny profile's cross-tokenizer pair and a same-tokenizer pair (a wider teacher on the student's own
    tokenizer), with prepared data: {"cross" | "same": {"teacher", "student", "prepared"}}."""
    root = tmp_path_factory.mktemp("cuda")
    text = synthetic_text(20_000)
    build_tiny_model(tiny_params.models.teacher, root / "source" / "teacher", text=text)
    build_tiny_model(tiny_params.models.student, root / "source" / "student", text=text)
    build_tiny_teacher_like(root / "source" / "student", root / "source" / "wide", hidden_size=48, seed=7)
    for name in ("teacher", "student", "wide"):
        materialize(HfModelSpec(source="hf", path=str(root / "source" / name)), root / name, root / "cache")
    for split_name, count in (("train", 16), ("test", 4)):
        write_jsonl(root / f"{split_name}.jsonl", ({"question": synthetic_text(12, seed=2 * i),
                                                    "answer": f"{synthetic_text(30, seed=2 * i + 1)}\n#### {i}"}
                                                   for i in range(count)))
    prepare = PrepareParams(source="jsonl", train_jsonl=str(root / "train.jsonl"), test_jsonl=str(root / "test.jsonl"),
                            n_train=16, n_test=4, max_length=512)
    out = {}
    for pair, teacher in (("cross", "teacher"), ("same", "wide")):
        dirs = {"teacher": root / teacher, "student": root / "student"}
        run_prepare(dirs, root / pair / "prepared", prepare)
        out[pair] = {**dirs, "prepared": root / pair / "prepared"}
    return out


@pytest.fixture(scope="module")
def extracted(pairs, tiny_params, tmp_path_factory) -> tuple[Path, dict]:
    """Stored teacher logits of the cross pair, extracted on CUDA: (folder, manifest)."""
    out = tmp_path_factory.mktemp("cuda_logits")
    pair = pairs["cross"]
    runtime = Runtime.resolve(RuntimeParams(device="cuda"))
    return out, run_teacher_logits(pair["prepared"], pair["teacher"], out, tiny_params.teacher_logits, runtime)


def _params(tiny_params, loss: str | list[str], **overrides) -> DistillParams:
    """Distill params with a live teacher whose full distribution every loss accepts (reverse KL included)."""
    return DistillParams.model_validate({**tiny_params.distill.model_dump(), "teacher_mode": "online", "loss": loss,
                                         "teacher": {"top_p": 1.0, "top_k": 0}, **overrides})


class Setup:
    """One pair's pieces of a distill step on `runtime`: data, live teacher, a fresh student, losses, forward."""

    def __init__(self, pair: dict[str, Path], params: DistillParams, runtime: Runtime, names: list[str],
                 teacher_dtype: torch.dtype | None = None):
        self.runtime, self.params = runtime, params
        prepared = pair["prepared"]
        self.students = [Encoded.from_json(r) for r in read_jsonl(prepared / "train.student.jsonl")]
        self.teachers = [Encoded.from_json(r) for r in read_jsonl(prepared / "train.teacher.jsonl")]
        student_tokenizer, teacher_tokenizer = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
        teacher = Teacher.load(pair["teacher"], teacher_dtype or runtime.inference_dtype, runtime.device)
        self.teacher = LiveTeacher(teacher, self.teachers, params.teacher, 1.0, params.logits_chunk_size)
        self.student = runtime.prepare_student(load_model(pair["student"], torch.float32).train())
        rows = self.student.get_output_embeddings().weight.shape[0]
        self.boundary = boundary_mask(student_tokenizer, rows)
        self.word_starts = {"student": self.boundary,
                            "teacher": boundary_mask(teacher_tokenizer, len(teacher_tokenizer))}
        same = ModelCard.of(pair["teacher"]).tokenizer_sha256 == ModelCard.of(pair["student"]).tokenizer_sha256
        setup = LossSetup(pair["teacher"], pair["student"], same, pair["teacher"].parent / "cache")
        self.losses = torch.nn.ModuleDict(build_losses(names, params, setup)).to(runtime.device)
        self.forward = student_forward(self.student, self.losses, len(student_tokenizer),
                                       self.boundary.to(runtime.device), params.logits_chunk_size)
        self.trainable = [*self.student.parameters(), *self.losses.parameters()]

    def batch(self, indices: list[int]):
        return make_batch([self.students[i] for i in indices], [self.teachers[i] for i in indices],
                          self.word_starts).to(self.runtime.device)

    def engine(self) -> Engine:
        optimizer = torch.optim.AdamW(self.trainable, lr=self.params.learning_rate)
        return Engine(TrainingModule(self.student, self.losses, self.forward), optimizer, self.runtime, Ranks(),
                      self.params.max_grad_norm, self.params.combine, [self.student.get_output_embeddings().weight])

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in self.trainable if p.grad is not None]


# ------------------------------------------------------------------------------------------ placement


def test_teacher_logits_extraction_runs_on_cuda_and_its_statistics_stay_there(pairs, extracted, tiny_params):
    _, manifest = extracted
    runtime = Runtime.resolve(RuntimeParams(device="cuda"))
    assert manifest.device.startswith("cuda") and manifest.dtype == "bfloat16"
    assert manifest.n_examples == 16
    teacher = Teacher.load(pairs["cross"]["teacher"], runtime.inference_dtype, runtime.device)
    assert {p.device.type for p in teacher.model.parameters()} == {"cuda"}
    setup = Setup(pairs["cross"], _params(tiny_params, "alm"), runtime, ["alm", "sft"])
    batch = setup.batch([0, 1, 2])
    stats = teacher.stats(batch.teacher_ids, batch.teacher_attention, 1.0, tiny_params.teacher_logits.top_k)
    fields = [stats.token_logprobs, stats.boundary_logprobs, stats.topk_ids, stats.topk_logprobs, stats.topk_counts]
    assert {t.device.type for t in fields} == {"cuda"}
    assert torch.isfinite(stats.token_logprobs).all()


def test_a_distill_step_on_cuda_keeps_student_teacher_optimizer_state_and_outputs_there(pairs, tiny_params):
    runtime = Runtime.resolve(RuntimeParams(device="cuda"))
    assert runtime.mixed_bf16, "auto precision on a bf16 GPU is bf16-mixed"
    setup = Setup(pairs["cross"], _params(tiny_params, "alm"), runtime, ["alm", "sft"])
    engine = setup.engine()
    batch = setup.batch([0, 1, 2, 3])
    view = setup.teacher.view(batch)
    assert {t.device.type for t in (view.token_logprobs, view.boundary_logprobs, view.hidden)} == {"cuda"}
    assert {p.device.type for p in setup.teacher.teacher.model.parameters()} == {"cuda"}
    with runtime.autocast():
        outputs = setup.forward(batch, view, ["alm", "sft"], False)
    assert {part.value.device.type for output in outputs.values() for part in output.parts} == {"cuda"}
    result = engine.step([batch], [view], term_weights(setup.params, 0), 1e-3, "cuda step")
    assert math.isfinite(result.loss) and result.grad_norm > 0
    assert {p.device.type for p in setup.trainable} == {"cuda"}
    assert {p.dtype for p in setup.student.parameters()} == {torch.float32}, "fp32 master weights"
    assert {p.grad.device.type for p in setup.trainable if p.grad is not None} == {"cuda"}
    state = [t for s in engine.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    assert state and {t.device.type for t in state} == {"cuda"}


@pytest.mark.parametrize("teacher_mode", ["offline", "online"])
def test_the_distill_stage_trains_on_cuda_from_stored_or_live_teacher(pairs, extracted, tiny_params, tmp_path,
                                                                      teacher_mode):
    pair, (logits, _) = pairs["cross"], extracted
    params = tiny_params.distill.model_copy(update={"teacher_mode": teacher_mode, "steps": 2, "checkpoint_every": 5})
    summary = train(pair["prepared"], pair["student"], tmp_path / "model", tmp_path / "checkpoints",
                    tmp_path / "history.csv", params, tiny_params.teacher_logits, pair["teacher"], logits,
                    runtime=Runtime.resolve(RuntimeParams(device="cuda")))
    assert summary.runtime["device"] == "cuda" and summary.runtime["precision"] == "bf16-mixed"
    assert math.isfinite(float(summary.final_loss))


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_under_bf16_autocast_matches_fp32_on_the_same_inputs(pairs, tiny_params, name):
    pair = pairs["same" if LOSSES[name].same_tokenizer_only else "cross"]
    fp32 = Runtime.resolve(RuntimeParams(device="cuda", precision="fp32"))
    bf16 = Runtime.resolve(RuntimeParams(device="cuda", precision="bf16-mixed"))
    setup = Setup(pair, _params(tiny_params, name), fp32, [name])
    batch = setup.batch(list(range(6)))
    view = setup.teacher.view(batch)  # one fp32 teacher view: the inputs both precisions see
    values, gradients = {}, {}
    for runtime in (fp32, bf16):
        setup.student.zero_grad(set_to_none=True)
        setup.losses.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = setup.forward(batch, view, [name], False)[name].loss
        loss.backward()
        values[runtime.precision], gradients[runtime.precision] = float(loss.detach()), setup.gradients()
    assert math.isfinite(values["fp32"]) and values["fp32"] != 0
    assert values["bf16-mixed"] == pytest.approx(values["fp32"], rel=VALUE_TOLERANCE)
    tolerance = SIGN_GRADIENT_TOLERANCE if name in SIGN_GRADIENT_LOSSES else GRADIENT_TOLERANCE
    assert _relative_difference(gradients["bf16-mixed"], gradients["fp32"]) < tolerance


# ------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16-mixed", GRADIENT_TOLERANCE)])
@pytest.mark.parametrize("name, pair", [("alm", "cross"), ("forward_kl", "same")])
def test_four_micro_batches_of_two_give_the_step_of_one_batch_of_eight(pairs, tiny_params, name, pair, precision,
                                                                       tolerance):
    results, gradients = {}, {}
    for size in (8, 2):
        runtime = Runtime.resolve(RuntimeParams(device="cuda", precision=precision, micro_batch_size=size))
        params = _params(tiny_params, name)
        setup = Setup(pairs[pair], params, runtime, [name, "sft"])
        micro_batches = [setup.batch(part) for part in split(list(range(8)), runtime.micro_batch_size)]
        views = [setup.teacher.view(batch) for batch in micro_batches]
        results[size] = setup.engine().step(micro_batches, views, term_weights(params, 0), 1e-3,
                                            f"{size} a micro-batch")
        gradients[size] = setup.gradients()
    assert len(micro_batches) == 4
    for term, value in results[8].values.items():
        assert results[2].values[term] == pytest.approx(value, rel=tolerance), term
    assert results[2].grad_norm == pytest.approx(results[8].grad_norm, rel=tolerance)
    assert _relative_difference(gradients[2], gradients[8]) < tolerance


# ------------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16-mixed", 1e-3)])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(pairs, tiny_params, precision, tolerance):
    gradients = {}
    for checkpointing in (False, True):
        runtime = Runtime.resolve(RuntimeParams(device="cuda", precision=precision,
                                                gradient_checkpointing=checkpointing))
        setup = Setup(pairs["cross"], _params(tiny_params, "alm"), runtime, ["alm", "sft"])
        assert setup.student.is_gradient_checkpointing == checkpointing
        batch = setup.batch(list(range(4)))
        view = setup.teacher.view(batch)
        with runtime.autocast():
            outputs = setup.forward(batch, view, ["alm", "sft"], False)
        sum(output.loss for output in outputs.values()).backward()
        gradients[checkpointing] = setup.gradients()
    assert _relative_difference(gradients[True], gradients[False]) < tolerance


# ------------------------------------------------------------------------------------------ FSDP2


def _free_port() -> int:
    """flows/common.free_port's probe, repeated: that module imports Prefect, which the GPU machine lacks."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_fsdp2_on_one_gpu_trains_like_the_unwrapped_student(pairs, tiny_params, tmp_path, precision):
    """A process group of one (NCCL) makes `parallel.parallelize` apply `fully_shard` for real."""
    pair = pairs["cross"]
    runtime = Runtime.resolve(RuntimeParams(device="cuda", precision=precision, strategy="fsdp"))
    params = _params(tiny_params, "alm", steps=3, batch_size=4, checkpoint_every=2)

    def run(name: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        train(pair["prepared"], pair["student"], out / "model", out / "checkpoints", out / "history.csv", params,
              tiny_params.teacher_logits, pair["teacher"], None, runtime=runtime)
        return load_file(str(out / "model" / "model.safetensors"))

    plain = run("plain")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("cuda:nccl,cpu:gloo", rank=0, world_size=1)
    try:
        sharded = run("fsdp")
    finally:
        dist.destroy_process_group()
    if precision == "fp32":
        for key, tensor in plain.items():
            torch.testing.assert_close(sharded[key], tensor, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, key=key: f"{key}: {m}")
        return
    # bf16: FSDP2 gathers bf16 parameters where the plain run autocasts fp32 ones, so the rounding differs; the two
    # must still agree far better than either moved from the initial weights (on a CPU: 3e-3 apart, as a check).
    initial = load_file(str(pair["student"] / "model.safetensors"))
    moved = max((plain[key] - initial[key]).abs().max().item() for key in plain)
    apart = max((sharded[key] - plain[key]).abs().max().item() for key in plain)
    assert apart < 0.25 * moved, f"FSDP2 vs plain differ by {apart}, training moved the weights by {moved}"
