"""Stage `teacher_logits`: run the teacher once over the training data; store each position's truncated
distribution (top-p then top-k, compact-encoded), observed-token and boundary log-probs with the teacher's
byte spans, in checksummed shards with a manifest. Killed at any point, a rerun extracts only missing shards.

Each shard is one Prefect task. With `teacher_logits.workers: N > 1` the tasks run on a local Dask cluster
of N processes (prefect-dask), each loading the teacher once and taking shards as they free up.

Inputs: models/teacher, data/prepared; params `teacher_logits.*`. With `distill.teacher_mode: online`
nothing is extracted (the teacher runs inside distill) and the manifest says so.
Outputs: data/teacher_logits/ (plan.json, shard-*.safetensors + shard-*.json, manifest.json).
Run alone: tokenbridge teacher_logits   (or: dvc repro teacher_logits)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from prefect import flow, task, unmapped
from prefect.cache_policies import NONE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tokenbridge import tracking
from tokenbridge.contracts import MANIFEST, TeacherLogitsManifest, TeacherLogitsSkipped
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.paths import PREPARED_DIR, TEACHER_DIR, TEACHER_LOGITS_DIR
from tokenbridge.runtime import Runtime
from tokenbridge.stages.teacher_logits import ExtractionPlan, extract_shard, run_teacher_logits


@task(name="extract-shard", cache_policy=NONE)
def extract_shard_task(plan: ExtractionPlan, shard: int, workers: int) -> dict:
    if workers > 1:  # share the host's cores between the worker processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    info = extract_shard(plan, shard)
    print(f"shard {shard}: {info['n_examples']} examples, {info['n_tokens']} tokens, "
          f"{info['bytes'] / max(1, info['n_tokens']):.1f} bytes/token, pid {info['extracted_by']['pid']}")
    return info


def task_runner(workers: int) -> TaskRunner[Any]:
    """One in-process thread (the teacher loaded once), or a local Dask cluster of `workers` processes."""
    if workers == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


@flow(name="extract-teacher-shards", log_prints=True)
def extract_shards(plan: ExtractionPlan) -> list[dict]:
    workers = plan.params.workers
    futures = extract_shard_task.map(unmapped(plan), list(range(plan.n_shards)), unmapped(workers))
    return [future.result() for future in futures]


@flow(name="teacher_logits", log_prints=True)
def teacher_logits(params_file: str = "params.yaml") -> TeacherLogitsManifest | TeacherLogitsSkipped:
    with tracked_stage("teacher_logits", params_file, ("teacher_logits", "runtime")) as params:
        if params.distill.teacher_mode == "online":
            skipped = TeacherLogitsSkipped(
                skipped="distill.teacher_mode is online: the teacher runs at every distill step")
            skipped.write(TEACHER_LOGITS_DIR / MANIFEST)
            return skipped
        manifest = run_teacher_logits(PREPARED_DIR, TEACHER_DIR, TEACHER_LOGITS_DIR, params.teacher_logits,
                                      Runtime.resolve(params.runtime),
                                      extract_shards.with_options(task_runner=task_runner(params.teacher_logits.workers)))
        tracking.log_metrics({"examples": manifest.n_examples, "tokens": manifest.n_tokens,
                              "shards": len(manifest.shards), "bytes_per_token": manifest.bytes_per_token,
                              "distribution_bytes_per_token": manifest.distribution.bytes_per_token,
                              "mean_kept": manifest.distribution.mean_kept})
        tracking.log_artifact(TEACHER_LOGITS_DIR / MANIFEST)
        return manifest


def main(argv: list[str]) -> None:
    stage_cli(teacher_logits, __doc__, argv)
