"""Stage `report`: a Markdown and an HTML report (metrics table, loss curves, metrics by model), the
tokenizer-transfer and ensemble report, and the Model Registry: the distilled student is registered with
alias `candidate`; alias `champion` moves to it only when it beats the current champion on
`tracking.primary_metric`.

Inputs: metrics/eval/*.json (hypernet.json among them), metrics/distill_history.csv, models/distilled,
metrics/transfer.json, metrics/hypernet.json, models/ensemble/tokenbridge.json; params `tracking.*`. Outputs:
reports/ (report.md, report.html, transfer.md, transfer.html, plots/, registry.json); MLflow artifacts and a
model version.
Run alone: tokenbridge report   (or: dvc repro report)
"""

import sys

import torch
from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import (
    EvalMetrics,
    HypernetMetrics,
    HypernetScores,
    ModelCard,
    TransferMetrics,
    TransferScores,
)
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.io import write_json
from tokenbridge.paths import (
    DISTILL_HISTORY,
    DISTILLED_DIR,
    ENSEMBLE_DIR,
    EVAL_METRICS_DIR,
    EVAL_MODELS,
    HYPERNET_EVAL_METRICS,
    HYPERNET_METRICS,
    REPORT_DIR,
    TEACHER_DIR,
    TRANSFER_EVAL_METRICS,
    TRANSFER_METRICS,
)
from tokenbridge.runtime import machine
from tokenbridge.stages.report import render_report, render_transfer


@flow(name="report", log_prints=True)
def report(params_file: str = "params.yaml") -> dict:
    with tracked_stage("report", params_file, ("tracking",)) as params:
        evaluated = EvalMetrics.read_all(EVAL_METRICS_DIR, list(EVAL_MODELS))
        models = {name: scores.scores() for name, scores in evaluated.items()}
        primary = params.tracking.primary_metric
        value = models["student_after"][primary]
        registry = tracking.register_candidate(DISTILLED_DIR, params.tracking.registered_model, primary, value,
                                               params.tracking.higher_is_better)
        print(f"registry: version {registry['version']} is '{tracking.CANDIDATE}'; {registry['reason']}",
              file=sys.stderr)  # stderr: shown under dvc, where Prefect logs warnings only
        write_json(REPORT_DIR / "registry.json", registry)
        context = {
            "teacher": ModelCard.of(TEACHER_DIR).name, "student": ModelCard.of(DISTILLED_DIR).name,
            "profile": params.profile, **tracking.revision_tags(),
            "machine": machine(torch.device("cpu")),  # where the report ran (it reads no runtime params)
            "teacher_mode": params.distill.teacher_mode, "steps": params.distill.steps, "registry": registry,
            "params": {"distill": params.distill.model_dump(), "evaluate": params.evaluate.model_dump()},
        }
        tasks = {name: {task: score.model_dump() for task, score in (scores.tasks or {}).items()}
                 for name, scores in evaluated.items()}
        files = render_report({"primary_metric": primary, "models": models, "tasks": tasks}, DISTILL_HISTORY, context,
                              REPORT_DIR)
        transfer_scores = TransferScores.read(TRANSFER_EVAL_METRICS).root
        transfer = render_transfer({label: scores.scores() for label, scores in transfer_scores.items()},
                                   TransferMetrics.read(TRANSFER_METRICS).model_dump(),
                                   list(params.transfer.sources), params.ensemble.members,
                                   ModelCard.of(ENSEMBLE_DIR).model_dump(exclude_none=True), REPORT_DIR,
                                   {label: scores.scores() for label, scores in
                                    HypernetScores.read(HYPERNET_EVAL_METRICS).root.items()},
                                   HypernetMetrics.read(HYPERNET_METRICS).model_dump(exclude_none=True))
        tracking.log_artifact(REPORT_DIR, "report")
        tracking.log_metrics({f"student_after.{primary}": value})
        files |= {f"transfer_{name}": path for name, path in transfer.items()}
        return {name: str(path) for name, path in files.items()}


def main(argv: list[str]) -> None:
    stage_cli(report, __doc__, argv)
