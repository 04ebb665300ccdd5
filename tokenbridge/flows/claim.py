"""Run one of the papers' claims as a sweep of DVC experiments and write its page, with the verdict.

  tokenbridge claim --name alm-distillation                   each arm once, at params' distill.steps and seed
  tokenbridge claim --name alm-distillation --seeds 1 2 3     each arm once per seed: mean, spread, t-interval
  tokenbridge claim --name alm-distillation --steps 10 20 40  the learning curve: each arm at each budget (the
                                                              verdict at the largest)
  tokenbridge claim --name alm-ensemble                       reads one pipeline run (evaluate_transfer)
  tokenbridge claim --name alm-transfer                       the student moved onto the teacher's tokenizer,
                                                              once per transfer.loss (--steps: transfer.steps)
  tokenbridge claim --name alm-transfer --render-only         its page again from its stored record
                                                              (docs/results/claims/<name>.json), running nothing

The claims, their arms and the metric that decides each: tokenbridge/reporting/claims.py and
docs/results/claims.md. Each arm runs as `dvc exp run -n claim-<name>-<arm>-s<seed>-<time> -S ... evaluate@...`
(for a same-tokenizer claim, after the transfer stage has moved the teacher onto the student's tokenizer),
sharing every stage upstream of distill, and stays in `dvc exp show`; the teacher's and the untrained student's
scores are read as the experiments left them. alm-ensemble reads one `dvc repro` of the whole pipeline. A
transfer claim with arms (alm-transfer, alm-transfer-bytes) makes the student the transfer stage's one source
(`moved`), moved onto its tokenizer, and runs each arm as an experiment up to `evaluate_transfer`; the original's
and the start's scores are read as the experiments left them. params.yaml is restored afterwards.
Writes docs/results/claims/<name>.{md,html,json} (`--out` for another folder), its plots, and the index
docs/results/claims.md; also the page of every other claim whose arms the sweep ran with the same overrides
(alm-distillation's sweep answers multilevel-ot).
"""

from __future__ import annotations

import math
import shutil
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from tokenbridge import tracking
from tokenbridge.contracts import MANIFEST, EvalMetrics, ModelCard, PreparedManifest, TransferMetrics, TransferScores
from tokenbridge.experiments import distilled, loss_curve, params_restored, profile_setting, run, run_arms
from tokenbridge.flows.common import stage_cli
from tokenbridge.io import read_json, write_json
from tokenbridge.params import PipelineParams, load_params
from tokenbridge.paths import (
    EVAL_DIR,
    EVAL_METRICS_DIR,
    EVAL_MODELS,
    EVALUATED_ROLES,
    PER_EXAMPLE,
    PREPARED_DIR,
    STUDENT_DIR,
    TEACHER_DIR,
    TRANSFER_EVAL_DIR,
    TRANSFER_EVAL_METRICS,
    TRANSFER_HISTORY_DIR,
    TRANSFER_METRICS,
    TRANSFERRED_DIR,
)
from tokenbridge.reporting.claims import CLAIMS, Claim, render_claim, render_index
from tokenbridge.runtime import machine, resolve_device

MOVED_TEACHER = "qwen"  # the transfer source a same-tokenizer claim's teacher is
MOVED = "moved"  # the transfer source a transfer claim with arms moves: the student
# What a distillation claim's experiments bring up to date: the three evaluations (and distill, before them), not the
# transfer, hypernetwork or report stages, which no arm changes.
EVALUATED = [f"evaluate@{model}" for model in EVAL_MODELS]
# A run's held-out learning curve gets at most this many points besides its last, whatever the budget: each point is a
# scoring pass, and at transfer's default 4 steps a 136-step run onto bytes would have spent 35 points of about 100 s
# each against 12 s per training step (Intel Xeon, 2 cores).
MAX_CURVE_POINTS = 9


def _pin(params_path: Path, values: dict[str, Any]) -> None:
    """Set dotted keys in params.yaml for this sweep: at the top level, and in the active profile where it sets the
    same key, so the profile's own value (a mapping merges over the top level's) cannot add to or override it. A key
    the profile does not set stays out of it: DVC tracks a profile's keys as they are in dvc.yaml."""
    raw = yaml.safe_load(params_path.read_text())
    for key, value in values.items():
        profile = profile_setting(raw, key)
        *parents, leaf = key.split(".")
        for root in [raw, *([raw["profiles"][profile]] if profile is not None else [])]:
            node = root
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _teacher_on_the_students_tokenizer(claim: Claim, params: PipelineParams, params_path: Path) -> str:
    """Run the transfer stage on its `qwen` source alone (moved onto the student's tokenizer), keep the result outside
    every DVC output, and make it the teacher in params.yaml for this sweep; returns the folder."""
    if params.transfer.tokenizer != "student" or MOVED_TEACHER not in params.transfer.sources:
        raise SystemExit(f"claim {claim.name} needs the transfer stage to move source '{MOVED_TEACHER}' onto the "
                         "student's tokenizer: set transfer.tokenizer: student and keep transfer.sources."
                         f"{MOVED_TEACHER}")
    _pin(params_path, {"transfer.sources": {MOVED_TEACHER: params.transfer.sources[MOVED_TEACHER].model_dump(
        mode="json")}, "ensemble.members": ["student", MOVED_TEACHER], "ensemble.weights": []})
    run(["dvc", "repro", "transfer"])
    kept = Path("checkpoints") / "claims" / claim.name / "teacher"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(TRANSFERRED_DIR / MOVED_TEACHER, kept)
    _pin(params_path, {"models.teacher": {"source": "hf", "path": str(kept)}})
    return str(kept)


def _student_moved(claim: Claim, params: PipelineParams, params_path: Path) -> None:
    """Make the student the transfer stage's one source (`moved`), onto `claim.student_onto`, and the one ensemble
    member, in params.yaml for this sweep."""
    _pin(params_path, {"transfer.tokenizer": claim.student_onto,
                       "transfer.sources": {MOVED: params.models.student.model_dump(mode="json")},
                       "ensemble.members": [MOVED], "ensemble.weights": []})


def curve_every(claim: Claim, steps: int, params: PipelineParams) -> int:
    """`heldout_every` in an arm's run of `steps`: params.yaml's, widened where the run would otherwise get more than
    MAX_CURVE_POINTS points (0 stays 0: no curve; the transfer stage counts its embedding steps too)."""
    configured = attrgetter(claim.curve_key)(params)
    total = steps + (params.transfer.embedding_steps if claim.reads == "transfer" else 0)
    return max(configured, math.ceil(total / MAX_CURVE_POINTS)) if configured else 0


def budget_overrides(claim: Claim, steps: int, params: PipelineParams) -> tuple[str, ...]:
    """What gives every arm a budget of `steps`: the steps, and the curve's interval where it widens params.yaml's
    (set only then: a stage's params section with an added key is a new run to DVC's run cache)."""
    every = curve_every(claim, steps, params)
    widened = every != attrgetter(claim.curve_key)(params)
    return f"{claim.budget_key}={steps}", *([f"{claim.curve_key}={every}"] if widened else [])


def _evaluated(label: str) -> dict[str, Any]:
    """An evaluate_transfer label's scores with their per-example parts (for paired comparisons), read where the
    label was evaluated: a member the evaluate stage scored, there."""
    folder = EVAL_DIR / EVALUATED_ROLES[label] if label in EVALUATED_ROLES else TRANSFER_EVAL_DIR / label
    return {**TransferScores.read(TRANSFER_EVAL_METRICS).root[label].numbers(),
            "per_example": read_json(folder / PER_EXAMPLE)}


def _transferred() -> dict[str, Any]:
    """The moved student's scores, its transfer summary, training curve and per-example parts: what an arm of a
    transfer claim yields."""
    summary = TransferMetrics.read(TRANSFER_METRICS).root[MOVED]
    return {**_evaluated(f"{MOVED}.transferred"), **summary.model_dump(exclude={"fvt", "hypernet"}, exclude_none=True),
            "history": loss_curve(TRANSFER_HISTORY_DIR / f"{MOVED}.csv")}


@flow(name="claim", log_prints=True)
def claim(params_file: str = "params.yaml", name: str = "alm-distillation", seeds: list[int] | None = None,
          steps: list[int] | None = None, out: str = "docs/results", render_only: bool = False) -> dict:
    chosen = CLAIMS[name]
    if render_only:
        return _render_again(chosen, Path(out))
    params_path = Path(params_file)
    params = load_params(params_path)
    seeds = seeds or [attrgetter(chosen.seed_key)(params)]
    budgets_asked = sorted(steps or [attrgetter(chosen.budget_key)(params)])
    facts: dict = {}
    with params_restored(params_path):
        references: dict[str, dict] = {}  # the untrained and reference models beside the arms
        if chosen.pinned:
            _pin(params_path, dict(chosen.pinned))
            facts["pinned for every arm"] = dict(chosen.pinned)
        if chosen.teacher_on_student_tokenizer:
            facts["teacher (moved onto the student's tokenizer)"] = _teacher_on_the_students_tokenizer(
                chosen, params, params_path)
        if chosen.student_onto:
            _student_moved(chosen, params, params_path)
            facts["moved"] = f"the student, onto transfer.tokenizer {chosen.student_onto}"
        if chosen.arms:
            targets = EVALUATED if chosen.reads == "distill" else ["evaluate_transfer"]
            budgets = {n: run_arms({arm: (*overrides, *budget_overrides(chosen, n, params))
                                    for arm, overrides in chosen.arms.items()}, seeds, f"claim-{name}", targets,
                                   distilled if chosen.reads == "distill" else _transferred, chosen.seed_key)
                       for n in budgets_asked}
            # What no arm changes, as the last experiment left it in the workspace: the teacher and the untrained
            # student, or the moved model's original and its start (FVT's rows depend on transfer.seed alone).
            if chosen.reads == "distill":
                references = {model: scores.numbers() for model, scores in
                              EvalMetrics.read_all(EVAL_METRICS_DIR, ["teacher", "student_before"]).items()}
            else:
                moved = TransferScores.read(TRANSFER_EVAL_METRICS).root
                references = {"original": moved[f"{MOVED}.original"].numbers(),
                              "start": moved[f"{MOVED}.{params.transfer.init}"].numbers()}
            embedding = f"{params.transfer.embedding_steps} embedding + " if chosen.reads == "transfer" else ""
            budget = f"{embedding}{budgets_asked[-1]} steps, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
        else:
            run(["dvc", "repro"])
            budgets = {0: {label: _evaluated(label) for label in (chosen.claimed, *chosen.rivals)}}
            budget = f"one pipeline run (transfer: {params.transfer.embedding_steps} + {params.transfer.steps} steps)"
        context = {
            "teacher": ModelCard.of(TEACHER_DIR).name, "student": ModelCard.of(STUDENT_DIR).name, **facts,
            "profile": params.profile, **tracking.revision_tags(),
            "machine": machine(resolve_device(params.runtime.device)),
            "train examples": PreparedManifest.read(PREPARED_DIR / MANIFEST).splits.train.examples,
            "budget": budget, "steps (budgets)": f"{chosen.budget_key}: {budgets_asked}" if chosen.arms else "–",
            "seeds": f"{chosen.seed_key}: {seeds}" if chosen.arms else "–",
            "heldout_every, by budget": {n: curve_every(chosen, n, params) for n in budgets_asked}
            if chosen.arms else "–",
            **({"batch_size": params.distill.batch_size, "learning_rate": params.distill.learning_rate}
               if chosen.reads == "distill" else
               {"transfer": {key: getattr(params.transfer, key) for key in (
                   "embedding_steps", "train", "batch_size", "learning_rate", "embedding_learning_rate")}}),
            "evaluate": {"tasks": params.evaluate.tasks, "limit": params.evaluate.limit,
                         "choice_limit": params.evaluate.choice_limit, "bpb_examples": params.evaluate.bpb_examples,
                         "teacher_answers": params.evaluate.teacher_answers},
        }
    out_dir = Path(out)
    records = {}
    for answered in [chosen, *(other for other in CLAIMS.values() if other is not chosen and _within(other, chosen))]:
        arms = {steps: {arm: by_arm[arm] for arm in (answered.arms or by_arm)} for steps, by_arm in budgets.items()}
        decision = render_claim(answered, arms, references, context, out_dir)
        records[answered.name] = {"claim": answered.name, "verdict": decision, "budget": budget, "budgets": arms,
                                  "references": references, "context": {**context, "sweep": name}}
        write_json(out_dir / "claims" / f"{answered.name}.json", records[answered.name])
        print(f"claim {answered.name}: {decision} ({budget}); {out_dir / 'claims' / f'{answered.name}.md'}")
    index = render_index(out_dir)
    print(f"index: {index}")
    with tracking.stage_run(f"claim@{name}", params.tracking.experiment, params.profile, {"claim": name}):
        for page in records:
            tracking.log_artifact(out_dir / "claims" / f"{page}.json", "claims")
            tracking.log_artifact(out_dir / "claims" / f"{page}.md", "claims")
    return records[name]


def _render_again(chosen: Claim, out_dir: Path) -> dict:
    """Writes a claim's page and the index again from its stored record, running nothing: the page of a sweep that
    ran before the page's code changed. The record's context keeps the sweep's commit and adds the rendering one."""
    path = out_dir / "claims" / f"{chosen.name}.json"
    if not path.is_file():
        raise SystemExit(f"no record of claim {chosen.name} at {path}: run `tokenbridge claim --name {chosen.name}` "
                         "first, or pass --out with the folder that holds it")
    record = read_json(path)
    budgets = {int(steps): arms for steps, arms in record["budgets"].items()}
    context = {**record["context"], "page rendered at": tracking.revision_tags()["git_commit"]}
    record = {**record, "context": context,
              "verdict": render_claim(chosen, budgets, record["references"], context, out_dir)}
    write_json(path, record)
    print(f"claim {chosen.name}: {record['verdict']} ({record['budget']}); {out_dir / 'claims' / f'{chosen.name}.md'}"
          f"\nindex: {render_index(out_dir)}")
    return record


def _within(other: Claim, sweep: Claim) -> bool:
    """Whether the sweep's runs answer `other` too: each of its arms ran, with the same overrides and setup."""
    return (other.reads == "distill" == sweep.reads and bool(other.arms)
            and other.teacher_on_student_tokenizer == sweep.teacher_on_student_tokenizer
            and other.pinned == sweep.pinned
            and all(sweep.arms.get(arm) == overrides for arm, overrides in other.arms.items()))


def main(argv: list[str]) -> None:
    stage_cli(claim, __doc__, argv,
              name={"choices": list(CLAIMS), "required": True,
                    "help": "which claim (docs/results/claims.md lists them)"},
              seeds={"nargs": "+", "type": int, "metavar": "SEED",
                     "help": "run each arm once per seed (distill.seed, or transfer.seed for a transfer claim; "
                             "default: params' value, once)"},
              steps={"nargs": "+", "type": int, "metavar": "N",
                     "help": "training budgets (distill.steps, or transfer.steps for a transfer claim): each arm "
                             "at each, a learning curve (default: params' value)"},
              out={"default": "docs/results", "help": "folder for the pages (default: docs/results)"},
              render_only={"action": "store_true",
                           "help": "write the claim's page again from its stored record (<out>/claims/<name>.json), "
                                   "running no experiment"})
