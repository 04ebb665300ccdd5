"""Stage `evaluate@<model>` for model in teacher, student_before, student_after: lm-eval's real harness
on the local GSM-style test set (`evaluate.limit` questions) and held-out bits-per-byte.

Inputs: data/prepared and the model's directory (models/teacher, models/student or models/distilled);
params `evaluate.*`. Outputs: metrics/eval/<model>.json (DVC metrics), data/eval/<model>/ (generated
lm-eval task, per-question samples).
Run alone: python -m flows.evaluate --model student_after   (or: dvc repro evaluate@student_after)
"""

from prefect import flow

from components import tracking
from components.evaluate import run_evaluate
from components.paths import EVAL_DIR, EVAL_METRICS_DIR, EVAL_MODELS, PREPARED_DIR
from flows.common import stage_cli, tracked_stage


@flow(name="evaluate", log_prints=True)
def evaluate(params_file: str = "params.yaml", model: str = "student_after") -> dict:
    with tracked_stage(f"evaluate@{model}", params_file, ("evaluate",)) as params:
        metrics_path = EVAL_METRICS_DIR / f"{model}.json"
        scores = run_evaluate(PREPARED_DIR, EVAL_MODELS[model], EVAL_DIR / model, metrics_path, params.evaluate)
        tracking.log_metrics({f"{model}.{key}": value for key, value in scores.items()})
        tracking.log_artifact(metrics_path)
        tracking.log_artifact(EVAL_DIR / model, "eval")
        return scores


if __name__ == "__main__":
    stage_cli(evaluate, __doc__, model={"choices": list(EVAL_MODELS), "default": "student_after",
                                        "help": "which model to evaluate (default: student_after)"})
