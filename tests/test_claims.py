"""The papers' claims: every arm is a valid params override, and the verdict follows the intervals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tokenbridge.contracts import HELDOUT
from tokenbridge.evaluation.curve import is_curve_step
from tokenbridge.io import write_json
from tokenbridge.params import PipelineParams, resolve
from tokenbridge.reporting.claims import CLAIMS, Claim, render_claim, render_index, verdict
from tokenbridge.training.history import history_csv

ROOT = Path(__file__).parents[1]


def _apply(raw: dict, override: str) -> None:
    """`dvc exp run -S key=value` on the parsed params."""
    key, value = override.split("=", 1)
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = yaml.safe_load(value)


@pytest.mark.parametrize("name", [name for name, claim in CLAIMS.items() if claim.arms])
def test_every_arm_of_a_claim_is_params_that_validate_and_differ_from_the_others(name):
    arms = {}
    for arm, overrides in CLAIMS[name].arms.items():
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        for override in overrides:
            _apply(raw, override)
        arms[arm] = resolve(raw, "default")
        assert isinstance(arms[arm], PipelineParams)
    assert len({params.model_dump_json() for params in arms.values()}) == len(arms)
    assert {CLAIMS[name].claimed, *CLAIMS[name].rivals} <= set(arms)


def test_a_claims_pinned_params_hold_in_the_active_profile_whose_own_mappings_would_merge_over_them(tmp_path):
    from tokenbridge.flows.claim import MOVED, _student_moved

    params_path = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params_path.write_text(yaml.safe_dump({**raw, "profile": "tiny"}, sort_keys=False))
    before = resolve(yaml.safe_load(params_path.read_text()))
    assert set(before.transfer.sources) == {"gemma", "qwen"}  # the tiny profile's own sources
    _student_moved(CLAIMS["alm-transfer-bytes"], before, params_path)
    after = resolve(yaml.safe_load(params_path.read_text()))
    assert after.profile == "tiny" and after.transfer.tokenizer == "byte"
    assert after.transfer.sources == {MOVED: before.models.student} and after.ensemble.members == [MOVED]
    assert resolve(yaml.safe_load(params_path.read_text()), "default").transfer.sources == after.transfer.sources, \
        "pinned at the top level too"
    assert "ensemble" not in yaml.safe_load(params_path.read_text())["profiles"]["tiny"], \
        "a key the profile does not set stays out of it (dvc.yaml tracks the profile's keys as they are)"


@pytest.mark.parametrize("name", [name for name, claim in CLAIMS.items() if claim.arms])
def test_a_long_budget_scores_its_curve_at_most_ten_times_and_the_committed_budgets_keep_their_interval(name):
    """Each curve point is a held-out scoring pass, so a long budget widens the interval (the same for every arm);
    the budgets the committed pages ran (40 distill steps, 32 transfer steps) keep params.yaml's own, unset, so DVC's
    run cache still restores their arms."""
    from tokenbridge.flows.claim import MAX_CURVE_POINTS, budget_overrides, curve_every

    claim, params = CLAIMS[name], resolve(yaml.safe_load((ROOT / "params.yaml").read_text()), "default")
    stage = params.distill if claim.reads == "distill" else params.transfer
    committed = 40 if claim.reads == "distill" else 32
    assert budget_overrides(claim, committed, params) == (f"{claim.reads}.steps={committed}",)
    assert budget_overrides(claim, 622, params)[1] == f"{claim.reads}.heldout_every={curve_every(claim, 622, params)}"
    for steps in (committed, 136, 622, 5000):
        total = steps + (params.transfer.embedding_steps if claim.reads == "transfer" else 0)
        every = curve_every(claim, steps, params)
        points = sum(is_curve_step(step, total, every) for step in range(1, total + 1))
        assert points <= MAX_CURVE_POINTS + 1 and every >= stage.heldout_every
    assert curve_every(claim, 136, params.model_copy(update={claim.reads: stage.model_copy(
        update={"heldout_every": 0})})) == 0, "no curve stays no curve"


CLAIM = Claim("demo", "a paper", "A beats B and C.", claimed="a", rivals=("b", "c"), metric="bits_per_byte",
              why_metric="bits-per-byte.", arms={"a": ("distill.loss=alm",), "b": ("distill.loss=uld",),
                                                 "c": ("distill.loss=mined",)})


def _scores(value: float, half: float, name: str = "bits_per_byte") -> dict:
    return {name: value, f"{name}_low": value - half, f"{name}_high": value + half}


@pytest.mark.parametrize(("b", "c", "expected"), [
    (_scores(0.60, 0.01), _scores(0.70, 0.01), "reproduced"),  # lower is better: a wins, outside the noise
    (_scores(0.60, 0.01), _scores(0.45, 0.01), "not reproduced"),  # c is better, outside the noise
    (_scores(0.51, 0.05), _scores(0.70, 0.01), "inside the noise"),  # a wins c but cannot be told from b
])
def test_the_verdict_needs_every_rival_beaten_outside_the_noise(b, c, expected):
    decision, sentences = verdict(CLAIM, {"a": _scores(0.5, 0.02), "b": b, "c": c})
    assert decision == expected and len(sentences) == 2


def test_a_rival_inside_the_noise_gets_the_budget_at_which_a_proportionally_growing_gap_would_leave_it():
    from tokenbridge.reporting.claims import _separating_budgets

    # a is 0.02 below b after 40 steps; b's interval reaches 0.05 above and below: at 0.02 per 40 steps the gap
    # passes 0.05 at 100 steps. c is outside the noise already, so it gets no estimate.
    results = {"a": _scores(0.50, 0.03), "b": _scores(0.52, 0.05), "c": _scores(0.70, 0.01)}
    assert "b at about 100 steps (a ahead)" in _separating_budgets(CLAIM, results, 40)
    assert "c at about" not in _separating_budgets(CLAIM, results, 40)
    behind = {**results, "b": _scores(0.48, 0.05)}
    assert "b at about 100 steps (a behind)" in _separating_budgets(CLAIM, behind, 40)
    assert _separating_budgets(CLAIM, {**results, "b": _scores(0.60, 0.01)}, 40) == "", "nothing inside the noise"


def _with_curve(scores: dict, curve: list[float], half: float = 0.01) -> dict:
    """An arm whose one run held out `curve` at steps 2, 4, 6, ... (its in-run learning curve)."""
    steps = [2 * (index + 1) for index in range(len(curve))]
    heldout = {"step": steps, **{f"bits_per_byte{end}": [value + sign * half for value in curve]
                                 for end, sign in (("", 0), ("_low", -1), ("_high", 1))}}
    return {**scores, "runs": {1: {"history": {"step": steps, "loss": [1.0] * len(steps), "heldout": heldout}}}}


def test_a_rival_ahead_outside_the_noise_gets_the_budget_at_which_its_shrinking_lead_would_close():
    from tokenbridge.reporting.claims import _closing_budgets, _heldout_curves

    # Over the second half of the runs (steps 4-8) b's lead over a falls 0.05 per step, from 0.3 to 0.1: at that
    # rate it is gone at step 10. c's lead grows there; d is behind a and needs no estimate.
    claim = Claim("demo", "a paper", "A beats B, C and D.", claimed="a", rivals=("b", "c", "d"),
                  metric="bits_per_byte", why_metric="bits-per-byte.")
    results = {"a": _with_curve(_scores(0.6, 0.01), [0.9, 0.8, 0.7, 0.6]),
               "b": _with_curve(_scores(0.5, 0.01), [0.5, 0.5, 0.5, 0.5]),
               "c": _with_curve(_scores(0.3, 0.01), [0.8, 0.6, 0.45, 0.3]),
               "d": _with_curve(_scores(0.9, 0.01), [0.9, 0.9, 0.9, 0.9])}
    assert verdict(claim, results)[0] == "not reproduced"
    estimate = _closing_budgets(claim, results, _heldout_curves(claim, results, None))
    assert "b's lead went from 0.3000 to 0.1000 over steps 4-8 (-0.5000 per 10 steps): at that rate it would close " \
           "at about 10 steps" in estimate
    assert "c's lead went from 0.2000 to 0.3000 over steps 4-8 (0.2500 per 10 steps): it did not shrink" in estimate
    assert "d's" not in estimate
    without_curves = {arm: {key: value for key, value in scores.items() if key != "runs"}
                      for arm, scores in results.items()}
    assert _closing_budgets(claim, without_curves, {}) == (
        " b, c lead outside the noise, but this sweep's runs held out no learning curve to extrapolate from: rerun the "
        "claim (its stage's heldout_every) for an estimate of the budget that would close the lead.")


def _scored(per_example: list[float], n_bytes: int = 100) -> dict:
    """An arm's bits-per-byte from its answers' bits (each answer `n_bytes` long), its interval as wide as the
    answers' spread, and the per-example parts a paired comparison reads."""
    value = sum(per_example) / (n_bytes * len(per_example))
    half = (max(per_example) - min(per_example)) / n_bytes / 2
    return {**_scores(value, half), "per_example": {"bits_per_byte": [[bits, n_bytes] for bits in per_example]}}


def test_arms_scored_on_the_same_answers_are_told_apart_by_their_paired_difference():
    # The answers' difficulty varies far more than the arms differ (each interval holds the other's value), but a is
    # 2 bits lower on every single answer: the paired difference leaves no doubt.
    hard_and_easy = [40.0 + 4 * index for index in range(16)]
    results = {"a": _scored([bits - 2 for bits in hard_and_easy]), "b": _scored(hard_and_easy),
               "c": _scored([bits + 30 for bits in hard_and_easy])}
    unpaired = {arm: {key: value for key, value in scores.items() if key != "per_example"}
                for arm, scores in results.items()}
    assert verdict(CLAIM, unpaired)[0] == "inside the noise"
    decision, sentences = verdict(CLAIM, results)
    assert decision == "reproduced" and "paired difference -0.0200 [-0.0200, -0.0200]" in sentences[0]


def test_a_paired_comparison_needs_the_same_answers_and_holds_zero_when_the_arms_only_trade_places():
    from tokenbridge.reporting.claims import paired_difference

    first = _scored([10.0, 50.0, 30.0, 20.0])
    assert paired_difference("bits_per_byte", first, _scored([10.0, 50.0, 30.0, 20.0], n_bytes=101)) is None, \
        "other bytes: other answers"
    low, high = paired_difference("bits_per_byte", first, _scored([12.0, 48.0, 32.0, 18.0]))
    assert low < 0 < high


def test_a_claims_page_states_its_verdict_and_the_index_lists_every_claim(tmp_path):
    run = {"history": {"step": [1, 2, 3, 4], "loss": [3.0, 2.0, 1.5, 1.4]}}
    results = {arm: {**_scores(value, 0.01), "final_loss": 1.4, "runs": {1: run}}
               for arm, value in (("a", 0.5), ("b", 0.6), ("c", 0.7))}
    decision = render_claim(CLAIM, {4: results, 2: results}, {"teacher": _scores(0.4, 0.01)}, {"machine": "x"},
                            tmp_path)
    page = (tmp_path / "claims" / "demo.md").read_text()
    assert decision == "reproduced" and "Verdict at this budget: reproduced" in page
    assert (tmp_path / "claims" / "plots" / "claim-demo-budget.png").stat().st_size > 0  # two budgets: a learning curve
    index = render_index(tmp_path).read_text()
    assert all(f"| {name} |" in index for name in CLAIMS)
    assert "not run yet" in index  # the claims without a page


def test_an_arm_whose_history_holds_held_out_points_gets_the_in_run_learning_curve_from_the_untrained_model(
        tmp_path):
    from tokenbridge.experiments import loss_curve
    from tokenbridge.reporting.claims import _heldout_curves

    history = tmp_path / "history.csv"
    scores = [f"{HELDOUT}bits_per_byte", f"{HELDOUT}teacher_answers_bits_per_byte"]
    history.write_text(history_csv(
        [{"step": 1, "loss": 3.0},
         {"step": 2, "loss": 2.0, **_scores(0.8, 0.05, scores[0]), **_scores(0.9, 0.05, scores[1])},
         {"step": 3, "loss": 1.5},
         {"step": 4, "loss": 1.4, **_scores(0.7, 0.05, scores[0]), **_scores(0.6, 0.05, scores[1])}],
        ("step", "loss", *(f"{score}{end}" for score in scores for end in ("", "_low", "_high")))))
    run = {"history": loss_curve(history)}
    assert run["history"]["heldout"]["step"] == [2, 4] and run["history"]["loss"] == [3.0, 2.0, 1.5, 1.4]
    assert run["history"]["heldout"]["teacher_answers_bits_per_byte"] == [0.9, 0.6], "each score under its own name"
    results = {arm: {**_scores(value, 0.01), "runs": {1: run}} for arm, value in (("a", 0.5), ("b", 0.6), ("c", 0.7))}
    start = _scores(0.9, 0.05)
    curves = _heldout_curves(CLAIM, results, start)
    assert curves["a"][0] == start and curves["a"][4] == _scores(0.7, 0.05), "step 0 is the untrained model"
    render_claim(CLAIM, {4: results}, {"start": start}, {"machine": "x"}, tmp_path)
    assert (tmp_path / "claims" / "plots" / "claim-demo-heldout.png").stat().st_size > 0
    assert "learning curve inside each arm's run" in (tmp_path / "claims" / "demo.md").read_text()


def test_a_claims_page_is_written_again_from_its_stored_record_with_the_same_verdict(tmp_path, monkeypatch):
    from tokenbridge.flows.claim import _render_again
    from tokenbridge.io import write_json

    monkeypatch.chdir(tmp_path)
    results = {"a": _scores(0.5, 0.01), "b": _scores(0.6, 0.01), "c": _scores(0.45, 0.01)}
    with pytest.raises(SystemExit, match="run `tokenbridge claim --name demo` first"):
        _render_again(CLAIM, tmp_path)
    write_json(tmp_path / "claims" / "demo.json", {  # as the sweep stored it: JSON keys are strings
        "claim": "demo", "verdict": "inside the noise", "budget": "4 steps, 1 seed", "budgets": {"4": results},
        "references": {}, "context": {"machine": "x", "git_commit": "abc"}})
    record = _render_again(CLAIM, tmp_path)
    assert record["verdict"] == "not reproduced", "the verdict of the page's code now"
    assert record["context"]["git_commit"] == "abc" and "page rendered at" in record["context"]
    assert "Verdict at this budget: not reproduced" in (tmp_path / "claims" / "demo.md").read_text()
    assert (tmp_path / "claims.md").is_file()


def test_the_distillation_sweep_also_answers_the_multilevel_ot_claim_and_nothing_unlike_it():
    from tokenbridge.flows.claim import _within

    sweep = CLAIMS["alm-distillation"]
    assert [name for name, claim in CLAIMS.items() if claim is not sweep and _within(claim, sweep)] == ["multilevel-ot"]


def test_an_arms_override_is_set_where_the_active_profile_reads_it(tmp_path):
    from tokenbridge.experiments import aimed_at_the_profile

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({**raw, "profile": "tiny"}))
    assert raw["profiles"]["tiny"]["transfer"]["steps"] != raw["transfer"]["steps"]  # the profile's value wins
    assert aimed_at_the_profile("transfer.steps=5", params_path) == "profiles.tiny.transfer.steps=5"
    assert aimed_at_the_profile("transfer.loss=uld", params_path) == "transfer.loss=uld"  # the profile leaves it
    params_path.write_text(yaml.safe_dump({**raw, "profile": "default"}))
    assert aimed_at_the_profile("transfer.steps=5", params_path) == "transfer.steps=5"


def test_a_metric_the_claim_is_also_judged_on_gets_its_own_verdict_on_the_page_without_deciding(tmp_path):
    from dataclasses import replace

    claim = replace(CLAIM, metric="original_answers_bits_per_byte", also_judged=("bits_per_byte",))
    # a wins on the deciding metric and loses to b on the other one, each outside the noise
    results = {arm: {**_scores(deciding, 0.01, claim.metric), **_scores(other, 0.01)}
               for arm, deciding, other in (("a", 0.5, 0.6), ("b", 0.6, 0.5), ("c", 0.7, 0.7))}
    assert render_claim(claim, {4: results}, {}, {"machine": "x"}, tmp_path) == "reproduced"
    page = (tmp_path / "claims" / "demo.md").read_text()
    assert "Verdict at this budget: reproduced" in page
    assert "Judged on bits_per_byte too (not deciding): not reproduced. a 0.6000 against b 0.5000: worse" in page


def test_a_distillation_page_says_the_sweep_does_not_test_the_claim_when_the_teacher_is_not_ahead_of_the_student(
        tmp_path):
    results = {arm: _scores(value, 0.01) for arm, value in (("a", 0.5), ("b", 0.6), ("c", 0.7))}
    behind = {"teacher": _scores(0.80, 0.01), "student_before": _scores(0.69, 0.01)}
    assert render_claim(CLAIM, {4: results}, behind, {"machine": "x"}, tmp_path) == "reproduced"
    page = (tmp_path / "claims" / "demo.md").read_text()
    assert ("The teacher (0.8000) is behind the untrained student (0.6900) on bits_per_byte (intervals compared): "
            "the claim presumes a teacher ahead of its student, so this sweep does not test it") in page
    inside = {**behind, "teacher": _scores(0.68, 0.05)}
    render_claim(CLAIM, {4: results}, inside, {"machine": "x"}, tmp_path)
    page = (tmp_path / "claims" / "demo.md").read_text()
    assert "The teacher (0.6800) is inside the noise of the untrained student" in page
    ahead = {**behind, "teacher": _scores(0.40, 0.01)}
    render_claim(CLAIM, {4: results}, ahead, {"machine": "x"}, tmp_path)
    assert "presumes a teacher ahead" not in (tmp_path / "claims" / "demo.md").read_text()
    claim = CLAIMS["pretraining-distillation"]  # the index lists the registered claims
    for references, caveat in ((behind, True), (ahead, False)):
        write_json(tmp_path / "claims" / f"{claim.name}.json", {"verdict": "not reproduced", "budget": "40 steps",
                                                                 "references": references})
        row = next(line for line in render_index(tmp_path).read_text().splitlines() if f"| {claim.name} |" in line)
        assert ("not reproduced (40 steps); its teacher is not ahead of the student, so the sweep does not test the "
                "claim" in row) == caveat
