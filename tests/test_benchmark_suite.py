"""The `evaluate.tasks` suite: generated arithmetic choices, a user's task folder, one table across tasks."""

from __future__ import annotations

import json

import pytest
import yaml

from tokenbridge.config import EvaluateParams
from tokenbridge.evaluation.arithmetic import CHOICES, arithmetic_questions
from tokenbridge.evaluation.harness import Task, generates
from tokenbridge.io import read_jsonl
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import run_evaluate
from tokenbridge.stages.prepare import run_prepare


@pytest.fixture(scope="module")
def prepared(tiny_params, tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    run_prepare(tiny_dirs, out, tiny_params.prepare)
    return out


def test_each_arithmetic_question_has_four_distinct_choices_and_its_label_names_the_true_value():
    records = arithmetic_questions(300, seed=3)
    for record in records:
        expression = record["question"].removeprefix("What is ").split("?")[0]
        assert len(set(record["choices"])) == CHOICES
        assert int(record["choices"][record["label"]]) == eval(expression)  # noqa: S307  digits and + - * only
    assert {record["label"] for record in records} == set(range(CHOICES))  # the answer is not always in one place
    assert {record["question"][8] for record in records} > {"1"}
    assert arithmetic_questions(300, seed=3) == records


def _user_task(folder, name: str, questions: list[dict]):
    """A log-likelihood task of the user's own: its YAML and data in `folder`."""
    folder.mkdir(parents=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in questions))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))
    return folder


def test_the_suite_scores_generated_and_user_tasks_each_on_its_own_document_count(tiny_params, tiny_dirs, prepared,
                                                                                    tmp_path):
    """GSM generates (`limit` questions), arithmetic and the user's choice task score by likelihood
    (`choice_limit`); each task's score is the mean of its per-document verdicts."""
    folder = _user_task(tmp_path / "my_tasks", "colours", [
        {"question": f"Which colour is {thing}?", "choices": ["red", "green", "blue"], "label": label}
        for thing, label in (("a tomato", 0), ("grass", 1), ("the sky", 2), ("a cherry", 0))])
    params = tiny_params.evaluate.model_copy(update={"tasks": ["gsm", "arithmetic", str(folder)], "limit": 2,
                                                     "choice_limit": 3, "num_fewshot": 0})
    scores = run_evaluate(prepared, tiny_dirs["student"], tmp_path / "eval", tmp_path / "metrics.json", params,
                          Runtime.resolve(tiny_params.runtime))
    assert list(scores.tasks) == ["gsm", "arithmetic", "colours"]
    assert [score.n for score in scores.tasks.values()] == [2, 3, 3]
    assert scores.tasks["gsm"].values["exact_match,strict-match"] == scores.gsm_exact_match
    for task in ("arithmetic", "colours"):
        samples = read_jsonl(tmp_path / "eval" / f"samples.{task}.jsonl")
        assert len(samples) == 3 and all(len(sample["response"]) == len(sample["doc"]["choices"]) for sample in samples)
        assert scores.tasks[task].values["acc"] == pytest.approx(sum(sample["acc"] for sample in samples) / 3)
        assert scores.tasks[task].headline()["value_stderr"] == scores.tasks[task].values["acc_stderr"]
    assert {"arithmetic.acc", "colours.acc_stderr", "gsm.exact_match/strict-match"} <= set(scores.numbers())


def test_a_task_path_that_is_no_folder_of_task_yaml_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match="folder of lm-eval task YAML"):
        EvaluateParams(tasks=["gsm", str(tmp_path / "missing")], limit=1, num_fewshot=0, max_gen_toks=8,
                       bpb_examples=1)
    with pytest.raises(ValueError, match="once"):
        EvaluateParams(tasks=["gsm", "gsm"], limit=1, num_fewshot=0, max_gen_toks=8, bpb_examples=1)


def test_a_task_lm_eval_does_not_know_fails_naming_the_choices(tmp_path):
    """The evaluate stage loads every task this way before any work (a stock name makes lm-eval index its ~10k task
    files, 20 s, so the test asks a folder)."""
    folder = _user_task(tmp_path / "my_tasks", "colours", [{"question": "Sky?", "choices": ["blue"], "label": 0}])
    with pytest.raises(ValueError, match="'nope' is no lm-eval task or group: give gsm, arithmetic"):
        generates(Task("nope", "nope", folder))
