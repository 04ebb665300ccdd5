"""Stage `prepare`: GSM-style train/test data, chat-formatted and tokenized per model with byte spans.

Inputs: models/teacher, models/student; params `prepare.*` (reasoning-gym gsm_symbolic split by template,
or any GSM8K-format JSONL via `prepare.source: jsonl`).
Outputs: data/prepared/ (train.jsonl, test.jsonl, {train,test}.{teacher,student}.jsonl, manifest.json).
Run alone: tokenbridge prepare   (or: dvc repro prepare)
"""

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import MANIFEST, PreparedManifest
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.paths import PREPARED_DIR, STUDENT_DIR, TEACHER_DIR
from tokenbridge.stages.prepare import run_prepare


@flow(name="prepare", log_prints=True)
def prepare(params_file: str = "params.yaml") -> PreparedManifest:
    with tracked_stage("prepare", params_file, ("prepare",)) as params:
        manifest = run_prepare({"teacher": TEACHER_DIR, "student": STUDENT_DIR}, PREPARED_DIR, params.prepare)
        for split, info in (("train", manifest.splits.train), ("test", manifest.splits.test)):
            tracking.log_metrics({f"{split}_examples": info.examples, f"{split}_dropped": info.dropped_too_long,
                                  f"{split}_unalignable": info.dropped_unalignable,
                                  **{f"{split}_tokens_{role}": n for role, n in info.tokens.model_dump().items()}})
        tracking.log_artifact(PREPARED_DIR / MANIFEST)
        return manifest


def main(argv: list[str]) -> None:
    stage_cli(prepare, __doc__, argv)
