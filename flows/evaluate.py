"""Stage `evaluate`: lm-eval (real harness, local GSM-style test set, `evaluate.limit` questions) and
held-out bits-per-byte for the teacher, the student before and the student after distillation.

Inputs: data/prepared, models/teacher, models/student, models/distilled; params `evaluate.*`.
Outputs: metrics/eval.json (DVC metrics), data/eval/ (generated lm-eval task, per-question samples).
Run alone: python -m flows.evaluate   (or: dvc repro evaluate)
"""

from prefect import flow

from components import tracking
from components.evaluate import run_evaluate
from components.paths import DISTILLED_DIR, EVAL_DIR, EVAL_METRICS, PREPARED_DIR, STUDENT_DIR, TEACHER_DIR
from flows.common import stage_cli, tracked_stage


@flow(name="evaluate", log_prints=True)
def evaluate(params_file: str = "params.yaml") -> dict:
    with tracked_stage("evaluate", params_file, ("evaluate",)) as params:
        models = {"teacher": TEACHER_DIR, "student_before": STUDENT_DIR, "student_after": DISTILLED_DIR}
        metrics = run_evaluate(PREPARED_DIR, models, EVAL_DIR, EVAL_METRICS, params.evaluate)
        for name, scores in metrics["models"].items():
            tracking.log_metrics({f"{name}.{key}": value for key, value in scores.items()})
        tracking.log_artifact(EVAL_METRICS)
        tracking.log_artifact(EVAL_DIR, "eval")
        return metrics


if __name__ == "__main__":
    stage_cli(evaluate, __doc__)
