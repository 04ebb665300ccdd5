"""Stage `teacher_logits`: run the teacher once over the training data; store top-k, observed-token and
boundary log-probs with the teacher's byte spans, in shards with a manifest. Resumes after interruption.

Inputs: models/teacher, data/prepared; params `teacher_logits.*`. With `distill.teacher_mode: online`
nothing is extracted (the teacher runs inside distill) and the manifest says so.
Outputs: data/teacher_logits/ (shard-*.safetensors, progress.json, manifest.json).
Run alone: python -m flows.teacher_logits   (or: dvc repro teacher_logits)
"""

from prefect import flow

from components import tracking
from components.io import write_json
from components.paths import PREPARED_DIR, TEACHER_DIR, TEACHER_LOGITS_DIR
from components.teacher_logits import run_teacher_logits
from flows.common import stage_cli, tracked_stage


@flow(name="teacher_logits", log_prints=True)
def teacher_logits(params_file: str = "params.yaml") -> dict:
    with tracked_stage("teacher_logits", params_file, ("teacher_logits",)) as params:
        if params.distill.teacher_mode == "online":
            manifest = {"skipped": "distill.teacher_mode is online: the teacher runs at every distill step"}
            write_json(TEACHER_LOGITS_DIR / "manifest.json", manifest)
            return manifest
        manifest = run_teacher_logits(PREPARED_DIR, TEACHER_DIR, TEACHER_LOGITS_DIR, params.teacher_logits)
        tracking.log_metrics({"examples": manifest["n_examples"], "tokens": manifest["n_tokens"],
                              "shards": len(manifest["shards"])})
        tracking.log_artifact(TEACHER_LOGITS_DIR / "manifest.json")
        return manifest


if __name__ == "__main__":
    stage_cli(teacher_logits, __doc__)
