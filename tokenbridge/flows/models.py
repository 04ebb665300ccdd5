"""Stage `models`: materialise the teacher and the student as HF directories.

Inputs: params `models.teacher`, `models.student` (source gguf: a model shipped in a PyPI package, converted
once and cached in ~/.cache/tokenbridge or $TOKENBRIDGE_CACHE; hf: a local directory; tiny: built in seconds).
Outputs: models/teacher/, models/student/ (each with a tokenbridge.json model card).
Run alone: tokenbridge models   (or: dvc repro models)
"""

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import MODEL_CARD, ModelCard
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.models import materialize
from tokenbridge.models.gguf import default_cache_dir
from tokenbridge.paths import STUDENT_DIR, TEACHER_DIR


@flow(name="models", log_prints=True)
def models(params_file: str = "params.yaml") -> dict:
    with tracked_stage("models", params_file, ("models",)) as params:
        cards: dict[str, ModelCard] = {}
        for role, out_dir in (("teacher", TEACHER_DIR), ("student", STUDENT_DIR)):
            cards[role] = materialize(getattr(params.models, role), out_dir, default_cache_dir())
            tracking.log_artifact(out_dir / MODEL_CARD, role)
            tracking.log_metrics({f"{role}_parameters": cards[role].parameters,
                                  f"{role}_tokenizer_size": cards[role].tokenizer_size})
            print(f"{role}: {cards[role].name} -> {out_dir}")
        return {role: card.model_dump() for role, card in cards.items()}


def main(argv: list[str]) -> None:
    stage_cli(models, __doc__, argv)
