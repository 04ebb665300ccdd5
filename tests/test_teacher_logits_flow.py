"""Parallel extraction: shards are Prefect tasks, and with `workers: 2` a real local Dask cluster (prefect-dask)
spreads them over two processes, with the same result as extracting them one by one."""

from __future__ import annotations

import os

import pytest
import torch

from tokenbridge.flows.teacher_logits import extract_shards, task_runner
from tokenbridge.io import read_json
from tokenbridge.runtime import Runtime
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.stages.teacher_logits import run_teacher_logits
from tokenbridge.stored_logits import TeacherLogitsReader

pytestmark = pytest.mark.integration


def test_two_dask_workers_share_the_shards_and_store_what_one_process_does(tiny_params, tiny_dirs, tmp_path):
    run_prepare(tiny_dirs, tmp_path / "prepared", tiny_params.prepare)
    params = tiny_params.teacher_logits.model_copy(update={"examples_per_shard": 2, "workers": 2})
    runtime = Runtime.resolve(tiny_params.runtime)
    parallel = run_teacher_logits(tmp_path / "prepared", tiny_dirs["teacher"], tmp_path / "parallel", params, runtime,
                                  extract_shards.with_options(task_runner=task_runner(params.workers)))
    workers = {read_json((tmp_path / "parallel" / shard.file).with_suffix(".json"))["extracted_by"]["pid"]
               for shard in parallel.shards}
    assert len(workers) == 2 and os.getpid() not in workers, "both worker processes extracted shards"

    sequential = run_teacher_logits(tmp_path / "prepared", tiny_dirs["teacher"], tmp_path / "sequential", params,
                                    runtime)
    assert [s.first_index for s in parallel.shards] == [s.first_index for s in sequential.shards]
    fields = ("token_logprobs", "topk_ids")
    one, two = (TeacherLogitsReader(tmp_path / name, fields, parallel.prepared_sha256)
                for name in ("sequential", "parallel"))
    for index in range(len(one)):
        for field, value in one[index].items():
            torch.testing.assert_close(two[index][field], value, atol=1e-5, rtol=0)
