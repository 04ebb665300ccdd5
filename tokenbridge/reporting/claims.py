"""The papers' claims, each a sweep of arms on equal terms, and the verdict its numbers allow.

A claim names its arms (params overrides, run as DVC experiments by `tokenbridge claim`), the arm the paper says
wins, the rivals it must beat, and the metric that decides. Every arm gets the same data, steps and seeds; only its
overrides differ. The verdict compares the claimed arm with each rival on that metric and its 95 % interval
(over seeds with several seeds, else over the test answers):

- **reproduced**: better than every rival, each difference outside the noise (neither value inside the other's
  interval);
- **not reproduced**: some rival is better, outside the noise (the page extrapolates, from the in-run learning
  curves, the budget at which its lead would close);
- **inside the noise**: otherwise (the measurement at this budget cannot tell).

Pages: docs/results/claims/<name>.md (+ .html, .json, plots) and the index docs/results/claims.md.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tokenbridge.contracts import SCORE_AND_INTERVAL, EvalMetrics, interval
from tokenbridge.intervals import paired_bootstrap_interval
from tokenbridge.io import read_json
from tokenbridge.reporting.document import (
    Block,
    Heading,
    Image,
    Paragraph,
    Table,
    format_value,
    inside_the_noise,
    key_values,
    with_interval,
)
from tokenbridge.reporting.plots import plot_learning_curves, plot_losses
from tokenbridge.reporting.render import write_document

Verdict = Literal["reproduced", "not reproduced", "inside the noise"]
# The student's scores every claim page shows beside the deciding metric.
SHOWN = ("bits_per_byte", "teacher_answers_bits_per_byte", "original_answers_bits_per_byte", "chunk_gap_bits_per_byte",
         "own_answers_chunk_gap_bits_per_byte", "gsm_exact_match", "arithmetic.acc")
UNTRAINED = ("student_before", "start")  # the reference each kind of claim trains from: student, moved model's init
DSKD_ONLINE = ("distill.loss=dskd", "distill.teacher_mode=online")  # DSKD projects the live teacher's hidden states


@dataclass(frozen=True)
class Claim:
    """One paper's claim as a sweep."""

    name: str
    source: str
    statement: str
    claimed: str  # the arm the paper says is better
    rivals: tuple[str, ...]  # the arms it must beat
    metric: str  # the deciding score (the distilled student's, or an evaluate_transfer label's)
    why_metric: str
    arms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # arm -> `dvc exp run -S` overrides
    # distill: an experiment per arm, read from the distilled student; transfer: evaluate_transfer's labels, from one
    # pipeline run when the claim has no arms (its arms are labels), else from an experiment per arm
    reads: Literal["distill", "transfer"] = "distill"
    teacher_on_student_tokenizer: bool = False  # the teacher is the transfer stage's `qwen` (same tokenizer)
    student_onto: str | None = None  # transfer arms: the student is the one source, moved onto this transfer.tokenizer
    pinned: Mapping[str, Any] = field(default_factory=dict)  # params every arm shares for this sweep (dotted keys)
    also_judged: tuple[str, ...] = ()  # metrics the page judges too, without deciding (one the claim once used)

    @property
    def budget_key(self) -> str:
        """The param `--steps` sets: the training steps of the stage the arms change (`reads` names its section)."""
        return f"{self.reads}.steps"

    @property
    def seed_key(self) -> str:
        return f"{self.reads}.seed"

    @property
    def curve_key(self) -> str:
        """The interval of the held-out learning curve in the runs the arms change."""
        return f"{self.reads}.heldout_every"


CLOSENESS = ("bits-per-byte on the teacher's own greedy answers (`teacher_answers_bits_per_byte`): how likely the "
             "student finds what its teacher says, on held-out questions. It compares across tokenizers and is "
             "trained on directly by none of the arms (the chunk gap is ALM's own objective, so it would favour "
             "ALM; bits-per-byte on the reference answers is what next-token training optimises).")

CLAIMS: dict[str, Claim] = {claim.name: claim for claim in (
    Claim("alm-distillation", "Minixhofer et al. 2025, Cross-Tokenizer Distillation via Approximate Likelihood "
          "Matching (ALM)",
          "ALM distils Qwen2.5-Coder-0.5B-Instruct into SmolLM2-135M-Instruct better than the other cross-tokenizer "
          "losses (ULD, MinED, MultiLevelOT, DSKD).",
          claimed="alm", rivals=("uld", "mined", "multilevel_ot", "dskd"), metric="teacher_answers_bits_per_byte",
          why_metric=CLOSENESS,
          arms={"alm": ("distill.loss=alm",), "uld": ("distill.loss=uld",), "mined": ("distill.loss=mined",),
                "multilevel_ot": ("distill.loss=multilevel_ot",), "dskd": DSKD_ONLINE,
                "sft": ("distill.loss=sft",)}),
    Claim("multilevel-ot", "Cui et al. 2025, Multi-Level Optimal Transport for Universal Cross-Tokenizer Knowledge "
          "Distillation",
          "MultiLevelOT distils across tokenizers better than ULD and DSKD.",
          claimed="multilevel_ot", rivals=("uld", "dskd"), metric="teacher_answers_bits_per_byte",
          why_metric=CLOSENESS,
          arms={"multilevel_ot": ("distill.loss=multilevel_ot",), "uld": ("distill.loss=uld",), "dskd": DSKD_ONLINE}),
    Claim("pretraining-distillation", "Peng et al. 2024, Pre-training Distillation for Large Language Models: A "
          "Design Space Exploration",
          "Truncated-logit KD as the paper's best (PD*: top-0.95-50, temperature 2, KL, WSD alpha up to 0.9) beats "
          "next-token training alone at equal tokens, teacher and student sharing a tokenizer.",
          claimed="pd_star", rivals=("next_token",), metric="bits_per_byte",
          why_metric="held-out bits-per-byte on the reference answers: the language-modelling quality the paper's "
                     "claim is about (its benchmarks are out of reach at this budget).",
          arms={"pd_star": ("distill.loss=forward_kl", "distill.teacher.top_p=0.95", "distill.teacher.top_k=50",
                            "distill.teacher.temperature=2.0", "distill.alpha=0.9", "distill.alpha_schedule=wsd"),
                "next_token": ("distill.loss=sft",)},
          teacher_on_student_tokenizer=True),
    Claim("gkd-on-policy", "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
          "On-policy distillation (lambda 1) ends closer to the teacher on the student's own generations than "
          "off-policy at equal steps.",
          claimed="on_policy", rivals=("off_policy",), metric="own_answers_chunk_gap_bits_per_byte",
          why_metric="the chunk gap to the teacher on the student's own greedy answers to held-out questions "
                     "(`own_answers_chunk_gap_bits_per_byte`): how far the two models' likelihoods are apart on what "
                     "the student says, the distribution on-policy training samples from. ALM is the loss of both "
                     "arms (cross-tokenizer), so the arms differ only in where their answers come from.",
          arms={"on_policy": ("distill.teacher_mode=online", "distill.on_policy.fraction=1.0"),
                "off_policy": ("distill.teacher_mode=online", "distill.on_policy.fraction=0.0")}),
    Claim("alm-ensemble", "Minixhofer et al. 2025 (ALM), section on ensembling",
          "Models moved onto one tokenizer by the transfer stage and ensembled beat their best member.",
          claimed="ensemble", rivals=("student", "gemma.transferred", "qwen.transferred"), metric="bits_per_byte",
          why_metric="held-out bits-per-byte on the reference answers, which every member and the ensemble get from "
                     "evaluate_transfer.",
          reads="transfer"),
    *(Claim(f"alm-transfer{suffix}", "Minixhofer et al. 2025 (ALM), tokenizer transfer",
            f"Moving SmolLM2-135M-Instruct onto {target}, ALM recovers more of the original's quality than "
            "next-token training alone and than ULD, MinED and DSKD, at equal steps.",
            claimed="alm", rivals=("sft", "uld", "mined", "dskd"), metric="original_answers_bits_per_byte",
            why_metric="held-out bits-per-byte of the moved model (`moved.transferred`) on the original model's own "
                       "greedy answers to held-out questions (`original_answers_bits_per_byte`), beside the "
                       "original's and FVT's alone: how much of what the original says the moved model still finds "
                       "likely, compared across tokenizers by counting bytes, and trained on directly by no arm. "
                       "This claim was first judged (page of commit 574df8b) on bits-per-byte on the reference "
                       "answers, which next-token training (`sft`) optimises directly on text of their own "
                       "distribution, while the original model, the target of every distilling arm, bounds them "
                       "there: sft beat ALM on it, outside the noise, at 8 and at 32 steps. That metric is still "
                       "judged on this page, not deciding. Every arm starts from the same FVT model and trains the "
                       "same steps on the same texts; only `transfer.loss` differs.",
            arms={loss: (f"transfer.loss={loss}",) for loss in ("alm", "sft", "uld", "mined", "dskd")},
            reads="transfer", student_onto=tokenizer, pinned=pinned, also_judged=("bits_per_byte",))
      for suffix, target, tokenizer, pinned in (
          ("", "the Qwen2.5 tokenizer (the teacher's)", "teacher", {}),
          # a byte is a token: the longest train text (1,045 bytes with its chat template) must fit, or the
          # transfer trains on the few short ones alone (12 of 96 at the default 384)
          ("-bytes", "bytes", "byte", {"transfer.max_length": 1536}))),
)}


def paired_difference(metric: str, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> tuple[float, float] | None:
    """The 95 % paired-bootstrap interval of mine minus theirs on `metric`, where both arms hold the metric's
    per-example parts (`per_example`: one seed each) on the same examples (the same bytes, example by example); else
    None. The arms see the same test answers, so the answers' own difficulty, most of each arm's interval, cancels."""
    first, second = (scores.get("per_example", {}).get(metric) for scores in (mine, theirs))
    if not first or not second or [size for _, size in first] != [size for _, size in second]:
        return None
    return paired_bootstrap_interval(first, second)


def _noise(metric: str, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> tuple[bool, float | None, str]:
    """Whether the two arms are inside each other's noise; how far their gap would have to reach (in absolute value)
    to leave it, were the intervals to keep their width (None without intervals); and how that was judged. Paired
    where both hold per-example parts of the same examples (the difference's interval holds 0), else each value
    inside the other's interval."""
    gap = mine[metric] - theirs[metric]
    paired = paired_difference(metric, mine, theirs)
    if paired is not None:
        low, high = paired
        return (low <= 0 <= high, gap - low if gap > 0 else high - gap,
                f"paired difference {format_value(gap)} [{format_value(low)}, {format_value(high)}]")
    my_bounds, their_bounds = interval(mine, metric), interval(theirs, metric)
    if my_bounds is None or their_bounds is None:
        return False, None, "no interval"
    (my_low, my_high), (their_low, their_high) = my_bounds, their_bounds
    # outside the noise: each value beyond the other's interval, on the side the gap points to
    needed = (max(their_high - theirs[metric], mine[metric] - my_low) if gap > 0 else
              max(theirs[metric] - their_low, my_high - mine[metric]))
    return inside_the_noise(metric, mine, theirs), needed, "intervals compared"


def verdict(claim: Claim, results: Mapping[str, Mapping[str, Any]]) -> tuple[Verdict, list[str]]:
    """The verdict, and one sentence per rival saying how the claimed arm compares with it."""
    metric, better = claim.metric, EvalMetrics.better(claim.metric)
    mine = results[claim.claimed]
    outcomes, sentences = [], []
    for rival in claim.rivals:
        theirs = results[rival]
        noise, _, judged = _noise(metric, mine, theirs)
        if noise:
            outcome = "inside the noise"
        elif (mine[metric] < theirs[metric]) == (better == "lower"):
            outcome = "better"
        else:
            outcome = "worse"
        outcomes.append(outcome)
        sentences.append(f"{claim.claimed} {format_value(mine[metric])} against {rival} "
                         f"{format_value(theirs[metric])}: {outcome} ({judged}).")
    if "worse" in outcomes:
        return "not reproduced", sentences
    return ("reproduced" if all(outcome == "better" for outcome in outcomes) else "inside the noise"), sentences


def _movement(metric: str, results: Mapping[str, Mapping[str, Any]], before: Mapping[str, Any] | None,
              paired: bool) -> str:
    """How far training moved the deciding metric from the untrained model (student, or moved start), against the
    intervals' width: where the arms moved less than the noise, a longer budget is what could separate them (unless
    they were compared paired, which their own intervals do not bound)."""
    if before is None or metric not in before:
        return ""
    moves = [abs(scores[metric] - before[metric]) for scores in results.values() if metric in scores]
    widths = [bounds[1] - bounds[0] for scores in results.values() if (bounds := interval(scores, metric))]
    if not moves or not widths:
        return ""
    return (f" Training moved {metric} by at most {format_value(max(moves))} from the untrained model "
            f"({format_value(before[metric])}), against 95 % intervals {format_value(min(widths))} to "
            f"{format_value(max(widths))} wide" + (
                "." if paired else ": arms that move less than their intervals' width cannot be told apart, so a "
                "budget at which the arms move several interval widths is what could separate them."))


def _untrained(references: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The reference a claim's arms train from (`UNTRAINED`), if the sweep scored it."""
    return next((references[name] for name in UNTRAINED if name in references), None)


def _teacher_behind(claim: Claim, references: Mapping[str, Mapping[str, Any]]) -> str:
    """A distillation claim presumes a teacher ahead of its student. Where, on the deciding metric, the teacher is not
    ahead of the untrained student outside the noise, no loss can be expected to pull the student forward, and the
    page says the sweep does not test the claim."""
    metric, teacher, untrained = claim.metric, references.get("teacher"), _untrained(references)
    if claim.reads != "distill" or teacher is None or untrained is None:
        return ""
    if metric not in teacher or metric not in untrained:
        return ""
    noise, _, judged = _noise(metric, teacher, untrained)
    if not noise and (teacher[metric] < untrained[metric]) == (EvalMetrics.better(metric) == "lower"):
        return ""
    stronger = (" (here the teacher is moved onto the student's tokenizer: a longer transfer, or a stronger original)"
                if claim.teacher_on_student_tokenizer else "")
    return (f" The teacher ({format_value(teacher[metric])}) is {'inside the noise of' if noise else 'behind'} the "
            f"untrained student ({format_value(untrained[metric])}) on {metric} ({judged}): the claim presumes a "
            f"teacher ahead of its student, so this sweep does not test it; a stronger teacher{stronger} is what it "
            "needs first.")


def _separating_budgets(claim: Claim, results: Mapping[str, Mapping[str, Any]], budget: int) -> str:
    """For each rival still inside the noise, the budget at which its gap to the claimed arm would leave the noise,
    were the gap to grow in proportion to the training steps (every arm starts from the same model, so the gap is 0
    at step 0) and the intervals to keep their width: a rough answer to which budget would likely separate them.
    Counted in the arms' recorded optimizer steps (a transfer's embedding steps included), else in `budget`."""
    mine, estimates = results[claim.claimed], []
    steps = int(mine.get("steps") or budget)
    for rival in claim.rivals:
        theirs = results[rival]
        noise, needed, _ = _noise(claim.metric, mine, theirs)
        if steps <= 0 or not noise or needed is None:
            continue
        gap = mine[claim.metric] - theirs[claim.metric]
        ahead = (gap < 0) == (EvalMetrics.better(claim.metric) == "lower")
        estimates.append(f"{rival} at about {math.ceil(round(steps * needed / abs(gap), 6))} steps ({claim.claimed} "
                         f"{'ahead' if ahead else 'behind'})" if gap else f"{rival} never (no gap)")
    if not estimates:
        return ""
    return (f" Were each gap to grow in proportion to the training steps ({steps} now, from 0: every arm starts "
            "from the same model) with intervals of today's width, it would leave the noise: "
            + "; ".join(estimates) + ".")


def _closing_budgets(claim: Claim, results: Mapping[str, Mapping[str, Any]],
                     curves: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """For each rival ahead of the claimed arm outside the noise, the step at which its lead would close were it to
    keep changing as it did over the second half of the in-run curves (a least-squares line through the lead at those
    points): a rough answer to which budget would likely turn the verdict. Counted in the curves' steps (a transfer's
    embedding steps included)."""
    mine, lower = results[claim.claimed], EvalMetrics.better(claim.metric) == "lower"
    estimates, uncurved = [], []
    for rival in claim.rivals:
        theirs = results[rival]
        if _noise(claim.metric, mine, theirs)[0] or (theirs[claim.metric] < mine[claim.metric]) != lower:
            continue
        shared = sorted(set(curves.get(claim.claimed, {})) & set(curves.get(rival, {})))
        tail = [step for step in shared if step > 0 and step >= shared[-1] / 2]
        if len(tail) < 2:
            uncurved.append(rival)
            continue
        leads = [(curves[claim.claimed][step][claim.metric] - curves[rival][step][claim.metric]) * (1 if lower else -1)
                 for step in tail]
        line = statistics.linear_regression(tail, leads)
        trend = (f"{rival}'s lead went from {format_value(leads[0])} to {format_value(leads[-1])} over steps "
                 f"{tail[0]}-{tail[-1]} ({format_value(10 * line.slope)} per 10 steps)")
        closed_at = math.ceil(round(-line.intercept / line.slope, 6)) if line.slope < 0 else None
        estimates.append(f"{trend}: at that rate it would close at about {closed_at} steps, and the claimed arm "
                         "would need more to lead outside the noise" if closed_at is not None else
                         f"{trend}: it did not shrink, so its trend closes it at no budget")
    text = (" Where a rival leads outside the noise, its lead along the in-run curves (least squares over the second "
            "half of each run): " + "; ".join(estimates) + ". A run's learning rate decays to its last step, so this "
            "extrapolates one run's trend: the budget it names is where a longer sweep should look, not a result."
            if estimates else "")
    if uncurved:
        text += (f" {', '.join(uncurved)} {'leads' if len(uncurved) == 1 else 'lead'} outside the noise, but this "
                 "sweep's runs held out no learning curve to extrapolate from: rerun the claim (its stage's "
                 "heldout_every) for an estimate of the budget that would close the lead.")
    return text


def _trend(history: Mapping[str, Sequence[float]]) -> float | None:
    """The training loss's change per 10 steps over the last quarter of the run (least squares): negative while
    it still falls."""
    steps, losses = history.get("step", []), history.get("loss", [])
    tail = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)][-max(2, len(steps) // 4):]
    if len(tail) < 2:
        return None
    return 10 * statistics.linear_regression(*zip(*tail)).slope


def render_claim(claim: Claim, budgets: Mapping[int, Mapping[str, Mapping[str, Any]]],
                 references: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any], out_dir: Path) -> Verdict:
    """Writes out_dir/claims/<name>.md, .html and claims/plots/*.png; `budgets` maps training steps (`budget_key`;
    one budget for a claim read from one pipeline run) to arm -> scores over seeds. The verdict is taken at the
    largest budget."""
    final = max(budgets)
    results = budgets[final]
    untrained = _untrained(references)
    decision, sentences = verdict(claim, results)
    curves = _heldout_curves(claim, results, untrained)
    metrics = [claim.metric, *(name for name in SHOWN if name != claim.metric
                               and any(name in scores for scores in results.values()))]
    rows = [[label, *(with_interval(scores, metric) for metric in metrics)]
            for label, scores in {**references, **results}.items()]
    blocks: list[Block] = [
        Paragraph(f"Claim ({claim.source}): {claim.statement}"),
        Paragraph(f"Verdict at this budget: {decision}. " + " ".join(sentences)
                  + _movement(claim.metric, results, untrained,
                              any(paired_difference(claim.metric, results[claim.claimed], results[rival]) is not None
                                  for rival in claim.rivals))
                  + _separating_budgets(claim, results, final) + _closing_budgets(claim, results, curves)
                  + _teacher_behind(claim, references)),
        *_also_judged(claim, results),
        Paragraph(f"Deciding metric: {claim.why_metric} [low, high]: its 95 % interval, over the seeds (the "
                  "t-interval of the mean) with several seeds, else over the test answers. With one seed, two arms "
                  "scored on the same answers are compared by a paired bootstrap (the same answers resampled for "
                  "both): they are inside the noise when the 95 % interval of their difference holds 0. Otherwise, "
                  "two values are inside the noise when each lies inside the other's interval."),
        Table(["arm", *metrics], rows, numbers=True),
    ]
    plots = {}
    if claim.arms:
        blocks.append(Table(["arm", "overrides", "final loss", "loss change per 10 steps, last quarter", "s / step"],
                            [[arm, " ".join(claim.arms[arm]), format_value(scores.get("final_loss")),
                              format_value(_trend(_mean_history(scores))),
                              format_value(scores.get("median_seconds_per_step"))]
                             for arm, scores in results.items()], numbers=True))
        stem = f"claim-{claim.name}-training"
        plots[stem] = out_dir / "claims" / "plots" / f"{stem}.png"
        plot_losses(_mean_history(next(iter(results.values())))["step"],
                    {arm: _mean_history(scores)["loss"] for arm, scores in results.items()}, "", plots[stem])
        blocks.append(Image(stem, "Each arm's own training loss per step (mean over seeds): the losses differ by "
                                  "arm, so compare shapes, not heights."))
    if curves:
        stem = f"claim-{claim.name}-heldout"
        plots[stem] = out_dir / "claims" / "plots" / f"{stem}.png"
        plot_learning_curves(curves, claim.metric, plots[stem], f"held-out {claim.metric} during training")
        blocks.append(Image(stem, f"The learning curve inside each arm's run: held-out {claim.metric} on the same "
                                  "answers as the verdict, every heldout_every steps of its stage, with its 95 % "
                                  "interval, from the untrained model at step 0. A run's learning rate decays to its "
                                  "last step, so a point shows where that run was, not what a run of that budget "
                                  "would reach."))
    if len(budgets) > 1:
        stem = f"claim-{claim.name}-budget"
        plots[stem] = out_dir / "claims" / "plots" / f"{stem}.png"
        plot_learning_curves({arm: {steps: budgets[steps][arm] for steps in sorted(budgets)} for arm in results},
                             claim.metric, plots[stem])
        counted = "; the curve inside each run counts the embedding steps too" if claim.reads == "transfer" else ""
        blocks.append(Image(stem, f"The learning curve: {claim.metric} of each arm by training budget "
                                  f"(`{claim.budget_key}`{counted}), with its 95 % interval."))
    blocks += [Heading("Run"), key_values(context, ["fact", "value"])]
    write_document(out_dir / "claims", claim.name, f"Claim: {claim.name}", blocks, plots)
    return decision


def _also_judged(claim: Claim, results: Mapping[str, Mapping[str, Any]]) -> list[Paragraph]:
    """The verdict on each of `claim.also_judged` that every arm has, as if it decided: shown, not deciding."""
    paragraphs = []
    for metric in claim.also_judged:
        if all(metric in scores for scores in results.values()):
            decision, sentences = verdict(replace(claim, metric=metric), results)
            paragraphs.append(Paragraph(f"Judged on {metric} too (not deciding): {decision}. " + " ".join(sentences)))
    return paragraphs


def _heldout_curves(claim: Claim, results: Mapping[str, Mapping[str, Any]],
                    untrained: Mapping[str, Any] | None) -> dict[str, dict[int, Mapping[str, Any]]]:
    """arm -> step -> held-out scores inside its run (`experiments.loss_curve`'s `heldout`), the untrained model at
    step 0: one seed's points with their intervals, several seeds' mean alone. Empty where no arm has a curve of the
    deciding metric."""
    curves: dict[str, dict[int, Mapping[str, Any]]] = {}
    for arm, scores in results.items():
        runs = [run["history"]["heldout"] for run in scores.get("runs", {}).values()
                if "heldout" in run.get("history", {}) and claim.metric in run["history"]["heldout"]]
        if not runs:
            continue
        points: dict[int, Mapping[str, Any]] = {0: untrained} if untrained else {}
        bounded = [f"{claim.metric}{end}" for end in SCORE_AND_INTERVAL]
        for index, step in enumerate(runs[0]["step"]):
            points[step] = ({key: runs[0][key][index] for key in bounded} if len(runs) == 1
                            else {claim.metric: statistics.fmean(run[claim.metric][index] for run in runs)})
        curves[arm] = points
    return curves


def _mean_history(scores: Mapping[str, Any]) -> dict[str, list[float]]:
    """The training curve averaged over an arm's seeds (they share their steps)."""
    curves = [run["history"] for run in scores.get("runs", {}).values() if "history" in run]
    if not curves:
        return {"step": [], "loss": []}
    return {"step": curves[0]["step"],
            "loss": [sum(values) / len(values) for values in zip(*(curve["loss"] for curve in curves))]}


def render_index(out_dir: Path) -> Path:
    """docs/results/claims.md (+ .html): every claim with its verdict where its page exists."""
    rows = []
    for claim in CLAIMS.values():
        page = out_dir / "claims" / f"{claim.name}.json"
        if page.is_file():
            record = read_json(page)
            status = f"{record['verdict']} ({record['budget']})"
            if _teacher_behind(claim, record["references"]):
                status += "; its teacher is not ahead of the student, so the sweep does not test the claim"
            link = f"[claims/{claim.name}.md](claims/{claim.name}.md)"
        else:
            status = "not run yet"
            link = "–"
        rows.append([claim.name, claim.statement, status, link, f"`tokenbridge claim --name {claim.name}`"])
    blocks: list[Block] = [
        Paragraph("Each claim of the papers tokenbridge implements, measured here as a sweep of DVC experiments "
                  "(same data, steps and seeds for every arm), with its verdict at the budget it ran: reproduced, "
                  "not reproduced, or inside the noise. A verdict holds for that budget and machine only; each page "
                  "gives the budget, the seeds, the learning curves and the machine."),
        Table(["claim", "statement", "verdict", "page", "command"], rows),
    ]
    paths = write_document(out_dir, "claims", "The papers' claims, measured", blocks, {})
    return paths["markdown"]

