"""Stage `teacher_answers`: the teacher's greedy answers to the first `evaluate.teacher_answers` test questions,
generated once (DVC caches them), for the evaluate stages' bits-per-byte on the teacher's own answers.

Inputs: data/prepared/test.jsonl, models/teacher, models/student (its tokenizer must spell each answer);
params `evaluate.teacher_answers`, `evaluate.max_gen_toks` (answer length cap), `evaluate.batch_size`,
`runtime.*`. Outputs: data/teacher_answers/answers.jsonl (question, answer, ended) and manifest.json.
Run alone: tokenbridge teacher_answers   (or: dvc repro teacher_answers)
"""

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import TeacherAnswersManifest
from tokenbridge.evaluation.answers import write_greedy_answers
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.paths import PREPARED_DIR, STUDENT_DIR, TEACHER_ANSWERS_DIR, TEACHER_DIR
from tokenbridge.runtime import Runtime


@flow(name="teacher_answers", log_prints=True)
def teacher_answers(params_file: str = "params.yaml") -> TeacherAnswersManifest:
    with tracked_stage("teacher_answers", params_file, ("evaluate", "runtime")) as params:
        runtime = Runtime.resolve(params.runtime)
        print(f"teacher_answers: {runtime.describe()}")
        manifest = write_greedy_answers(PREPARED_DIR / "test.jsonl", TEACHER_DIR, STUDENT_DIR, TEACHER_ANSWERS_DIR,
                                        params.evaluate.teacher_answers, params.evaluate.max_gen_toks,
                                        params.evaluate.batch_size, runtime)
        print(f"teacher_answers: {manifest.examples} answers ({manifest.ended} ended, {manifest.unreadable} left out)")
        tracking.log_metrics({"answers": manifest.examples, "ended": manifest.ended, "unreadable": manifest.unreadable})
        tracking.log_artifact(TEACHER_ANSWERS_DIR, "teacher_answers")
        return manifest


def main(argv: list[str]) -> None:
    stage_cli(teacher_answers, __doc__, argv)
