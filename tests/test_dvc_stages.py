"""dvc.yaml cannot drift from the code: it is generated from tokenbridge/dvc_stages.py, every stage depends on each
module its command imports, and every profile's overrides of the params a stage reads are params of that stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tokenbridge.cli import FLOWS
from tokenbridge.dvc_stages import (
    PACKAGE,
    REGENERATE,
    STAGES,
    code_deps,
    dvc_yaml,
    has_key,
    import_closure,
    missing_entries,
    pipeline,
    stage_code,
    stage_params,
)

ROOT = Path(__file__).parents[1]
NOT_STAGES = {"pipeline", "compare", "claim"}  # flows that drive other stages: the pipeline, the comparison, a claim


def _committed_stages() -> dict[str, dict]:
    """Each stage of the committed dvc.yaml by name, its `do:` body for a `foreach` stage."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}


def _missing(deps: list[str], files: set[Path]) -> list[str]:
    """The files no dep covers (a dep covers itself and, as a directory, everything under it)."""
    covered = [ROOT / dep for dep in deps]
    return sorted(str(file.relative_to(ROOT)) for file in files
                  if not any(file == dep or dep in file.parents for dep in covered))


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_the_committed_dvc_yaml_is_what_the_generator_writes():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(ROOT / "params.yaml"), (
        f"dvc.yaml is stale: run `make dvc.yaml` (or `{REGENERATE}`) and commit it")


def test_every_stage_depends_on_every_module_its_command_imports():
    stages = _committed_stages()
    missing = {name: _missing(body["deps"], stage_code(body["cmd"].split()[3])) for name, body in stages.items()}
    assert not {name: files for name, files in missing.items() if files}, f"run `{REGENERATE}`"


def test_the_check_reports_an_imported_module_that_the_deps_leave_out():
    deps = _committed_stages()["evaluate"]["deps"]
    token_bytes = PACKAGE / "token_bytes.py"
    without = [dep for dep in deps if ROOT / dep != token_bytes]
    assert len(without) == len(deps) - 1
    assert _missing(without, stage_code("evaluate")) == ["tokenbridge/token_bytes.py"]


def test_every_flow_but_the_pipeline_and_the_comparison_is_a_stage():
    assert [stage.name for stage in STAGES] == [name for name in FLOWS if name not in NOT_STAGES]


def test_the_closure_follows_imports_inside_functions_from_imports_of_modules_and_packages_on_the_way(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/entry.py": "def run():\n    from pkg.lib import helper\n",
        "pkg/lib/__init__.py": "",
        "pkg/lib/helper.py": "import pkg.base\nfrom pkg.base import name\n",
        "pkg/base.py": "name = 1\n",
        "pkg/unused.py": "",
    })
    files = import_closure(["pkg.entry"], package)
    assert sorted(str(path.relative_to(tmp_path)) for path in files) == [
        "pkg/__init__.py", "pkg/base.py", "pkg/entry.py", "pkg/lib/__init__.py", "pkg/lib/helper.py"]
    assert code_deps(files, package) == ["pkg/__init__.py", "pkg/base.py", "pkg/entry.py", "pkg/lib"]


def test_a_module_that_walks_its_folder_with_pkgutil_imports_every_module_in_it(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/entry.py": "import pkg.plugins.registry\n",
        "pkg/plugins/__init__.py": "",
        "pkg/plugins/registry.py": "import pkgutil\nfor m in pkgutil.iter_modules(['.']):\n    pass\n",
        "pkg/plugins/one.py": "",
        "pkg/plugins/two.py": "",
        "pkg/unused.py": "",
    })
    assert code_deps(import_closure(["pkg.entry"], package), package) == ["pkg/__init__.py", "pkg/entry.py",
                                                                            "pkg/plugins"]


def test_a_relative_import_is_an_error_naming_the_file(tmp_path):
    package = _write(tmp_path, {"pkg/__init__.py": "", "pkg/entry.py": "from . import other\n"})
    with pytest.raises(ValueError, match=r"entry\.py:1: relative import"):
        import_closure(["pkg.entry"], package)


def test_each_profile_that_overrides_a_key_a_stage_reads_is_a_param_of_that_stage():
    profiles = {"tiny": {"runtime": {"precision": "fp32"}, "distill": {"steps": 4}},
                "gpu": {"runtime": {"device": "cuda"}, "evaluate": {"limit": 300}}}
    assert stage_params(["distill", "runtime.device", "runtime.precision"], profiles) == [
        "profile", "distill", "runtime.device", "runtime.precision",
        "profiles.tiny.distill", "profiles.tiny.runtime.precision", "profiles.gpu.runtime.device"]


def test_the_written_yaml_says_what_the_generator_means():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert yaml.safe_load(dvc_yaml(ROOT / "params.yaml")) == pipeline(raw)


def test_data_files_params_name_are_deps_of_the_stages_that_read_them(tmp_path):
    """A GSM8K file, a local tokenizer or a folder of lm-eval tasks named in any profile: DVC must see its contents,
    or an edited file would leave the stage 'up to date'."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("train.jsonl", "test.jsonl", "tokenizer/tokenizer.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    raw["profiles"]["tiny"]["prepare"].update(source="jsonl", train_jsonl=str(tmp_path / "train.jsonl"),
                                              test_jsonl=str(tmp_path / "test.jsonl"))
    raw["profiles"]["gpu"]["transfer"]["tokenizer"] = str(tmp_path / "tokenizer")
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "mine.yaml").write_text("task: mine\n")
    raw["profiles"]["tiny"]["evaluate"]["tasks"] = ["gsm", str(tmp_path / "my_tasks")]
    stages = pipeline(raw)["stages"]
    assert {str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")} <= set(stages["prepare"]["deps"])
    assert str(tmp_path / "tokenizer") in stages["transfer"]["deps"]
    assert str(tmp_path / "my_tasks") in stages["evaluate"]["do"]["deps"]
    assert not {str(tmp_path / "train.jsonl"), str(tmp_path / "tokenizer")} & set(stages["distill"]["deps"])


def test_every_param_a_stage_names_is_in_params_yaml():
    """DVC stops at a params entry params.yaml lacks; this names the stage and the key before it does."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = [f"{name}: {key}" for name, body in _committed_stages().items() for key in body["params"]
               if not has_key(params, key)]
    assert not missing, f"params.yaml has no such key (fix the STAGES table in tokenbridge/dvc_stages.py): {missing}"


def _repo_with_every_stage_up_to_date(root: Path, monkeypatch) -> Path:
    """A DVC project of this checkout's files, with params naming a data file for each stage that reads one, and
    every stage committed as up to date over placeholder outputs (what `dvc status` compares, without running)."""
    import subprocess
    import sys

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    repo = root / "repo"
    for name in files:
        if (ROOT / name).is_file() and not name.startswith((".dvc/", "docs/", "bench/", "tests/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((ROOT / name).read_bytes())
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for name in ("data/train.jsonl", "data/test.jsonl", "data/target/tokenizer.json", "data/compared/tokenizer.json"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("{}\n")
    raw["profiles"]["tiny"]["prepare"].update(source="jsonl", train_jsonl="data/train.jsonl",
                                              test_jsonl="data/test.jsonl")
    raw["profiles"]["gpu"]["transfer"] = {**raw["profiles"]["gpu"].get("transfer", {}), "tokenizer": "data/target"}
    raw["evaluate_hypernet"]["tokenizers"]["mine"] = "data/compared"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(repo)  # params name files relative to the project root
    (repo / "dvc.yaml").write_text(dvc_yaml(repo / "params.yaml"))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    from dvc.repo import Repo

    with Repo(str(repo)) as project:
        for stage in project.index.stages:
            for item in [*stage.outs, *stage.deps]:
                path = Path(item.fs_path)
                if not path.exists():  # a placeholder: a file where the name has a suffix, else a folder
                    path.parent.mkdir(parents=True, exist_ok=True)
                    (path.write_text("{}\n") if path.suffix else (path.mkdir(), (path / "placeholder").write_text("")))
    subprocess.run([*dvc, "commit", "--force", "-q"], cwd=repo, check=True)
    return repo


def _addresses(stage) -> set[str]:
    """How DVC names the stage: `evaluate@teacher`, ... for a foreach stage."""
    return {f"{stage.name}@{key}" for key in stage.foreach} if stage.foreach else {stage.name}


def _first_leaf_changed(raw: dict, dotted: str) -> None:
    """Change the first value under the dotted key, as an edit of that param would."""
    parent, key = raw, None
    for part in dotted.split("."):
        parent, key = (parent[key] if key is not None else parent), part
    while isinstance(parent[key], dict) and parent[key]:
        parent, key = parent[key], next(iter(parent[key]))
    value = parent[key]
    parent[key] = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float))
                   else [*value, "changed"] if isinstance(value, list) else f"{value}-changed")


def test_dvc_status_names_every_stage_whose_param_data_file_or_code_changed(tmp_path, monkeypatch):
    """Every key the STAGES table says a stage reads, at the top level and in each profile that overrides it; each
    data file params name; a module a stage's command imports: changed one at a time in a real DVC project,
    `dvc status` names every stage that reads it."""
    from dvc.repo import Repo

    repo = _repo_with_every_stage_up_to_date(tmp_path, monkeypatch)
    params_text = (repo / "params.yaml").read_text()
    raw = yaml.safe_load(params_text)
    readers: dict[str, set[str]] = {}
    for stage in STAGES:
        for key in stage.params:
            for prefix in ["", *(f"profiles.{name}." for name in raw["profiles"])]:
                if has_key(raw, prefix + key):
                    readers.setdefault(prefix + key, set()).update(_addresses(stage))
    readers |= {"data/train.jsonl": {"prepare"}, "data/target": {"transfer"}, "data/compared": {"evaluate_hypernet"}}
    module = "tokenbridge/losses/alm.py"
    readers[module] = {name for stage in STAGES if PACKAGE.parent / module in stage_code(stage.name)
                       for name in _addresses(stage)}
    unseen = {}
    with Repo(str(repo)) as project:
        assert project.status() == {}, "every stage starts up to date"
        for entry, expected in readers.items():
            changed = repo / entry / "tokenizer.json" if (repo / entry).is_dir() else repo / entry
            if changed.exists():
                original = changed.read_bytes()
                changed.write_bytes(original + b"\n")
            else:
                edited = yaml.safe_load(params_text)
                _first_leaf_changed(edited, entry)
                (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
            named = set(project.status(targets=sorted(expected)))
            if expected - named:
                unseen[entry] = sorted(expected - named)
            if changed.exists():
                changed.write_bytes(original)
            else:
                (repo / "params.yaml").write_text(params_text)
    assert len(readers) > 40 and readers[module] and not unseen, f"dvc status missed: {unseen}"


def test_a_profile_override_added_after_dvc_yaml_was_generated_stops_a_stage_naming_it_and_the_fix(tmp_path, capsys):
    """DVC only sees the params entries dvc.yaml lists, so a new override would leave stages 'up to date'."""
    from tokenbridge.flows.common import check_before_work

    assert missing_entries(ROOT / "params.yaml", ROOT / "dvc.yaml") == []
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profiles"]["tiny"]["tracking"] = {"experiment": "tiny-runs"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    with pytest.raises(SystemExit) as stopped:
        check_before_work(str(tmp_path / "params.yaml"))
    error = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "report: params profiles.tiny.tracking" in error and f"`{REGENERATE}`" in error, error


def test_a_stage_run_before_with_the_same_inputs_is_restored_from_dvcs_run_cache(tmp_path, monkeypatch):
    """What makes a rerun of an experiment (an arm of a claim run before, a sweep restarted after a crash) free:
    every stage a changed param made stale, set back to params it ran with, is restored from DVC's run cache.
    DVC turns the run cache off for a stage with a `persist` output, so training checkpoints are none; only
    teacher_logits keeps one (its shards: an interrupted extraction resumes), and runs again."""
    import subprocess
    import sys

    repo = _repo_with_every_stage_up_to_date(tmp_path, monkeypatch)  # `dvc commit` filled the run cache
    params_text = (repo / "params.yaml").read_text()
    edited = yaml.safe_load(params_text)
    edited["profile"] = "gpu"  # every stage reads it: each is committed again, run with other params
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "commit", "--force", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text(params_text)
    output = subprocess.run([*dvc, "repro", "--dry"], cwd=repo, capture_output=True, text=True, check=True).stdout
    stale = set(re.findall(r"Running stage '([^']+)'", output))
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))
    every = {name for stage in STAGES for name in _addresses(stage)}
    assert stale == every, output
    assert restored == every - {"teacher_logits"}, output
