"""DVC experiments from the session's tiny pipeline run (tests/conftest.py: tiny_pipeline), on a copy of it: the
loss comparison and the claims' sweeps (`tokenbridge compare`, `tokenbridge claim`). A file of its own, so that a
second parallel worker runs them while the first goes on changing the run itself (test_pipeline_integration.py)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from project_commands import run, stages_run

from tokenbridge.reporting import claims

pytestmark = [pytest.mark.integration, pytest.mark.from_tiny_pipeline]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_pipeline):
    """A copy of the pipeline run as it left it, which these tests go on using, one after another."""
    return tiny_pipeline.copy(tmp_path_factory.mktemp("experiments"))


def test_the_ensemble_claim_reads_the_pipeline_run_and_pairs_its_members_on_the_same_answers(repo):
    """alm-ensemble reads evaluate_transfer's scores as the pipeline left them, each label with its per-example
    parts (the student's from the evaluate stage), so its verdicts are paired differences."""
    path, env = repo
    output = run([sys.executable, "-m", "tokenbridge", "claim", "--name", "alm-ensemble", "--out", "ensemble-claim"],
                  path, env)
    assert stages_run(output) == set(), output
    record = json.loads((path / "ensemble-claim/claims/alm-ensemble.json").read_text())
    arms = record["budgets"]["0"]
    assert set(arms) == {"ensemble", "student", "gemma.transferred", "qwen.transferred"}
    assert all(arm["per_example"]["bits_per_byte"] for arm in arms.values())
    page = (path / "ensemble-claim/claims/alm-ensemble.md").read_text()
    assert page.count("(paired difference") == 3, page


def test_compare_runs_one_dvc_experiment_per_loss_and_tabulates_them_side_by_side(repo):
    path, env = repo
    params_before = (path / "params.yaml").read_text()
    output = run([sys.executable, "-m", "tokenbridge", "compare", "--losses", "sft", "alm", "--out", "results"],
                  path, env)
    # Upstream stages are shared: each experiment reruns only distill, the distilled student's evaluation, report.
    assert stages_run(output) <= {"distill", "evaluate@student_after", "report"}, output
    assert (path / "params.yaml").read_text() == params_before
    result = json.loads((path / "results/loss-comparison-tiny.json").read_text())
    assert list(result["methods"]) == ["sft", "alm"]  # the order asked for (online-only methods last)
    for method in result["methods"].values():
        assert method["bits_per_byte"] > 0 and 0 <= method["gsm_exact_match"] <= 1 and method["steps"] == 4
    assert result["methods"]["alm"]["loss"] == "alm" and result["methods"]["sft"]["loss"] == "sft"
    assert result["methods"]["alm"]["bits_per_byte"] != result["methods"]["sft"]["bits_per_byte"]
    table = (path / "results/loss-comparison-tiny.md").read_text()
    assert all(f"| {name} |" in table for name in ("teacher", "student_before", "alm", "sft"))
    assert (path / "results/plots/loss-comparison-tiny.png").stat().st_size > 0
    experiments = run(["dvc", "exp", "list", "--name-only"], path, env).split()
    assert sum(name.startswith("cmp-") for name in experiments) == 2


ONE_ARM = """
import dataclasses, sys
from tokenbridge.flows.claim import main
from tokenbridge.reporting import claims
claim = claims.CLAIMS["alm-transfer-bytes"]
claims.CLAIMS[claim.name] = dataclasses.replace(claim, rivals=(), arms={"alm": claim.arms["alm"]})
main(sys.argv[1:])
"""


def test_a_transfer_claim_moves_the_student_once_per_arm_and_restores_params(repo):
    """alm-transfer-bytes with its alm arm alone (every arm runs the same path; CI's time allows one): the student
    becomes the transfer stage's one source, moved onto bytes, and the arm is an experiment up to evaluate_transfer,
    which a budget set where the tiny profile reads it (profiles.tiny.transfer.steps) changes."""
    path, env = repo
    params_before = (path / "params.yaml").read_text()
    output = run([sys.executable, "-c", ONE_ARM, "--name", "alm-transfer-bytes", "--steps", "1", "--out", "results"],
                  path, env)
    assert {"transfer", "evaluate_transfer"} <= stages_run(output), output
    assert not stages_run(output) & {"distill", "teacher_logits", "hypernet"}, output
    assert (path / "params.yaml").read_text() == params_before
    record = json.loads((path / "results/claims/alm-transfer-bytes.json").read_text())
    arm = record["budgets"]["1"]["alm"]
    assert {"original", "start"} == set(record["references"])
    assert record["context"]["pinned for every arm"] == {"transfer.max_length": 1536}, "long enough for byte texts"
    assert arm["bits_per_byte"] != record["references"]["start"]["bits_per_byte"], "the moved model trained"
    deciding = claims.CLAIMS["alm-transfer-bytes"].metric
    assert all(deciding in scores for scores in (arm, *record["references"].values())), \
        "every variant of the source is scored on the original's own answers, the claim's deciding metric"
    assert len(arm["per_example"][deciding]) > 0, "per answer, for paired verdicts"
    assert arm["runs"]["1234"]["history"]["heldout"][deciding][-1] == pytest.approx(arm[deciding], rel=1e-4), \
        "the in-run curve ends at the evaluation's number"
    embedding_steps = yaml.safe_load(params_before)["profiles"]["tiny"]["transfer"]["embedding_steps"]
    assert arm["steps"] == embedding_steps + 1 == len(arm["runs"]["1234"]["history"]["loss"])
    assert record["budget"] == f"{embedding_steps} embedding + 1 steps, 1 seed"
    experiments = run(["dvc", "exp", "list", "--name-only"], path, env).split()
    assert sum(name.startswith("claim-alm-transfer-bytes-alm-") for name in experiments) == 1
    assert f"Verdict at this budget: {record['verdict']}" in (path / "results/claims/alm-transfer-bytes.md").read_text()
    assert "[claims/alm-transfer-bytes.md](claims/alm-transfer-bytes.md)" in (path / "results/claims.md").read_text()
