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
    train = tmp_path / "train.jsonl"
    train.touch()
    path = _write(tmp_path, lambda raw: raw["prepare"].update(source="jsonl", train_jsonl=str(train)))
    with pytest.raises(ParamsError, match="needs both train_jsonl and test_jsonl"):
        load_params(path)


def test_jsonl_files_that_do_not_exist_are_refused_naming_each(tmp_path):
    (tmp_path / "train.jsonl").touch()
    path = _write(tmp_path, lambda raw: raw["prepare"].update(
        source="jsonl", train_jsonl=str(tmp_path / "train.jsonl"), test_jsonl="data/nowhere.jsonl"))
    with pytest.raises(ParamsError, match=r"prepare\.test_jsonl: 'data/nowhere\.jsonl' is not a file \(paths are "
                                          r"relative to the project root\): fix the path") as refused:
        load_params(path)
    assert "train_jsonl" not in str(refused.value)


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
    with pytest.raises(ParamsError, match=r"distill\.loss: unknown loss \['kl'\]; allowed: ") as refused:
        load_params(path)
    assert str(refused.value).endswith(f"allowed: {', '.join(LOSSES)}")


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


def _write_text(tmp_path, replace: str, by: str | bytes) -> Path:
    """params.yaml with its first `replace` swapped for `by`, as text, for what a YAML round trip cannot write."""
    shipped = (ROOT / "params.yaml").read_bytes()
    assert replace.encode() in shipped
    path = tmp_path / "params.yaml"
    path.write_bytes(shipped.replace(replace.encode(), by if isinstance(by, bytes) else by.encode(), 1))
    return path


@pytest.mark.parametrize("edit, key", [
    (lambda raw: raw["distill"].update(steps=True), r"distill\.steps"),
    (lambda raw: raw["distill"].update(learning_rate=True), r"distill\.learning_rate"),
    (lambda raw: raw["runtime"].update(micro_batch_size=True), r"runtime\.micro_batch_size"),
    (lambda raw: raw["ensemble"].update(weights=[1.0, True, 1.0]), r"ensemble\.weights"),
    (lambda raw: raw["distill"].update(loss=["alm", "uld"], loss_weights={"uld": False}), r"distill\.loss_weights"),
    (lambda raw: raw["profiles"]["tiny"]["models"]["student"].update(num_layers=True),
     r"profiles\.tiny\.models\.student\.tiny\.num_layers"),
])
def test_a_yaml_bool_is_refused_for_a_number(tmp_path, edit, key):
    with pytest.raises(ParamsError, match=rf"{key}: true/false is not a number \(YAML would read it as 1 or 0\): write "
                                          r"the number"):
        load_params(_write(tmp_path, edit))


def test_a_number_pyyaml_reads_as_a_string_is_still_a_number(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; pydantic's lax mode makes it the float it means."""
    path = _write_text(tmp_path, "learning_rate: 2.0e-5", "learning_rate: 1e-4")
    assert yaml.safe_load(path.read_text())["distill"]["learning_rate"] == "1e-4"
    assert load_params(path).distill.learning_rate == 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["distill"].update(learning_rate=float("inf")), r"distill\.learning_rate: .*finite number"),
    (lambda raw: raw["distill"]["alm"].update(binarization_temp=float("inf")),
     r"distill\.alm\.binarization_temp: .*finite number; got inf"),
    (lambda raw: raw["ensemble"].update(weights=[1.0, float("nan"), 1.0]), r"ensemble\.weights\.1: .*finite number"),
    (lambda raw: raw["distill"]["on_policy"].update(fraction=float("nan")),
     r"distill\.on_policy\.fraction: .*finite number; got nan"),
    (lambda raw: raw["profiles"]["tiny"]["transfer"].update(learning_rate=float("-inf")),
     r"profiles\.tiny\.transfer\.learning_rate: .*finite number; got -inf"),
])
def test_infinity_and_nan_are_refused_for_every_float(tmp_path, edit, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_write(tmp_path, edit))


@pytest.mark.parametrize("weight", [-1.0, 0.0])
def test_a_loss_weight_must_be_positive_and_leaving_a_loss_out_means_removing_it(tmp_path, weight):
    """The engine skips terms weighted 0 or less, so `{alm: -1}` would have dropped ALM without a word."""
    path = _write(tmp_path, lambda raw: raw["distill"].update(loss=["alm", "uld"], loss_weights={"alm": weight}))
    with pytest.raises(ParamsError, match=rf"distill\.loss_weights: \{{'alm': {weight}\}}: a weight must be > 0; to "
                                          r"leave a loss out, remove it from loss instead"):
        load_params(path)


@pytest.mark.parametrize("threshold, bound", [(-0.1, "greater than or equal to 0"), (1.5, "less than or equal to 1")])
def test_the_alm_boundary_threshold_is_a_probability(tmp_path, threshold, bound):
    path = _write(tmp_path, lambda raw: raw["distill"]["alm"].update(boundary_threshold=threshold))
    with pytest.raises(ParamsError, match=rf"distill\.alm\.boundary_threshold: .*{bound}"):
        load_params(path)


@pytest.mark.parametrize("section, fix", [("distill", r"list each loss once \(loss_weights sets how much one counts\)"),
                                          ("hypernet", "list each loss once")])
def test_a_loss_listed_twice_is_refused(tmp_path, section, fix):
    path = _write(tmp_path, lambda raw: raw[section].update(loss=["alm", "alm"]))
    with pytest.raises(ParamsError, match=rf"{section}\.loss: \['alm'\] listed more than once: {fix}"):
        load_params(path)


def test_a_key_given_twice_in_one_mapping_is_refused_naming_it_and_its_lines(tmp_path):
    path = _write_text(tmp_path, "  steps: 40\n", "  steps: 40\n  steps: 400\n")
    line = path.read_text().splitlines().index("  steps: 400") + 1
    with pytest.raises(ParamsError, match=rf"params\.yaml:{line}:3: key 'steps' is given twice in one mapping \(first "
                                          rf"on line {line - 1}\): keep one"):
        load_params(path)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["distill"].update(warmup_steps=41), r"distill\.warmup_steps: 41 is more than steps \(40\)"),
    (lambda raw: raw["profiles"]["tiny"]["distill"].update(warmup_steps=5),
     r"profiles\.tiny\.distill\.warmup_steps: 5 is more than steps \(4\)"),
    (lambda raw: raw["profiles"]["gpu"]["transfer"].update(warmup_steps=201),  # warms up each phase
     r"profiles\.gpu\.transfer\.warmup_steps: 201 is more than embedding_steps \(200\)"),
    (lambda raw: raw["transfer"].update(embedding_steps=0, warmup_steps=9),  # an empty phase needs no warm-up
     r"transfer\.warmup_steps: 9 is more than steps \(8\)"),
    (lambda raw: raw["hypernet"].update(warmup_steps=9), r"hypernet\.warmup_steps: 9 is more than steps \(8\)"),
])
def test_a_warm_up_longer_than_the_steps_it_ramps_is_refused(tmp_path, edit, message):
    with pytest.raises(ParamsError, match=message + r": a warm-up cannot outlast the steps it ramps; set warmup_steps "
                                                    r"to at most \d+"):
        load_params(_write(tmp_path, edit))


def test_a_warm_up_as_long_as_the_steps_is_accepted(tmp_path):
    assert load_params(_write(tmp_path, lambda raw: raw["distill"].update(warmup_steps=40))).distill.warmup_steps == 40


def test_an_empty_mapping_in_a_profile_replaces_the_top_level_one_and_empty_sources_are_refused(tmp_path):
    path = _write(tmp_path, lambda raw: raw["profiles"]["tiny"]["transfer"].update(sources={}))
    with pytest.raises(ParamsError, match=r"profiles\.tiny\.transfer\.sources: is empty: give at least one name: value "
                                          r"entry \(in a profile, an empty mapping replaces the top-level one"):
        load_params(path)

    def clear_weights(raw):
        raw["distill"].update(loss=["alm", "uld"], loss_weights={"uld": 2.0})
        raw["profiles"]["tiny"]["distill"]["loss_weights"] = {}

    path = _write(tmp_path, clear_weights)
    assert load_params(path).distill.loss_weights == {"uld": 2.0}
    assert load_params(path, profile="tiny").distill.loss_weights == {}


def test_a_tokenizer_must_be_a_known_name_or_a_directory_holding_one(tmp_path):
    path = _write(tmp_path, lambda raw: raw["transfer"].update(tokenizer="tokenizers/mine"))
    with pytest.raises(ParamsError, match=r"transfer\.tokenizer: 'tokenizers/mine' is neither 'student', 'teacher', "
                                          r"'byte' nor a directory holding a tokenizer\.json \(paths are relative to "
                                          r"the project root\): fix the path, or name one of those"):
        load_params(path)
    path = _write(tmp_path, lambda raw: raw["evaluate_hypernet"]["tokenizers"].update(mine="tokenizers/mine"))
    with pytest.raises(ParamsError, match=r"evaluate_hypernet\.tokenizers\.mine: 'tokenizers/mine' is neither "
                                          r"'teacher', 'student', 'heldout' nor a directory holding a tokenizer\.json"):
        load_params(path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tokenizer.json").write_text("{}")
    path = _write(tmp_path, lambda raw: raw["transfer"].update(tokenizer=str(tmp_path / "mine")))
    assert load_params(path).transfer.tokenizer == str(tmp_path / "mine")


@pytest.mark.parametrize("key", ["experiment", "registered_model", "registered_hypernet"])
def test_an_empty_tracking_name_is_refused(tmp_path, key):
    path = _write(tmp_path, lambda raw: raw["tracking"].update({key: " "}))
    with pytest.raises(ParamsError, match=rf"tracking\.{key}: is empty: MLflow needs a name here"):
        load_params(path)


@pytest.mark.parametrize("replace, by, message", [
    ("  steps: 40\n", "  steps: 40\n   batch_size: [2\n",
     r"params\.yaml:\d+:\d+: not valid YAML \(.+\): fix it there \(indentation, a ':' after each key, closed quotes"),
    ("profiles:\n", "profiles:\n  - tiny\nunused:\n",
     r"^profiles: expected a mapping of name -> overrides, such as `tiny: \{distill: \{steps: 4\}\}`; got a list"),
    ("  tiny:\n", "  empty: null\n  tiny:\n",
     r"^profiles\.empty: expected a mapping of the sections it overrides.*got None \(remove the profile, or give its "),
    ("  tiny:\n", "  small: [distill]\n  tiny:\n", r"^profiles\.small: expected a mapping.*got \['distill'\]"),
    ("  tiny:\n", "  tiny:\n    evaluate_hypernet: {}\n",
     r"^profiles\.tiny\.evaluate_hypernet: an empty section overrides nothing: remove it, or give the keys"),
    ("profile: default\n", "profile: [tiny]\n", r"^profile: unknown profile \['tiny'\]; allowed: default, tiny, gpu"),
    ("experiment: tokenbridge", b"experiment: tokenbridge\xff",
     r"params\.yaml: not readable as YAML \(invalid start byte at position \d+\): save it as UTF-8 text"),
])
def test_a_params_file_that_is_not_a_mapping_of_sections_is_refused_naming_the_place_and_the_fix(tmp_path, replace, by,
                                                                                                  message):
    with pytest.raises(ParamsError, match=message):
        load_params(_write_text(tmp_path, replace, by))
