"""`tokenbridge <flow> [options]`: run one stage's Prefect flow, the whole pipeline, the loss comparison or a claim.

`tokenbridge --help` lists the flows; `tokenbridge <flow> --help` gives each one's inputs, outputs and options.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from pathlib import Path

FLOWS_DIR = Path(__file__).parent / "flows"
# Every flow, in pipeline order: the module name under tokenbridge/flows/.
FLOWS = ("models", "prepare", "teacher_logits", "distill", "teacher_answers", "evaluate", "hypernet",
         "evaluate_hypernet", "transfer", "ensemble", "evaluate_transfer", "report", "pipeline", "compare", "claim")

# Offline, project-local defaults every flow process needs. Prefect, MLflow and Hugging Face read them when
# imported, so they are set before any flow module is.
ENVIRONMENT_DEFAULTS = {
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),  # the project folder dvc runs each stage in
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's own loggers say only what went wrong; a run's loggers say everything at INFO, since that is where a
    # flow's prints go (log_prints): the stages' messages (a checkpoint resumed, a registry decision, what ran on
    # which device), on the terminal with a timestamp and in the Prefect server's log of the run.
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # A tracking server that stops answering mid-run fails the call in about a minute, not after MLflow's default
    # seven retries of two minutes each (servers down at the start are caught in seconds: flows/common.py).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def summary(flow: str) -> str:
    """The first line of a flow module's docstring, read without importing it (importing loads torch and Prefect)."""
    docstring = ast.get_docstring(ast.parse((FLOWS_DIR / f"{flow}.py").read_text())) or ""
    return docstring.splitlines()[0] if docstring else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tokenbridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="flows:\n" + "\n".join(f"  {name:<18} {summary(name)}" for name in FLOWS))
    parser.add_argument("flow", choices=FLOWS, metavar="FLOW", help="which flow to run (listed below)")
    parser.add_argument("options", nargs="*", help="the flow's own options (tokenbridge FLOW --help)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in FLOWS:
        parser.parse_args(argv)  # prints the help, or says what is wrong, and exits
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    importlib.import_module(f"tokenbridge.flows.{argv[0]}").main(argv[1:])
