"""The whole chain as one Prefect flow: `dvc repro` inside an MLflow parent run, so DVC decides what is
stale and every stage run it starts is grouped under this pipeline execution.

  python -m flows.pipeline                         run once (what `make run` does)
  python -m flows.pipeline --serve --cron "0 3 * * *"
                                                   serve as a scheduled deployment; needs a real Prefect
                                                   server (see README "Schedules")
Extra arguments after `--` go to `dvc repro` (e.g. `-- --force distill`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from prefect import flow

from components import tracking
from components.config import ParamsError, load_params
from components.evaluate import collect_metrics
from components.paths import EVAL_METRICS_DIR, EVAL_MODELS, REPORT_DIR


@flow(name="tokenbridge-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", repro_args: list[str] | None = None) -> dict:
    params = load_params(Path(params_file))
    with tracking.pipeline_run(params.tracking.experiment, params.profile):
        command = ["dvc", "repro", *(repro_args or [])]
        print("running:", " ".join(command))
        subprocess.run(command, check=True)
        models = collect_metrics(EVAL_METRICS_DIR, list(EVAL_MODELS))
        for name, scores in models.items():
            tracking.log_metrics({f"{name}.{key}": value for key, value in scores.items()})
        tracking.log_artifact(REPORT_DIR / "report.html")
        return models


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--serve", action="store_true", help="serve as a deployment instead of running once")
    parser.add_argument("--cron", help='schedule for --serve, a cron expression such as "0 3 * * *"')
    parser.add_argument("--name", default="tokenbridge-scheduled", help="deployment name for --serve")
    args, repro_args = parser.parse_known_args()
    repro_args = [a for a in repro_args if a != "--"]
    if args.cron and not args.serve:
        parser.error("--cron needs --serve")
    try:
        load_params(Path(args.params))
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    if args.serve:
        pipeline.serve(name=args.name, cron=args.cron, parameters={"params_file": args.params, "repro_args": repro_args})
    else:
        pipeline(params_file=args.params, repro_args=repro_args)


if __name__ == "__main__":
    main()
