"""Stage `distill`: train the student with the loss `distill.loss` names (ALM by default; also ULD, MinED,
MultiLevelOT, DSKD across tokenizers, KL-family losses within one; docs/losses.md), mixed with next-token
cross-entropy by `distill.alpha` or balanced by GradMag, from stored teacher logits (offline) or a live
teacher (online). With `distill.on_policy.fraction` > 0 (GKD's lambda; online teacher) that share of the steps
trains on answers the student samples, scored by the teacher with its own tokenizer. Checkpoints every
`distill.checkpoint_every` steps; a rerun resumes from the last one.

Inputs: data/prepared, data/teacher_logits (offline) or models/teacher (online), models/student,
data/teacher_answers (the held-out curve); params `distill.*`, `evaluate.bpb_examples` (the curve's test answers).
Outputs: models/distilled/ (HF directory), metrics/distill_history.csv (loss curves, and the held-out learning curve
every `distill.heldout_every` steps), metrics/distill.json, checkpoints/distill/. Both curves also go to MLflow.
Run alone: tokenbridge distill   (or: dvc repro distill)
Device, precision, micro-batches (gradient accumulation), gradient checkpointing, compile: params `runtime.*`.
Several processes: set runtime.processes_per_node (and runtime.nodes, runtime.strategy: ddp | fsdp); this command
  (so `dvc repro`) then relaunches itself under torchrun. By hand: torchrun --standalone --nproc-per-node N -m
  tokenbridge distill, or `accelerate launch --multi_gpu --num_processes N -m tokenbridge distill`. Every rank
  trains on its contiguous share of each step's `distill.batch_size` examples (the global batch), one GPU per
  process (NCCL) or on CPUs (gloo); the result equals one process on the same batches
  (tokenbridge/training/engine.py). Rank 0 alone runs the Prefect flow, logs to MLflow and writes outputs.
  docs/distributed.md.
"""

from collections.abc import Callable
from pathlib import Path

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import ANSWERS, DistillMetrics
from tokenbridge.flows.common import launch_processes, stage_cli, tracked_stage
from tokenbridge.params import PipelineParams, load_params
from tokenbridge.paths import (
    CHECKPOINT_DIR,
    DISTILL_HISTORY,
    DISTILL_METRICS,
    DISTILLED_DIR,
    PREPARED_DIR,
    STUDENT_DIR,
    TEACHER_ANSWERS_DIR,
    TEACHER_DIR,
    TEACHER_LOGITS_DIR,
)
from tokenbridge.runtime import Runtime
from tokenbridge.stages.distill import train
from tokenbridge.training.ranks import process_group


def _train(params: PipelineParams, log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None
           ) -> DistillMetrics:
    return train(PREPARED_DIR, STUDENT_DIR, DISTILLED_DIR, CHECKPOINT_DIR, DISTILL_HISTORY, params.distill,
                 params.teacher_logits, TEACHER_DIR, TEACHER_LOGITS_DIR, log_metrics=log_metrics,
                 runtime=Runtime.resolve(params.runtime), heldout_examples=params.evaluate.bpb_examples,
                 teacher_answers=TEACHER_ANSWERS_DIR / ANSWERS if params.evaluate.teacher_answers else None)


@flow(name="distill", log_prints=True)
def distill(params_file: str = "params.yaml") -> DistillMetrics:
    with tracked_stage("distill", params_file, ("distill", "runtime")) as params:
        summary = _train(params, tracking.log_metrics)
        summary.write(DISTILL_METRICS)
        tracking.log_artifact(DISTILL_HISTORY)
        return summary


def distill_rank(params_file: str = "params.yaml") -> DistillMetrics:
    """A rank other than 0 under torchrun: trains its share of every batch, outside Prefect and MLflow."""
    return _train(load_params(Path(params_file)))


def main(argv: list[str]) -> None:
    launch_processes("distill", argv)
    with process_group() as ranks:
        stage_cli(distill if ranks.main else distill_rank, __doc__, argv)
