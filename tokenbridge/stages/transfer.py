"""Stage `transfer`: move a model onto another tokenizer (docs/algorithms/tokenizer-transfer.md).

1. Initialisation (`transfer.init`, tokenbridge.models.retokenize): FVT (`fvt`): for each target token, the
   source row of the same special role (bos, eos, pad, unk), else of the same bytes, else the mean of the rows of
   the source tokens that spell its bytes, else a draw from the source rows' per-dimension mean and std; or a
   trained hypernetwork's predictions (`hypernet`, for the model it was trained for:
   docs/algorithms/hypernetwork.md). Input embeddings and (when untied) the output head are initialised alike.
   The result is saved on its own (`<out>-fvt` or `<out>-hypernet`), so evaluation can compare the
   initialisation alone with it followed by ALM.
2. Self-distillation (`train_transfer`) with `transfer.loss` (ALM by default; any registered cross-tokenizer loss,
   or `sft`, next-token training alone): the original model with its own tokenizer is the frozen teacher; the
   initialised model with the new tokenizer is the student, on the same texts (every token of them a target),
   aligned on common bytes. An embeddings-only phase (`embedding_steps`), then LoRA adapters (peft) or every
   parameter (`steps`), with the embeddings still training. A byte-level target adds the hidden-state loss at
   chunk ends.

Inputs: the prepared train split's texts (`data/prepared/train.jsonl`), the test questions and answers for the
held-out learning curve (`data/prepared/test.jsonl`), each source model (materialised like the `models` stage's),
the target tokenizer. Outputs per source: `models/transferred/<name>/` and `models/transferred/<name>-<init>/` (HF
directories with the target tokenizer and a model card), `data/original_answers/<name>/` (the original's greedy
answers to held-out questions, as the teacher_answers stage writes the teacher's), `metrics/transfer/<name>.csv`
(per-step history, with held-out bits-per-byte on the reference answers and on the original's answers, and their
intervals, every `transfer.heldout_every` steps).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenbridge.config import EvaluateParams, TeacherTruncation
from tokenbridge.contracts import ANSWERS, MODEL_CARD, ContractError, ModelCard, SourceTransfer, TransferTraining
from tokenbridge.data.chat import Encoded, encode_example
from tokenbridge.evaluation.answers import write_greedy_answers
from tokenbridge.evaluation.curve import heldout_columns, heldout_point, heldout_sets, is_curve_step
from tokenbridge.io import atomic_path, fingerprint, read_jsonl, write_text
from tokenbridge.losses.base import DistillLoss, LossSetup
from tokenbridge.losses.latents import HiddenStateTerm
from tokenbridge.losses.registry import build_losses
from tokenbridge.models import (
    copy_tokenizer_files,
    input_embeddings,
    load_model,
    load_tokenizer,
    model_identity,
    output_embeddings,
)
from tokenbridge.models.gguf import default_cache_dir
from tokenbridge.models.retokenize import Init, retokenized_model
from tokenbridge.params import TransferParams
from tokenbridge.runtime import Runtime
from tokenbridge.stopping import safe_points
from tokenbridge.token_bytes import boundary_mask, vocab_bytes
from tokenbridge.training.batching import batch_indices, make_batch, split
from tokenbridge.training.checkpoint import Checkpoint, code_version
from tokenbridge.training.engine import Engine
from tokenbridge.training.history import history_csv, median
from tokenbridge.training.parallel import TrainingModule
from tokenbridge.training.ranks import Ranks
from tokenbridge.training.schedules import learning_rate
from tokenbridge.training.teachers import LiveTeacher, Teacher, signals_read
from tokenbridge.training.views import student_forward

BYTE = "byte"
CHUNK_SIZE = 128  # positions per slice of a vocabulary projection


def target_directory(spec: str, roles: dict[str, Path]) -> Path | None:
    """The directory holding the tokenizer `transfer.tokenizer` names (None: bytes, built per source)."""
    if spec == BYTE:
        return None
    directory = roles.get(spec, Path(spec).expanduser())
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"transfer.tokenizer: {directory} holds no tokenizer.json; give 'student', 'teacher', "
                                "'byte' or a local HF model/tokenizer directory")
    return directory


def init_path(out_dir: Path, init: Init) -> Path:
    """Where the untrained starting model of `out_dir` is kept (`<name>-fvt`, `<name>-hypernet`)."""
    return out_dir.with_name(f"{out_dir.name}-{init}")


def _whole_text(encoded: Encoded) -> Encoded:
    """Every token a training target (but the first, which nothing predicts): self-distillation learns the whole
    text, the question's too, whatever the loss."""
    return replace(encoded, loss_mask=[index > 0 for index in range(len(encoded.input_ids))])


def _encoded_pairs(records: list[dict], teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                   max_length: int) -> tuple[list[Encoded], list[Encoded]]:
    tables = vocab_bytes(teacher), vocab_bytes(student)
    teachers, students = [], []
    for record in records:
        pair = [_whole_text(encode_example(tok, record["question"], record["answer"], table))
                for tok, table in zip((teacher, student), tables)]
        if all(len(encoded.input_ids) <= max_length for encoded in pair):
            teachers.append(pair[0])
            students.append(pair[1])
    if not teachers:
        raise ValueError(f"transfer: every training example is longer than max_length={max_length}; raise it")
    return teachers, students


def _embedding_parameters(model: PreTrainedModel) -> list[torch.Tensor]:
    found = [input_embeddings(model), output_embeddings(model)]
    unique = {id(parameter): parameter for parameter in found}
    return list(unique.values())


def _with_lora(model: PreTrainedModel, params: TransferParams) -> PreTrainedModel:
    """Wrap every linear layer of the decoder's blocks with LoRA adapters (q/k/v/o and MLP;
    docs/algorithms/tokenizer-transfer.md#alm-self-distillation)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.get_decoder().named_modules()
                      if isinstance(module, torch.nn.Linear)})
    config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=0.0, target_modules=targets)
    return cast(PreTrainedModel, get_peft_model(model, config))  # a PeftModel forwards the HF model's methods


def train_transfer(records: list[dict], source_dir: Path, start_dir: Path, out_dir: Path, history_path: Path,
                   params: TransferParams, runtime: Runtime, checkpoint_dir: Path,
                   heldout: list[dict] | None = None, original_answers: list[dict] | None = None) -> TransferTraining:
    """Self-distillation with `params.loss` from the original model (teacher, own tokenizer) into the moved model
    in `start_dir` (FVT or hypernetwork rows); saves the result (LoRA merged) at `out_dir`. With `heldout` (test
    records), the history gets the held-out learning curve (`evaluation.curve`) every `heldout_every` steps and at the
    last, on their reference answers and on `original_answers` (the original's own greedy answers) where given:
    points inside one run, whose learning rate decays to its last step. A finished output of the same
    configuration is kept as it is. Each phase checkpoints under `checkpoint_dir/<phase>` every
    `checkpoint_every` steps and at its end, so a rerun resumes where a stop or a crash left it; SIGTERM / SIGINT
    stop it after the current step, with a checkpoint."""
    start_card = ModelCard.of(start_dir)
    heldout, original_answers = (heldout or [], original_answers or []) if params.heldout_every else ([], [])
    identity = {"params": params.model_dump(), "start": model_identity(start_dir), "source": model_identity(source_dir),
                "records": fingerprint(records), "heldout": fingerprint([heldout, original_answers]),
                "code": code_version(__file__)}
    key = fingerprint(identity)
    try:
        finished: ModelCard | None = ModelCard.of(out_dir)
    except ContractError:  # not trained yet, or by another version: train it (again)
        finished = None
    if finished is not None and finished.fingerprint == key and finished.training is not None:
        print(f"transfer: {out_dir} is up to date", file=sys.stderr)
        return finished.training
    torch.manual_seed(params.seed)
    teacher_tokenizer, student_tokenizer = load_tokenizer(source_dir), load_tokenizer(start_dir)
    teachers, students = _encoded_pairs(records, teacher_tokenizer, student_tokenizer, params.max_length)
    answers = heldout_sets(student_tokenizer, heldout, {"original_answers": original_answers})
    total_steps = params.embedding_steps + params.steps
    teacher = LiveTeacher(Teacher.load(source_dir, runtime.inference_dtype, runtime.device), teachers,
                          TeacherTruncation(), 1.0, CHUNK_SIZE)
    student = runtime.prepare_student(load_model(start_dir, torch.float32).train())
    byte_level = start_card.byte_level
    boundaries = {"teacher": boundary_mask(teacher_tokenizer, output_embeddings(teacher.teacher.model).shape[0]),
                  "student": boundary_mask(student_tokenizer, output_embeddings(student).shape[0])}
    setup = LossSetup(source_dir, start_dir, same_tokenizer=False, cache_dir=default_cache_dir())
    terms: dict[str, DistillLoss | HiddenStateTerm] = {**build_losses([params.loss], params, setup),
                                                       "hidden_state": HiddenStateTerm()}
    losses = torch.nn.ModuleDict(terms)
    losses.to(runtime.device)
    weights = {params.loss: 1.0, "hidden_state": params.hidden_state_weight if byte_level else 0.0}
    signals = signals_read(terms, weights)  # next-token training onto tokens (`sft`) skips the teacher's forward

    history: list[dict] = []
    phases = [("embeddings", params.embedding_steps, params.embedding_learning_rate),
              (params.train, params.steps, params.learning_rate)]
    for phase, steps, peak in phases:
        if steps == 0:
            continue
        if phase == "lora":
            torch.manual_seed(params.seed + 1)  # the adapters' init, whether phase 1 ran here or was resumed
            student = _with_lora(student, params)
        student.requires_grad_(phase == "full")
        if phase == "lora":
            for name, parameter in student.named_parameters():
                parameter.requires_grad_("lora_" in name)
        for weight in _embedding_parameters(student):
            weight.requires_grad_(True)
        trainable = [parameter for parameter in [*student.parameters(), *losses.parameters()]
                     if parameter.requires_grad]  # and a loss's own (DSKD's projectors)
        module = TrainingModule(student, losses, student_forward(
            student, losses, len(student_tokenizer), boundaries["student"].to(runtime.device), CHUNK_SIZE))
        optimizer = torch.optim.AdamW(trainable, lr=peak, weight_decay=0.0)
        engine = Engine(module, optimizer, runtime, Ranks(), params.max_grad_norm)
        checkpoint = Checkpoint(checkpoint_dir / phase, identity, module, optimizer, Ranks())
        done, saved = checkpoint.resume()
        if done:
            history = saved
        with safe_points():  # SIGTERM / SIGINT: finish the step, checkpoint, stop
            for phase_step in tqdm(range(done, steps), desc=f"transfer ({phase})", unit="step", initial=done,
                                   total=steps):
                started, step = time.perf_counter(), len(history)
                indices = batch_indices(step, params.batch_size, len(students), len(students), params.seed)
                micro_batches = [make_batch([students[i] for i in part], teacher.examples(part)[0], boundaries)
                                 .to(runtime.device) for part in split(indices, runtime.micro_batch_size)]
                rate = learning_rate(phase_step, steps, peak, params.warmup_steps)
                result = engine.step(micro_batches, [teacher.view(batch, signals) for batch in micro_batches], weights,
                                     rate, f"transfer step {step}")
                history.append({"step": step + 1, "phase": phase, "loss": result.loss,
                                f"{params.loss}_loss": result.values[params.loss],
                                "hidden_state_loss": result.values.get("hidden_state", 0.0), "learning_rate": rate,
                                "grad_norm": result.grad_norm, "seconds": time.perf_counter() - started})
                if answers and is_curve_step(step + 1, total_steps, params.heldout_every):
                    history[-1] |= heldout_point(student, answers, len(student_tokenizer), runtime.device)
                done = phase_step + 1
                # A phase's final state is kept too, so a later phase can resume after it.
                checkpoint.at_step_end(done, history, due=done == steps or done % params.checkpoint_every == 0)

    merge_lora = getattr(student, "merge_and_unload", None)  # present after a LoRA phase
    if merge_lora is not None:
        student = merge_lora()
    summary = TransferTraining(steps=len(history), final_loss=history[-1]["loss"] if history else None,
                               first_loss=history[0]["loss"] if history else None, examples=len(students),
                               median_seconds_per_step=median([r["seconds"] for r in history]) if history else None)
    with atomic_path(out_dir) as temporary:
        student.save_pretrained(temporary)
        copy_tokenizer_files(start_dir, temporary)
        start_card.model_copy(update={"name": f"{start_card.transferred_from}-transferred", "fingerprint": key,
                                    "training": summary, "transfer": params.model_dump()}).write(temporary / MODEL_CARD)
    write_text(history_path, history_csv(history, ("step", "phase", "loss", f"{params.loss}_loss", "hidden_state_loss",
                                                   "learning_rate", "grad_norm", "seconds", *heldout_columns(answers))))
    return summary


def run_transfer(prepared_dir: Path, source_dir: Path, target_dir: Path | None, out_dir: Path, history_path: Path,
                 params: TransferParams, runtime: Runtime, checkpoint_dir: Path,
                 hypernet_dir: Path | None = None, heldout: EvaluateParams | None = None,
                 answers_dir: Path | None = None) -> SourceTransfer:
    """`params.init` (FVT or the hypernetwork) then self-distillation for one source; writes
    `<out_dir>-<init>` and `out_dir`, checkpointing under `checkpoint_dir`. With `heldout` (the evaluation's terms),
    the first `heldout.bpb_examples` test answers score the held-out learning curve; with `answers_dir` too, the
    original model's greedy answers to the first `heldout.teacher_answers` test questions (those the new tokenizer
    spells too) are written there, once per run, for the curve and for evaluate_transfer: how close the moved model
    stays to what the original says."""
    start_dir = init_path(out_dir, params.init)
    counts = retokenized_model(source_dir, target_dir, start_dir, params.init, params.seed, hypernet_dir)
    records = read_jsonl(Path(prepared_dir) / "train.jsonl")
    test_jsonl = Path(prepared_dir) / "test.jsonl"
    test = read_jsonl(test_jsonl)[:heldout.bpb_examples] if heldout is not None else []
    original_answers = []
    if heldout is not None and answers_dir is not None and heldout.teacher_answers:
        manifest = write_greedy_answers(test_jsonl, source_dir, start_dir, answers_dir, heldout.teacher_answers,
                                        heldout.max_gen_toks, heldout.batch_size, runtime)
        print(f"transfer: the original's {manifest.examples} answers ({manifest.unreadable} left out) in {answers_dir}",
              file=sys.stderr)
        original_answers = read_jsonl(answers_dir / ANSWERS)
    summary = train_transfer(records, source_dir, start_dir, out_dir, history_path, params, runtime, checkpoint_dir,
                             test, original_answers)
    return SourceTransfer(**{params.init: counts}, **summary.model_dump())
