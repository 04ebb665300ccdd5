"""The whole chain as one Prefect flow: `dvc repro` inside an MLflow parent run, so DVC decides what is
stale and every stage run it starts is grouped under this pipeline execution.

  tokenbridge pipeline                         run once (what `make run` does)
  tokenbridge pipeline --serve --cron "0 3 * * *"
                                                   serve as a scheduled deployment; needs a real Prefect
                                                   server (see docs/servers.md#schedules)
  tokenbridge pipeline --pool tokenbridge --cron "0 3 * * *"
                                                   register the scheduled deployment on a work pool instead;
                                                   `prefect worker start --pool tokenbridge` runs it here
Extra arguments after `--` go to `dvc repro` (e.g. `-- --force distill`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect import Flow, flow

from tokenbridge import tracking
from tokenbridge.contracts import EvalMetrics
from tokenbridge.flows.common import check_before_work, children_die_with_this_process, one_prefect_api, run_stoppable
from tokenbridge.params import load_params
from tokenbridge.paths import EVAL_METRICS_DIR, EVAL_MODELS, REPORT_DIR
from tokenbridge.stopping import Stopped


@flow(name="tokenbridge-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", repro_args: list[str] | None = None) -> dict:
    params = load_params(Path(params_file))
    with tracking.pipeline_run(params.tracking.experiment, params.profile):
        command = ["dvc", "repro", *(repro_args or [])]
        print("running:", " ".join(command))
        _run_dvc(command)
        evaluated = EvalMetrics.read_all(EVAL_METRICS_DIR, list(EVAL_MODELS))
        models = {name: metrics.scores() for name, metrics in evaluated.items()}
        for name, scores in models.items():
            tracking.log_metrics({f"{name}.{key}": value for key, value in scores.items()})
        tracking.log_artifact(REPORT_DIR / "report.html")
        return models


def _run_dvc(command: list[str]) -> None:
    """Run dvc in its own process group: a stop of the pipeline (SIGTERM, SIGINT) is passed to dvc and the stage it
    runs, and the stage stops at its next safe point (`tokenbridge.stopping`) before the pipeline ends."""
    process = subprocess.Popen(command, start_new_session=True)
    try:
        code = process.wait()
    except Stopped:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="tokenbridge pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--serve", action="store_true", help="serve as a deployment instead of running once")
    parser.add_argument("--pool", help="register the deployment on this work pool (a worker runs it from this "
                                       "directory) instead of serving it")
    parser.add_argument("--cron", help='schedule for --serve or --pool, a cron expression such as "0 3 * * *"')
    parser.add_argument("--name", default="tokenbridge-scheduled", help="deployment name for --serve or --pool")
    args, repro_args = parser.parse_known_args(argv)
    repro_args = [a for a in repro_args if a != "--"]
    if args.cron and not (args.serve or args.pool):
        parser.error("--cron needs --serve or --pool")
    if args.serve and args.pool:
        parser.error("--serve runs the deployment in this process, --pool on a worker: choose one")
    check_before_work(args.params)
    children_die_with_this_process()
    parameters = {"params_file": args.params, "repro_args": repro_args}
    if args.serve:
        pipeline.serve(name=args.name, cron=args.cron, parameters=parameters)
    elif args.pool:
        # The worker runs the flow from this directory: it must see the project at the same path.
        source = pipeline.from_source(source=str(Path.cwd()), entrypoint="tokenbridge/flows/pipeline.py:pipeline")
        assert isinstance(source, Flow)  # from_source, called outside an event loop, returns the flow itself
        try:
            source.deploy(name=args.name, work_pool_name=args.pool, cron=args.cron, parameters=parameters)
        except ValueError as error:  # Prefect's "Could not find work pool ..."
            sys.exit(f"{error}\nCreate it with: prefect work-pool create {args.pool} --type process")
    else:
        with one_prefect_api():
            run_stoppable(lambda: pipeline(params_file=args.params, repro_args=repro_args))
