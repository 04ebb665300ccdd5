"""Stage `ensemble`: combine `ensemble.members` (models sharing one tokenizer) by averaging their next-token
probabilities with `ensemble.weights`, into a directory that loads like any causal LM (lm-eval scores it
by log-likelihood and by generation). Members with different tokenizers are refused. docs/transfer.md#ensembles.

Inputs: models/student, models/teacher, models/transferred/<name> (whichever the members name);
params `ensemble.*`. Outputs: models/ensemble/ (members hard-linked under members/<name>), logged to MLflow.
No `runtime` params: the stage writes files only; evaluate_transfer loads the ensemble on runtime.device.
Run alone: tokenbridge ensemble   (or: dvc repro ensemble)
"""

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import ModelCard
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.paths import ENSEMBLE_DIR, STUDENT_DIR, TEACHER_DIR, TRANSFERRED_DIR
from tokenbridge.stages.ensemble import build_ensemble


def member_directory(name: str):
    return {"student": STUDENT_DIR, "teacher": TEACHER_DIR}.get(name, TRANSFERRED_DIR / name)


@flow(name="ensemble", log_prints=True)
def ensemble(params_file: str = "params.yaml") -> ModelCard:
    with tracked_stage("ensemble", params_file, ("ensemble",)) as params:
        members = {name: member_directory(name) for name in params.ensemble.members}
        card = build_ensemble(members, params.ensemble.weights, ENSEMBLE_DIR)
        print(f"ensemble: {card.name} -> {ENSEMBLE_DIR}")
        tracking.log_metrics({"members": len(members), "parameters": card.parameters})
        tracking.log_artifact(ENSEMBLE_DIR, "ensemble")
        return card


def main(argv: list[str]) -> None:
    stage_cli(ensemble, __doc__, argv)
