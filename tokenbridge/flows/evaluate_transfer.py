"""Stage `evaluate_transfer`: the transfer and ensemble models on the evaluate stage's terms (`evaluate.*`,
`runtime.*`): each source as it was (`<name>.original`), after its initialisation alone (`<name>.fvt` or
`<name>.hypernet`: `transfer.init`) and after that then self-distillation (`<name>.transferred`), and the
ensemble. Members that are the student or the teacher take the evaluate stage's scores. The report stage puts
them side by side.

Evaluation plan (docs/evaluation.md): every model here gets held-out bits-per-byte, which is cheap (one
forward pass over the answers) and tells the variants apart, on the reference answers and (each source's three
variants) on that source's own greedy answers (`original_answers_bits_per_byte`: how close a moved model stays to
what its original says); GSM generation, the pipeline's dominant cost,
runs on `evaluate.transfer_limit` questions per model, 0 by default: after the default transfer budget (a
dozen steps) every model here scored 0 of 3 GSM questions when it was measured, while generating 10 answers
for each of seven models (the ensemble runs three models a token) is, from issue 14's per-question times, about
half an hour of the hour `make run` took on a 2-core AMD EPYC in fp32. Set `evaluate.transfer_limit` > 0 for a
transfer trained long enough to answer.

Inputs: data/prepared, models/sources, models/transferred, data/original_answers, models/ensemble,
metrics/eval/<role>.json.
Outputs: metrics/eval/transfer.json (label -> scores), data/eval/transfer/<label>/.
Run alone: tokenbridge evaluate_transfer   (or: dvc repro evaluate_transfer)
"""

from pathlib import Path

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import ANSWERS, EvalMetrics, ModelCard, TransferScores
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.paths import (
    ENSEMBLE_DIR,
    EVAL_METRICS_DIR,
    EVALUATED_ROLES,
    ORIGINAL_ANSWERS_DIR,
    PREPARED_DIR,
    SOURCES_DIR,
    TRANSFER_EVAL_DIR,
    TRANSFER_EVAL_METRICS,
    TRANSFERRED_DIR,
)
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import run_evaluate
from tokenbridge.stages.transfer import init_path


@flow(name="evaluate_transfer", log_prints=True)
def evaluate_transfer(params_file: str = "params.yaml") -> TransferScores:
    with tracked_stage("evaluate_transfer", params_file, ("evaluate", "ensemble", "runtime")) as params:
        runtime = Runtime.resolve(params.runtime)
        models: dict[str, tuple[Path, Path | None]] = {}  # label -> model, its source's own answers
        for name in params.transfer.sources:
            init = params.transfer.init
            start = init_path(TRANSFERRED_DIR / name, init)
            answers = ORIGINAL_ANSWERS_DIR / name / ANSWERS if params.evaluate.teacher_answers else None
            for variant, directory in (("original", SOURCES_DIR / name), (init, start),
                                       ("transferred", TRANSFERRED_DIR / name)):
                models[f"{name}.{variant}"] = directory, answers
        models["ensemble"] = ENSEMBLE_DIR, None
        scores = {}
        for label, (directory, answers) in models.items():
            print(f"evaluate_transfer: {label} ({ModelCard.of(directory).name}) on {runtime.device}")
            scores[label] = run_evaluate(PREPARED_DIR, directory, TRANSFER_EVAL_DIR / label,
                                         TRANSFER_EVAL_DIR / label / "metrics.json", params.evaluate, runtime,
                                         limit=params.evaluate.transfer_limit, original_answers=answers)
            tracking.log_metrics({f"{label}.{key}": value for key, value in scores[label].numbers().items()})
        roles = [member for member in params.ensemble.members if member in EVALUATED_ROLES]
        evaluated = EvalMetrics.read_all(EVAL_METRICS_DIR, [EVALUATED_ROLES[role] for role in roles])
        scores.update({role: evaluated[EVALUATED_ROLES[role]] for role in roles})
        transfer_scores = TransferScores(scores)
        transfer_scores.write(TRANSFER_EVAL_METRICS)
        return transfer_scores


def main(argv: list[str]) -> None:
    stage_cli(evaluate_transfer, __doc__, argv)
