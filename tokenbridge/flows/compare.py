"""Compare distillation losses on equal terms: one DVC experiment per method, same data, steps and seed.

  tokenbridge compare                              every cross-tokenizer loss, then sft (next-token only)
  tokenbridge compare --losses alm sft             a subset
  tokenbridge compare --overrides distill.steps=80 extra `dvc exp run -S` overrides for every method
  tokenbridge compare --seeds 1 2 3                each method once per distill.seed: mean, spread, t-interval

First `dvc repro` brings the baseline up to date; then each method (and seed) runs as
`dvc exp run -n cmp-<loss>-s<seed>-<time> -S distill.loss=<loss> -S distill.seed=<seed>` in the
workspace, so the stages upstream of `distill` (models, prepare, teacher_logits, evaluate@teacher,
evaluate@student_before) are shared and not rerun. DSKD needs the live teacher and runs with
`distill.teacher_mode=online`, so it goes last. Each experiment stays in `dvc exp show`; params.yaml is
restored afterwards (`dvc exp apply <name>` brings back any method's outputs). Writes
docs/results/loss-comparison-<profile>.{md,html,json} and docs/results/plots/loss-comparison-<profile>.png
(`--out` for another folder), and logs them to MLflow. With several seeds, a method's row is the mean over its
seeds with their standard deviation and the 95 % t-interval of the mean; the JSON keeps each seed's run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import MANIFEST, EvalMetrics, ModelCard, PreparedManifest
from tokenbridge.experiments import params_restored, run, run_arms
from tokenbridge.flows.common import stage_cli
from tokenbridge.io import write_json
from tokenbridge.losses.registry import LOSSES, cross_tokenizer_losses
from tokenbridge.params import load_params
from tokenbridge.paths import EVAL_METRICS_DIR, PREPARED_DIR, STUDENT_DIR, TEACHER_DIR
from tokenbridge.reporting.comparison import render_comparison
from tokenbridge.runtime import machine, resolve_device

DEFAULT_LOSSES = [*cross_tokenizer_losses(), "sft"]


@flow(name="compare-losses", log_prints=True)
def compare(params_file: str = "params.yaml", losses: list[str] | None = None, overrides: list[str] | None = None,
            out: str = "docs/results", seeds: list[int] | None = None) -> dict:
    params_path = Path(params_file)
    params = load_params(params_path)
    losses = sorted(losses or DEFAULT_LOSSES, key=lambda name: LOSSES[name].needs_online_teacher)  # online runs last
    arms = {loss: [f"distill.loss={loss}", *(overrides or []),
                   *(["distill.teacher_mode=online"] if LOSSES[loss].needs_online_teacher else [])]
            for loss in losses}
    with params_restored(params_path):
        run(["dvc", "repro"])
        references = {name: scores.numbers() for name, scores in
                      EvalMetrics.read_all(EVAL_METRICS_DIR, ["teacher", "student_before"]).items()}
        results = run_arms(arms, seeds or [params.distill.seed], "cmp")
    context = {
        "teacher": ModelCard.of(TEACHER_DIR).name, "student": ModelCard.of(STUDENT_DIR).name,
        "profile": params.profile, **tracking.revision_tags(),
        "machine": machine(resolve_device(params.runtime.device)),
        "train examples": PreparedManifest.read(PREPARED_DIR / MANIFEST).splits.train.examples,
        "steps": params.distill.steps, "batch_size": params.distill.batch_size,
        "learning_rate": params.distill.learning_rate, "alpha": params.distill.alpha,
        "seeds": seeds or [params.distill.seed],
        "teacher_logits.top_k": params.teacher_logits.top_k, "evaluate.limit": params.evaluate.limit,
        "overrides": overrides or [],
        "minutes per method (each seed)": {loss: round(result["experiment_seconds"] / 60, 1)
                                           for loss, result in results.items()},
    }
    stem = f"loss-comparison-{params.profile}"
    write_json(Path(out) / f"{stem}.json", {"references": references, "methods": results, "context": context})
    files = render_comparison(results, references, context, Path(out), stem)
    with tracking.stage_run("compare", params.tracking.experiment, params.profile, {"losses": losses}):
        for loss, result in results.items():
            tracking.log_metrics({f"{loss}.{key}": value for key, value in result.items()
                                  if isinstance(value, int | float) and not isinstance(value, bool)})
        for path in (*files.values(), Path(out) / f"{stem}.json"):
            tracking.log_artifact(path, "comparison")
    return {name: str(path) for name, path in files.items()}


def main(argv: list[str]) -> None:
    stage_cli(compare, __doc__, argv,
              losses={"nargs": "+", "help": f"losses to compare (default: {' '.join(DEFAULT_LOSSES)}; "
                                            "online-only ones run last)"},
              overrides={"nargs": "+", "metavar": "KEY=VALUE",
                         "help": "extra `dvc exp run -S` overrides for every method"},
              out={"default": "docs/results", "help": "folder for the comparison files (default: docs/results)"},
              seeds={"nargs": "+", "type": int, "metavar": "SEED",
                     "help": "run each method once per distill.seed and report the mean, the standard deviation "
                             "and the 95 %% t-interval over seeds (default: params' distill.seed, once)"})
