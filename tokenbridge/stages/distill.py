"""Stage `distill`: train the student with the distillation loss(es) `distill.loss` names, mixed with next-token
cross-entropy, across tokenizers (or within one).

Inputs: `data/prepared/` (both models' tokenizations of the training set), the teacher either as stored
logits (`data/teacher_logits/`, offline) or as a model run at every step (online), the student directory.
Outputs: the distilled student as a HF directory, a per-step history CSV (with the held-out learning curve every
`distill.heldout_every` steps: `tokenbridge.evaluation.curve`), and checkpoints that let an
interrupted run resume at its last checkpoint (the final state is one too, so a run that fails after training, in
a tracking call say, is rewritten from it without training again). SIGTERM or SIGINT stops the run after its
current step, with a checkpoint (`tokenbridge.stopping`).

On a share `distill.on_policy.fraction` of the steps (GKD's lambda; online teacher) the batch is not the
dataset's answers but responses the student samples (`tokenbridge.on_policy`); generation and update times
are logged apart.

The loop is `train` below: batch (dataset or student samples) -> teacher view -> student view -> loss terms
-> one engine step (`tokenbridge.training.engine`: accumulation over `runtime.micro_batch_size`, ranks, clip).
Under `torchrun --nproc-per-node N -m tokenbridge distill` each of N processes trains on its contiguous share of
every step's `distill.batch_size` examples; the result equals one process on the same global batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from tokenbridge.config import TeacherLogitsParams
from tokenbridge.contracts import MANIFEST, MODEL_CARD, DistillMetrics, ModelCard, PreparedManifest
from tokenbridge.data.chat import Encoded
from tokenbridge.evaluation.curve import heldout_columns, heldout_point, heldout_sets, is_curve_step
from tokenbridge.io import atomic_path, fingerprint, read_jsonl, sha256_file, write_text
from tokenbridge.losses.base import LossSetup
from tokenbridge.losses.registry import build_losses, teacher_fields
from tokenbridge.models import load_model, load_tokenizer, model_identity
from tokenbridge.models.gguf import default_cache_dir
from tokenbridge.on_policy import OnPolicySampler, is_on_policy_step
from tokenbridge.params import DistillParams
from tokenbridge.runtime import Runtime
from tokenbridge.sampling import generation_end_ids
from tokenbridge.stopping import safe_points
from tokenbridge.stored_logits import TeacherLogitsReader
from tokenbridge.token_bytes import boundary_mask
from tokenbridge.training.batching import batch_indices, make_batch, split
from tokenbridge.training.checkpoint import Checkpoint, code_version
from tokenbridge.training.engine import Engine
from tokenbridge.training.history import history_csv, median
from tokenbridge.training.parallel import TrainingModule, gathered, parallelize, student_weights
from tokenbridge.training.ranks import Ranks
from tokenbridge.training.schedules import alpha_at, learning_rate, term_weights
from tokenbridge.training.teachers import LiveTeacher, StoredTeacher, Teacher, signals_read
from tokenbridge.training.views import student_forward


def train(
    prepared_dir: Path, student_dir: Path, out_dir: Path, checkpoint_dir: Path, history_path: Path,
    params: DistillParams, teacher_params: TeacherLogitsParams, teacher_dir: Path, teacher_logits_dir: Path | None,
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
    *, runtime: Runtime, heldout_examples: int = 0, teacher_answers: Path | None = None,
) -> DistillMetrics:
    """Train the student; every rank of a `process_group` runs this, on its share of each step's batch. With
    `heldout_examples`, the history gets the held-out learning curve on the first that many test answers and on
    `teacher_answers` (the teacher_answers stage's records) where given."""
    ranks = Ranks.current()  # params validation guarantees every rank at least one example a step
    torch.manual_seed(params.seed)
    prepared = PreparedManifest.read(Path(prepared_dir) / MANIFEST).splits.train
    students = [Encoded.from_json(r) for r in read_jsonl(prepared_dir / "train.student.jsonl")]
    student_card, teacher_card = ModelCard.of(student_dir), ModelCard.of(teacher_dir)
    setup = LossSetup(teacher_dir, student_dir, teacher_card.tokenizer_sha256 == student_card.tokenizer_sha256,
                      default_cache_dir())
    term_names = params.losses if params.losses == ["sft"] else [*params.losses, "sft"]
    built = build_losses(term_names, params, setup)
    losses = torch.nn.ModuleDict(built)
    teacher: StoredTeacher | LiveTeacher
    if params.teacher_mode == "offline":
        assert teacher_logits_dir is not None, "offline distillation reads the teacher_logits stage's output"
        reader = TeacherLogitsReader(teacher_logits_dir, teacher_fields(built), prepared.sha256.teacher, teacher_card)
        teacher = StoredTeacher(reader, params.teacher)
    else:
        teachers = [Encoded.from_json(r) for r in read_jsonl(prepared_dir / "train.teacher.jsonl")]
        teacher = LiveTeacher(Teacher.load(teacher_dir, runtime.inference_dtype, runtime.device), teachers,
                              params.teacher, teacher_params.temperature, params.logits_chunk_size)

    tokenizer, teacher_tokenizer = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    curve = bool(heldout_examples and params.heldout_every)
    heldout = {"test": read_jsonl(prepared_dir / "test.jsonl")[:heldout_examples] if curve else [],
               "teacher_answers": read_jsonl(teacher_answers) if curve and teacher_answers else []}
    answers = heldout_sets(tokenizer, heldout["test"], {"teacher_answers": heldout["teacher_answers"]})
    student = runtime.prepare_student(load_model(student_dir, torch.float32).train())
    losses.to(runtime.device)
    boundary = boundary_mask(tokenizer, student.get_output_embeddings().weight.shape[0])
    word_starts = {"student": boundary, "teacher": boundary_mask(teacher_tokenizer, len(teacher_tokenizer))}
    if params.on_policy.fraction > 0:  # some steps train on the student's own answers to these questions
        questions = [record["question"] for record in read_jsonl(prepared_dir / "train.jsonl")]
        sampler = OnPolicySampler(tokenizer, None if setup.same_tokenizer else teacher_tokenizer,
                                  generation_end_ids(student), params.on_policy, params.seed)
    module = TrainingModule(student, losses, student_forward(student, losses, len(tokenizer),
                                                             boundary.to(runtime.device), params.logits_chunk_size))
    ranks.broadcast([parameter.data for parameter in module.parameters()])  # the ranks start equal
    model = parallelize(module, runtime, ranks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    engine = Engine(model, optimizer, runtime, ranks, params.max_grad_norm, params.combine,
                    [student.get_output_embeddings().weight])

    logits_manifest = (sha256_file(teacher_logits_dir / MANIFEST)
                       if params.teacher_mode == "offline" and teacher_logits_dir else None)
    identity = {"params": params.model_dump(), "prepared": prepared.sha256.model_dump(),
                "student": model_identity(student_dir), "teacher": model_identity(teacher_dir),
                "stored_logits": logits_manifest, "teacher_temperature": teacher.temperature,
                "heldout": fingerprint(heldout), "code": code_version(__file__)}
    checkpoint = Checkpoint(checkpoint_dir, identity, model, optimizer, ranks)
    start_step, history = checkpoint.resume()
    history_fields = ("step", "loss", *(f"{name}_loss" for name in term_names), "alpha", "learning_rate", "on_policy",
                      "completion_tokens", "generation_seconds", "update_seconds", "seconds", *heldout_columns(answers))

    bar = tqdm(range(start_step, params.steps), desc=f"distill ({'+'.join(params.losses)})", unit="step",
               initial=start_step, total=params.steps, disable=not ranks.main)
    with safe_points():  # SIGTERM / SIGINT: finish the step, checkpoint, stop
        for step in bar:
            started = time.perf_counter()
            indices = ranks.share(batch_indices(step, params.batch_size, len(students),
                                                teacher_params.examples_per_shard, params.seed))
            on_policy = is_on_policy_step(step, params.on_policy.fraction, params.seed)
            generation_seconds, completion_tokens = 0.0, 0.0
            if on_policy:  # the student answers the batch's questions; the teacher scores its samples
                # Each rank seeds its draws with its own key, so ranks never share a random stream.
                sample_key = step if ranks.size == 1 else step * ranks.size + ranks.rank
                with gathered(model), runtime.autocast():
                    sampled = sampler(student, [questions[i] for i in indices], sample_key)
                generation_seconds = time.perf_counter() - started
                (sampled_tokens,) = ranks.sum_floats([sum(e.loss_mask.count(True) for e in sampled[0])])
                completion_tokens = sampled_tokens / params.batch_size
                parts = split(list(range(len(indices))), runtime.micro_batch_size)
                micro_batches = [make_batch([sampled[0][i] for i in part], [sampled[1][i] for i in part], word_starts)
                                 for part in parts]
            else:
                micro_batches = []
                for part in split(indices, runtime.micro_batch_size):
                    teacher_side, stored = teacher.examples(part)
                    micro_batches.append(make_batch([students[i] for i in part], teacher_side, word_starts, stored))
            micro_batches = [batch.to(runtime.device) for batch in micro_batches]
            step_weights = term_weights(params, step, on_policy)
            signals = signals_read(built, step_weights)
            views = [teacher.view(batch, signals) for batch in micro_batches]
            rate = learning_rate(step, params.steps, params.learning_rate, params.warmup_steps)
            result = engine.step(micro_batches, views, step_weights, rate, f"distill step {step}")

            seconds = time.perf_counter() - started
            metrics = {**result.metrics, **{f"{name}_loss": value for name, value in result.values.items()},
                       **{f"weight.{name}": value for name, value in result.weights.items()},
                       "grad_norm": result.grad_norm, "loss": result.loss,
                       "alpha": 1.0 if on_policy else alpha_at(step, params), "learning_rate": rate,
                       "on_policy": int(on_policy), "completion_tokens": completion_tokens,
                       "generation_seconds": generation_seconds, "update_seconds": seconds - generation_seconds,
                       "seconds": seconds}
            if answers and is_curve_step(step + 1, params.steps, params.heldout_every):
                with gathered(model):  # every rank scores (a collective under FSDP); the ranks' points are equal
                    metrics |= heldout_point(student, answers, len(tokenizer), runtime.device)
            history.append({"step": step + 1, **{field: metrics.get(field, "") for field in history_fields[1:]}})
            if ranks.main:
                log_metrics(metrics, step + 1)
                bar.set_postfix(loss=f"{result.loss:.4f}")
            last = step + 1 == params.steps  # the final state too: a rerun after a failure past here trains nothing
            checkpoint.at_step_end(step + 1, history, due=last or (step + 1) % params.checkpoint_every == 0)

    weights = student_weights(model)  # a collective: every rank gathers its shards
    if ranks.main:
        with atomic_path(out_dir) as temporary:
            student.save_pretrained(temporary, state_dict=weights)
            tokenizer.save_pretrained(temporary)
            distilled = {"name": f"{student_card.name}-distilled", "distilled_from": student_card.name,
                         "loss": params.losses}
            student_card.model_copy(update=distilled).write(temporary / MODEL_CARD)
        write_text(history_path, history_csv(history, history_fields))
    timed = history[start_step:] or history  # resumed from the final checkpoint: the original run's times
    on_policy_rows = [row for row in timed if row["on_policy"]]
    return DistillMetrics(
        loss="+".join(params.losses), steps=params.steps, resumed_from_step=start_step,
        final_loss=history[-1]["loss"], on_policy_steps=sum(row["on_policy"] for row in history),
        median_seconds_per_step=median([row["seconds"] for row in timed]),
        median_update_seconds=median([row["update_seconds"] for row in timed]),
        runtime={**runtime.describe(), "processes": ranks.size},
        median_generation_seconds=(median([row["generation_seconds"] for row in on_policy_rows])
                                   if on_policy_rows else None))
