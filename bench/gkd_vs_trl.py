"""Benchmark: our on-policy distillation step against TRL's GKDTrainer (trl 1.16.0), in one process.

Both train the same tiny same-tokenizer pair (a random Llama student and a bigger random teacher sharing its
tokenizer files) on the same prepared GSM-style data, with the same seed, steps, batch size, learning rate,
student-data fraction lambda, JSD beta, sampling temperature and max new tokens:

- ours: `tokenbridge.stages.distill.train` with `loss: jsd`, `alpha: 1` (the divergence alone, as GKD), the live
  teacher, `on_policy: {fraction: lambda, ...}`; its per-step time is the history's `seconds` (batch,
  sampling, teacher and student passes, loss, backward, optimizer step);
- TRL: `GKDTrainer(...).train()`, per-step time from `on_step_begin` to `on_step_end` (the same work; TRL
  collates its batch before `on_step_begin`, which it does not count).

Reported: the median seconds per step of each (the first step of each run dropped: warm-up), their ratio
ours / TRL, at lambda = 1 (every step samples) and lambda = 0 (no sampling); then, on one identical batch at
lambda = 0 (the first batch our loop trains on, as TRL's `input_ids`/`attention_mask`/`labels`), our logged
step loss and TRL's `compute_loss` for beta in {0, 0.5, 1}. Exits with status 1 if they differ by more than
1e-4. Random models rarely sample their end-of-turn token, so both generate `--max-new-tokens` per sample.

Usage: python bench/gkd_vs_trl.py [--steps 12] [--batch 4] [--max-new-tokens 48] [--student-hidden 128]
       [--teacher-hidden 256] [--layers 4] [--vocab 4096] [--json results.json]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenbridge.config import HfModelSpec, PrepareParams, RuntimeParams, TeacherLogitsParams, TinyModelSpec  # noqa: E402
from tokenbridge.data.chat import chat_messages  # noqa: E402
from tokenbridge.data.padding import pad_batch  # noqa: E402
from tokenbridge.io import read_jsonl, write_json  # noqa: E402
from tokenbridge.models import load_model, load_tokenizer, materialize  # noqa: E402
from tokenbridge.models.tiny import build_tiny_teacher_like  # noqa: E402
from tokenbridge.params import DistillParams  # noqa: E402
from tokenbridge.runtime import Runtime  # noqa: E402
from tokenbridge.stages.distill import train  # noqa: E402
from tokenbridge.stages.prepare import run_prepare  # noqa: E402
from tokenbridge.training.batching import batch_indices  # noqa: E402

TOLERANCE = 1e-4
LEARNING_RATE = 1e-4
TEMPERATURE = 1.0
SEED = 1234
EXAMPLES_PER_SHARD = 32  # our shard-blocked shuffle's block (no stored logits here: online teacher)


def build_pair(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    student = TinyModelSpec(source="tiny", tokenizer="metaspace", vocab_size=args.vocab,
                            hidden_size=args.student_hidden, num_layers=args.layers, chat_format="plain", seed=2)
    materialize(student, root / "student", root / "cache")
    build_tiny_teacher_like(root / "student", root / "teacher-source", args.teacher_hidden, seed=7)
    materialize(HfModelSpec(source="hf", path=str(root / "teacher-source")), root / "teacher", root / "cache")
    dirs = {"student": root / "student", "teacher": root / "teacher"}
    run_prepare(dirs, root / "prepared", PrepareParams(n_train=64, n_test=8, max_length=512))
    return dirs


def our_params(args: argparse.Namespace, fraction: float, beta: float, steps: int) -> DistillParams:
    return DistillParams(teacher_mode="online", steps=steps, batch_size=args.batch, learning_rate=LEARNING_RATE,
                         loss="jsd", alpha=1.0, jsd={"beta": beta}, checkpoint_every=steps + 1, seed=SEED,
                         on_policy={"fraction": fraction, "temperature": TEMPERATURE,
                                    "max_new_tokens": args.max_new_tokens})


def run_ours(root: Path, dirs: dict[str, Path], params: DistillParams, name: str, runtime: Runtime
             ) -> tuple[list[dict], list[dict]]:
    """Our training loop; returns (history rows, logged metrics per step)."""
    logged: list[dict] = []
    teacher_logits = TeacherLogitsParams(top_k=1, temperature=1.0, batch_size=1, examples_per_shard=EXAMPLES_PER_SHARD)
    train(root / "prepared", dirs["student"], root / name / "model", root / name / "checkpoints",
          root / name / "history.csv", params, teacher_logits, dirs["teacher"], None,
          log_metrics=lambda metrics, step: logged.append(metrics), runtime=runtime)
    with open(root / name / "history.csv") as handle:
        return list(csv.DictReader(handle)), logged


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def trl_trainer(root: Path, dirs: dict[str, Path], args: argparse.Namespace, fraction: float, beta: float, steps: int,
                name: str, runtime: Runtime) -> tuple[GKDTrainer, StepTimer]:
    tokenizer = load_tokenizer(dirs["student"])
    records = list(read_jsonl(root / "prepared" / "train.jsonl"))
    dataset = Dataset.from_list([{"messages": chat_messages(r["question"], r["answer"])} for r in records])
    config = GKDConfig(output_dir=str(root / name), per_device_train_batch_size=args.batch, max_steps=steps,
                       learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, lmbda=fraction,
                       beta=beta, temperature=TEMPERATURE, max_new_tokens=args.max_new_tokens, seed=SEED,
                       report_to="none", logging_strategy="no", save_strategy="no",
                       use_cpu=runtime.device.type == "cpu", bf16=False, disable_tqdm=True,
                       dataloader_num_workers=0, max_length=1024)
    timer = StepTimer()
    trainer = GKDTrainer(model=load_model(dirs["student"]), teacher_model=load_model(dirs["teacher"]), args=config,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    return trainer, timer


def identical_batch(root: Path, batch: int) -> dict[str, torch.Tensor]:
    """The first batch our loop trains on, as TRL's inputs (labels -100 off the answer and end-of-turn tokens)."""
    records = list(read_jsonl(root / "prepared" / "train.student.jsonl"))
    chosen = [records[i] for i in batch_indices(0, batch, len(records), EXAMPLES_PER_SHARD, SEED)]
    ids, mask = pad_batch([r["input_ids"] for r in chosen])
    target = torch.zeros_like(ids, dtype=torch.bool)
    for row, record in enumerate(chosen):
        target[row, : len(record["loss_mask"])] = torch.tensor(record["loss_mask"], dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~target, -100)}


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="as runtime.device; both trainers run there, in fp32 (TRL's default)")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    runtime = Runtime.resolve(RuntimeParams(device=args.device, precision="fp32"))

    settings = {key: value for key, value in vars(args).items() if key != "json"}
    results: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "settings": settings | {"learning_rate": LEARNING_RATE, "temperature": TEMPERATURE, "seed": SEED},
                     "timing": [], "loss": []}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        dirs = build_pair(root, args)
        for fraction in (1.0, 0.0):
            history, _ = run_ours(root, dirs, our_params(args, fraction, 0.5, args.steps), f"ours-{fraction}", runtime)
            trainer, timer = trl_trainer(root, dirs, args, fraction, 0.5, args.steps, f"trl-{fraction}", runtime)
            trainer.train()
            ours = median_after_first([float(row["seconds"]) for row in history])
            theirs = median_after_first(timer.seconds)
            results["timing"].append({
                "lambda": fraction, "ours_seconds": ours, "trl_seconds": theirs, "ratio": ours / theirs,
                "ours_generation_seconds": median_after_first([float(r["generation_seconds"]) for r in history]),
                "ours_update_seconds": median_after_first([float(r["update_seconds"]) for r in history])})
        inputs = identical_batch(root, args.batch)
        for beta in (0.0, 0.5, 1.0):
            _, logged = run_ours(root, dirs, our_params(args, 0.0, beta, 1), f"loss-{beta}", runtime)
            trainer, _ = trl_trainer(root, dirs, args, 0.0, beta, 1, f"trl-loss-{beta}", runtime)
            with torch.no_grad():
                reference = trainer.compute_loss(trainer.model, {key: value.to(trainer.model.device)
                                                                 for key, value in inputs.items()}).item()
            results["loss"].append({"beta": beta, "ours": logged[0]["jsd_loss"], "trl": reference,
                                    "difference": abs(logged[0]["jsd_loss"] - reference)})

    print(f"# On-policy step: ours vs TRL GKDTrainer 1.16.0 ({results['machine']}, {results['cpus']} CPUs, "
          f"torch {results['torch']}, {results['torch_threads']} threads)\n")
    print(f"Student: Llama hidden {settings['student_hidden']}, teacher hidden {settings['teacher_hidden']}, "
          f"{settings['layers']} layers, one tokenizer of {settings['vocab']} tokens; batch {settings['batch']}, "
          f"{settings['steps']} steps, max new tokens {settings['max_new_tokens']}, "
          f"temperature {TEMPERATURE}, beta 0.5.\n")
    print("| lambda | ours s/step | TRL s/step | ratio ours/TRL | ours: generation s | ours: update s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in results["timing"]:
        print(f"| {row['lambda']:g} | {row['ours_seconds']:.4f} | {row['trl_seconds']:.4f} | {row['ratio']:.2f} | "
              f"{row['ours_generation_seconds']:.4f} | {row['ours_update_seconds']:.4f} |")
    print("\nLoss on one identical batch at lambda = 0 (the initial student):\n")
    print("| beta | ours | TRL | abs difference |")
    print("|---:|---:|---:|---:|")
    for row in results["loss"]:
        print(f"| {row['beta']:g} | {row['ours']:.8f} | {row['trl']:.8f} | {row['difference']:.2e} |")
    agree = all(row["difference"] <= TOLERANCE for row in results["loss"])
    print(f"\nlosses agree to {TOLERANCE:g}: {'yes' if agree else 'NO'}")
    if args.json:
        write_json(args.json, results)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
