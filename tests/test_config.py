"""params.yaml validation: bad input stops the run before any work, naming the key's path and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenbridge.config import ParamsError
from tokenbridge.losses.registry import LOSSES
from tokenbridge.params import load_params

ROOT = Path(__file__).parents[1]


def _write(tmp_path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_shipped_params_are_valid_for_every_profile():
    assert load_params(ROOT / "params.yaml").profile == "default"
    tiny = load_params(ROOT / "params.yaml", profile="tiny")
    assert tiny.models.teacher.source == "tiny" and tiny.distill.steps < load_params(ROOT / "params.yaml").distill.steps


def test_an_unknown_key_is_named_with_its_path(tmp_path):
    path = _write(tmp_path, lambda raw: raw["distill"]["alm"].update(binarisation_temp=5))
    with pytest.raises(ParamsError, match=r"distill\.alm\.binarisation_temp: unknown key"):
        load_params(path)


def test_a_bad_value_names_the_key_and_what_is_allowed(tmp_path):
    path = _write(tmp_path, lambda raw: raw["distill"].update(teacher_mode="sometimes"))
    with pytest.raises(ParamsError, match=r"distill\.teacher_mode: .*'offline' or 'online'.*sometimes"):
        load_params(path)


def test_a_bad_value_inside_a_profile_is_caught_even_when_another_profile_is_selected(tmp_path):
    path = _write(tmp_path, lambda raw: raw["profiles"]["tiny"]["distill"].update(steps=0))
    with pytest.raises(ParamsError, match=r"profiles\.tiny\.distill\.steps: .*greater than or equal to 1"):
        load_params(path)


def test_an_unknown_profile_lists_the_known_ones(tmp_path):
    path = _write(tmp_path, lambda raw: raw.update(profile="huge"))
    with pytest.raises(ParamsError, match="unknown profile 'huge'; allowed: default, gpu, tiny"):
        load_params(path)


def test_jsonl_source_requires_both_files(tmp_path):
    path = _write(tmp_path, lambda raw: raw["prepare"].update(source="jsonl", train_jsonl="train.jsonl"))
    with pytest.raises(ParamsError, match="needs both train_jsonl and test_jsonl"):
        load_params(path)


def test_a_stage_command_refuses_bad_params_before_any_work(tmp_path):
    path = _write(tmp_path, lambda raw: raw["evaluate"].update(limit=-1))
    result = subprocess.run([sys.executable, "-m", "tokenbridge", "distill", "--params", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "evaluate.limit" in result.stderr and "greater than or equal to 1" in result.stderr
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(loss=["alm", "sft"]), r"'sft' is the next-token term that alpha mixes in"),
    (lambda d: d.update(loss="dskd", teacher_mode="offline"), r"'dskd' needs the live teacher.*teacher_mode: online"),
    (lambda d: d.update(loss="reverse_kl", teacher_mode="online", teacher={"top_k": 50}),
     r"reverse_kl is infinite where a truncated teacher has zero probability"),
    (lambda d: d.update(loss="jsd", jsd={"beta": 1.0}), r"jsd is infinite where a truncated teacher"),
    (lambda d: d.update(loss=["alm", "uld"], loss_weights={"mined": 2.0}), r"loss_weights: \['mined'\] not in loss"),
    (lambda d: d.update(alpha=1.5), r"distill\.alpha: .*less than or equal to 1"),
    (lambda d: d.update(alpha_schedule="cosine"), r"distill\.alpha_schedule: .*'wsd'"),
    (lambda d: d["uld"].update(topk=5), r"distill\.uld\.topk: unknown key"),
])
def test_loss_choices_that_cannot_work_are_refused_at_load_with_the_fix(tmp_path, edit, message):
    path = _write(tmp_path, lambda raw: edit(raw["distill"]))
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_an_unknown_loss_is_refused_naming_every_registered_one(tmp_path):
    path = _write(tmp_path, lambda raw: raw["distill"].update(loss="kl"))
    with pytest.raises(ParamsError, match=r"distill: .*unknown loss \['kl'\]; allowed: ") as refused:
        load_params(path)
    assert f"allowed: {', '.join(LOSSES)};" in str(refused.value)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_can_be_named_in_params(tmp_path, name):
    """The shipped teacher is untruncated, so with it live every loss's needs are met."""
    path = _write(tmp_path, lambda raw: raw["distill"].update(loss=name, teacher_mode="online"))
    assert load_params(path).distill.losses == [name]


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["transfer"].update(init="hypernet"),
     r"transfer.init hypernet: the hypernetwork serves models.student only.*\['gemma', 'qwen'\].*use init: fvt"),
    (lambda raw: raw["hypernet"].update(loss=["alm", "kl"]), r"hypernet\.loss\.1: .*'alm' or 'sft'"),
    (lambda raw: raw["hypernet"].update(pool_kinds=["wordpiece"]), r"hypernet\.pool_kinds\.0: .*'bpe' or 'unigram'"),
    (lambda raw: raw["evaluate_hypernet"].update(tokenizers={"qwen-2": "teacher"}),
     r"evaluate_hypernet\.tokenizers: .*plain identifiers"),
])
def test_hypernetwork_settings_that_cannot_work_are_refused_at_load_with_the_fix(tmp_path, edit, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_write(tmp_path, edit))


def test_transfer_from_the_hypernetwork_is_accepted_for_its_own_base_model(tmp_path):
    def edit(raw):  # every source (in every profile) is the student, moved onto the teacher's tokenizer
        raw["transfer"].update(init="hypernet", tokenizer="teacher")
        for section in (raw, raw["profiles"]["tiny"], raw["profiles"]["gpu"]):
            student = section.get("models", raw["models"])["student"]
            section.setdefault("transfer", {})["sources"] = {"gemma": student, "qwen": student}

    assert load_params(_write(tmp_path, edit)).transfer.init == "hypernet"
