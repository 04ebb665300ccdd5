"""Stage `evaluate@<model>` for model in teacher, student_before, student_after: held-out bits-per-byte (fp32) on the
reference answers and on the teacher's own greedy answers (stage teacher_answers); for the two students their
chunk gap to the teacher on the reference answers and on their own greedy answers (docs/evaluation.md); and
lm-eval's real harness on the `evaluate.tasks` suite (GSM on `evaluate.limit` questions with batched greedy
generation, the arithmetic choices on `evaluate.choice_limit`; docs/evaluation.md#benchmark-suite). These three
models are the distillation comparison the report is about, so they always run the suite; the transfer stage's
models get bits-per-byte alone by default (docs/evaluation.md).
Device and generation dtype: params `runtime.*` (docs/runtime.md).

Inputs: data/prepared, the model's directory (models/teacher, models/student or models/distilled), models/teacher,
data/teacher_answers;
params `evaluate.*`, `runtime.*`. Outputs: metrics/eval/<model>.json (DVC metrics), data/eval/<model>/
(generated lm-eval tasks, per-document samples, a student's own answers, lm-eval's record of each task's run,
per_example.json: each bits-per-byte score's [bits, bytes] per answer, run.json: runtime and seconds).
Run alone: tokenbridge evaluate --model student_after   (or: dvc repro evaluate@student_after)
"""

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import ANSWERS, EvalMetrics
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.paths import EVAL_DIR, EVAL_METRICS_DIR, EVAL_MODELS, PREPARED_DIR, TEACHER_ANSWERS_DIR, TEACHER_DIR
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import run_evaluate


@flow(name="evaluate", log_prints=True)
def evaluate(params_file: str = "params.yaml", model: str = "student_after") -> EvalMetrics:
    with tracked_stage(f"evaluate@{model}", params_file, ("evaluate", "runtime")) as params:
        metrics_path = EVAL_METRICS_DIR / f"{model}.json"
        runtime = Runtime.resolve(params.runtime)
        print(f"evaluate@{model}: {runtime.describe()}")
        answers = TEACHER_ANSWERS_DIR / ANSWERS if params.evaluate.teacher_answers else None
        scores = run_evaluate(PREPARED_DIR, EVAL_MODELS[model], EVAL_DIR / model, metrics_path, params.evaluate,
                              runtime, teacher_dir=None if model == "teacher" else TEACHER_DIR, teacher_answers=answers)
        tracking.log_metrics({f"{model}.{key}": value for key, value in scores.numbers().items()})
        tracking.log_artifact(metrics_path)
        tracking.log_artifact(EVAL_DIR / model, "eval")
        return scores


def main(argv: list[str]) -> None:
    stage_cli(evaluate, __doc__, argv, model={"choices": list(EVAL_MODELS), "default": "student_after",
                                        "help": "which model to evaluate (default: student_after)"})
