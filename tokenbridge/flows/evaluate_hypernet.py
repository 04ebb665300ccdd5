"""Stage `evaluate_hypernet`: the hypernetwork against FVT on tokenizers it never trained on
(`evaluate_hypernet.tokenizers`: the teacher's, the held-out trained one, any local HF tokenizer). The base model
is moved onto each by FVT and by the hypernetwork (zero-shot), and, with `evaluate_hypernet.alm`, each is
followed by the transfer stage's ALM self-distillation (`transfer.*` steps); every model gets held-out
bits-per-byte on the evaluate stage's terms, beside the base model on its own tokenizer. The report puts them in
the transfer report. docs/hypernet.md.

Inputs: data/prepared, models/<hypernet.base>, models/hypernet, the compared tokenizers. Outputs:
models/hypernet_eval/<name>-<init>[-alm]/ (HF directories), metrics/eval/hypernet.json, data/eval/hypernet/.
Run alone: tokenbridge evaluate_hypernet   (or: dvc repro evaluate_hypernet)
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import EvalMetrics, HypernetScores
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.io import read_jsonl
from tokenbridge.models.retokenize import Init, retokenized_model
from tokenbridge.paths import (
    EVAL_DIR,
    HYPERNET_DIR,
    HYPERNET_EVAL_CHECKPOINT_DIR,
    HYPERNET_EVAL_DIR,
    HYPERNET_EVAL_METRICS,
    HYPERNET_HELDOUT,
    PREPARED_DIR,
    ROLE_DIRS,
)
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import run_evaluate
from tokenbridge.stages.transfer import train_transfer

INITS: tuple[Init, ...] = ("fvt", "hypernet")


def compared_tokenizer(spec: str) -> Path:
    """The directory an `evaluate_hypernet.tokenizers` entry names: a role's model, the held-out tokenizer, or a
    local directory."""
    directory = ROLE_DIRS.get(spec) or (HYPERNET_HELDOUT if spec == "heldout" else Path(spec).expanduser())
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"evaluate_hypernet.tokenizers: {directory} holds no tokenizer.json; give 'teacher', "
                                "'student', 'heldout' or a local HF tokenizer directory")
    return directory


@flow(name="evaluate_hypernet", log_prints=True)
def evaluate_hypernet(params_file: str = "params.yaml") -> HypernetScores:
    sections = ("evaluate_hypernet", "evaluate", "transfer", "runtime")
    with tracked_stage("evaluate_hypernet", params_file, sections) as params:
        runtime = Runtime.resolve(params.runtime)
        base_dir = ROLE_DIRS[params.hypernet.base]
        records = read_jsonl(PREPARED_DIR / "train.jsonl")

        def score(label: str, model_dir: Path) -> EvalMetrics:
            print(f"evaluate_hypernet: {label} on {runtime.device}")
            out = EVAL_DIR / "hypernet" / label
            metrics = run_evaluate(PREPARED_DIR, model_dir, out, out / "metrics.json", params.evaluate, runtime,
                                   limit=0)
            tracking.log_metrics({f"{label}.{key}": value for key, value in metrics.scores().items()})
            return metrics

        scores = {"base": score("base", base_dir)}
        for name, spec in params.evaluate_hypernet.tokenizers.items():
            tokenizer_dir = compared_tokenizer(spec)
            for init in INITS:
                start = HYPERNET_EVAL_DIR / f"{name}-{init}"
                started = time.perf_counter()
                retokenized_model(base_dir, tokenizer_dir, start, init, params.transfer.seed, HYPERNET_DIR)
                seconds = time.perf_counter() - started
                print(f"evaluate_hypernet: {name}.{init} written in {seconds:.1f} s")
                tracking.log_metrics({f"{name}.{init}.seconds": seconds})
                scores[f"{name}.{init}"] = score(f"{name}.{init}", start)
                if params.evaluate_hypernet.alm:
                    trained = HYPERNET_EVAL_DIR / f"{name}-{init}-alm"
                    train_transfer(records, base_dir, start, trained, HYPERNET_EVAL_DIR / f"{name}-{init}-alm.csv",
                                   params.transfer.model_copy(update={"loss": "alm"}), runtime,
                                   HYPERNET_EVAL_CHECKPOINT_DIR / f"{name}-{init}")
                    scores[f"{name}.{init}_alm"] = score(f"{name}.{init}_alm", trained)
        result = HypernetScores(scores)
        result.write(HYPERNET_EVAL_METRICS)
        return result


def main(argv: list[str]) -> None:
    stage_cli(evaluate_hypernet, __doc__, argv)
