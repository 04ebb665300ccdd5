"""Stage `transfer`: move each `transfer.sources` model onto `transfer.tokenizer` (a role's tokenizer, a
local one, or bytes): FVT initialisation, then self-distillation with `transfer.loss` (ALM by default; any
registered cross-tokenizer loss, or `sft`, next-token training alone) and the original model as the frozen
teacher (an embeddings-only phase, then LoRA or every parameter). Byte-level targets add the hidden-state
loss. docs/transfer.md.

Inputs: data/prepared (the training texts; the test questions and answers of the held-out learning curve),
models/student and models/teacher (when the target names a role); params `transfer.*`, `evaluate.bpb_examples`
(the curve's reference answers), `evaluate.teacher_answers`, `evaluate.max_gen_toks`, `evaluate.batch_size` (the
original's greedy answers), `runtime.*`.
Outputs: models/sources/<name>/ (each source as materialised), models/transferred/<name>/ (FVT then
self-distillation) and models/transferred/<name>-fvt/ (FVT alone), data/original_answers/<name>/ (the original's
greedy answers to the first `evaluate.teacher_answers` test questions, which evaluate_transfer scores every model of
that source on), metrics/transfer/<name>.csv (per-step history, with the held-out curve every
`transfer.heldout_every` steps), metrics/transfer.json.
Run alone: tokenbridge transfer   (or: dvc repro transfer)
"""

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import TransferMetrics
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.models import materialize
from tokenbridge.models.gguf import default_cache_dir
from tokenbridge.paths import (
    HYPERNET_DIR,
    ORIGINAL_ANSWERS_DIR,
    PREPARED_DIR,
    ROLE_DIRS,
    SOURCES_DIR,
    TRANSFER_CHECKPOINT_DIR,
    TRANSFER_HISTORY_DIR,
    TRANSFER_METRICS,
    TRANSFERRED_DIR,
)
from tokenbridge.runtime import Runtime
from tokenbridge.stages.transfer import run_transfer, target_directory


@flow(name="transfer", log_prints=True)
def transfer(params_file: str = "params.yaml") -> TransferMetrics:
    with tracked_stage("transfer", params_file, ("transfer", "runtime")) as params:
        target = target_directory(params.transfer.tokenizer, ROLE_DIRS)
        summaries = {}
        for name, spec in params.transfer.sources.items():
            source_dir = SOURCES_DIR / name
            card = materialize(spec, source_dir, default_cache_dir())
            print(f"transfer: {card.name} -> {params.transfer.tokenizer} tokenizer")
            history = TRANSFER_HISTORY_DIR / f"{name}.csv"
            summaries[name] = run_transfer(PREPARED_DIR, source_dir, target, TRANSFERRED_DIR / name, history,
                                           params.transfer, Runtime.resolve(params.runtime),
                                           TRANSFER_CHECKPOINT_DIR / name, HYPERNET_DIR, params.evaluate,
                                           ORIGINAL_ANSWERS_DIR / name)
            tracking.log_metrics({f"{name}.{key}": value for key, value in summaries[name].model_dump().items()
                                  if isinstance(value, (int, float))})
            tracking.log_artifact(history, "transfer")
        metrics = TransferMetrics(summaries)
        metrics.write(TRANSFER_METRICS)
        return metrics


def main(argv: list[str]) -> None:
    stage_cli(transfer, __doc__, argv)
