"""Stage `evaluate_transfer`: the transfer and ensemble models on the evaluate stage's terms (lm-eval GSM and
held-out bits-per-byte, `evaluate.*`): each source as it was (`<name>.original`), after FVT alone
(`<name>.fvt`) and after FVT then ALM (`<name>.transferred`), and the ensemble. Members that are the student
or the teacher take the evaluate stage's scores. The report stage puts them side by side.

Inputs: data/prepared, models/sources, models/transferred, models/ensemble, metrics/eval/<role>.json.
Outputs: metrics/eval/transfer.json (label -> scores), data/eval/transfer/<label>/.
Run alone: python -m flows.evaluate_transfer   (or: dvc repro evaluate_transfer)
"""

from prefect import flow

from components import tracking
from components.evaluate import collect_metrics, run_evaluate
from components.io import write_json
from components.models import model_card
from components.paths import (ENSEMBLE_DIR, EVAL_DIR, EVAL_METRICS_DIR, PREPARED_DIR, SOURCES_DIR, TRANSFER_EVAL_METRICS,
                              TRANSFERRED_DIR)
from components.transfer import fvt_path
from flows.common import stage_cli, tracked_stage

EVALUATED_ROLES = {"student": "student_before", "teacher": "teacher"}  # members the evaluate stage scored


@flow(name="evaluate_transfer", log_prints=True)
def evaluate_transfer(params_file: str = "params.yaml") -> dict:
    with tracked_stage("evaluate_transfer", params_file, ("evaluate", "ensemble")) as params:
        models = {}
        for name in params.transfer.sources:
            for variant, directory in (("original", SOURCES_DIR / name), ("fvt", fvt_path(TRANSFERRED_DIR / name)),
                                       ("transferred", TRANSFERRED_DIR / name)):
                models[f"{name}.{variant}"] = directory
        models["ensemble"] = ENSEMBLE_DIR
        scores = {}
        for label, directory in models.items():
            print(f"evaluate_transfer: {label} ({model_card(directory)['name']})")
            scores[label] = run_evaluate(PREPARED_DIR, directory, EVAL_DIR / "transfer" / label,
                                         EVAL_DIR / "transfer" / label / "metrics.json", params.evaluate)
            tracking.log_metrics({f"{label}.{key}": value for key, value in scores[label].items()})
        roles = [member for member in params.ensemble.members if member in EVALUATED_ROLES]
        evaluated = collect_metrics(EVAL_METRICS_DIR, [EVALUATED_ROLES[role] for role in roles])
        scores.update({role: evaluated[EVALUATED_ROLES[role]] for role in roles})
        write_json(TRANSFER_EVAL_METRICS, scores)
        return scores


if __name__ == "__main__":
    stage_cli(evaluate_transfer, __doc__)
