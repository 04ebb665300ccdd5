"""What every stage flow shares: a `--help`-able command line and a tracked stage context."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from components import tracking
from components.config import ParamsError, PipelineParams, load_params


@contextlib.contextmanager
def tracked_stage(name: str, params_file: str, sections: tuple[str, ...]) -> Iterator[PipelineParams]:
    """Load params and open the stage's MLflow run, logging the params sections the stage reads."""
    params = load_params(Path(params_file))
    logged = {section: getattr(params, section).model_dump() for section in sections}
    with tracking.stage_run(name, params.tracking.experiment, params.profile, logged):
        yield params


def stage_cli(flow: Callable[..., object], doc: str | None, **options: dict) -> None:
    """`python -m flows.<stage> [--params FILE] [--OPTION ...]`: validate params before any work, then run the flow.

    Each keyword names an extra flow argument and gives its `argparse.add_argument` settings.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {flow.__module__}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    for name, settings in options.items():
        parser.add_argument(f"--{name}", **settings)
    args = parser.parse_args()
    try:
        load_params(Path(args.params))
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    flow(params_file=args.params, **{name: getattr(args, name) for name in options})
