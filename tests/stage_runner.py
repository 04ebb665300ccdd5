"""Stage runs in processes of their own for tests/test_faults.py, each forked from one process that has imported
the stages once (multiprocessing's forkserver): a run to signal or kill -9 then costs no imports, about 10 s of a
fresh interpreter's start."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

STAGE_MODULES = ["tokenbridge.stages.distill", "tokenbridge.stages.transfer", "tokenbridge.stages.hypernet"]
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload([__name__, *STAGE_MODULES])


def start(args: dict) -> multiprocessing.process.BaseProcess:
    """The stage `args["stage"]` running in a new process, its stdout and stderr written to `args["log"]`."""
    Path(args["log"]).parent.mkdir(parents=True, exist_ok=True)
    process = FORKS.Process(target=_run, args=(args,), daemon=True)
    process.start()
    return process


def _run(args: dict) -> None:
    # Imported here, not at the top: the forkserver has them already, and a test process collecting test_faults.py
    # does not pay for them.
    from tokenbridge import stopping
    from tokenbridge.config import RuntimeParams, TeacherLogitsParams
    from tokenbridge.params import DistillParams, HypernetParams, TransferParams
    from tokenbridge.runtime import Runtime
    from tokenbridge.stages.distill import train
    from tokenbridge.stages.hypernet import train_hypernet
    from tokenbridge.stages.transfer import run_transfer

    output = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for stream in (1, 2):
        os.dup2(output, stream)
    stopping.install()  # SIGTERM / SIGINT stop the stage after its step, with a checkpoint
    runtime = Runtime.resolve(RuntimeParams(**args["runtime"]))
    paths = [Path(path) for path in args["paths"]]
    if args["stage"] == "distill":
        train(*paths[:5], DistillParams(**args["params"]), TeacherLogitsParams(**args["teacher_logits"]), *paths[5:],
              runtime=runtime)
    elif args["stage"] == "transfer":
        run_transfer(*paths, TransferParams(**args["params"]), runtime, Path(args["checkpoints"]))
    else:
        train_hypernet(*paths, HypernetParams(**args["params"]), runtime, Path(args["checkpoints"]))
