"""dvc.yaml cannot drift from the code: it is generated from tokenbridge/dvc_stages.py, every stage depends on each
module its command imports, and every profile's overrides of the params a stage reads are params of that stage."""

from __future__ import annotations

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
    pipeline,
    stage_code,
    stage_params,
)

ROOT = Path(__file__).parents[1]
NOT_STAGES = {"pipeline", "compare"}  # the flows that drive other stages: the whole pipeline, the loss comparison


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
    """A GSM8K file or a local tokenizer named in any profile: DVC must see its contents, or an edited file would
    leave the stage 'up to date'."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("train.jsonl", "test.jsonl", "tokenizer/tokenizer.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    raw["profiles"]["tiny"]["prepare"].update(source="jsonl", train_jsonl=str(tmp_path / "train.jsonl"),
                                              test_jsonl=str(tmp_path / "test.jsonl"))
    raw["profiles"]["gpu"]["transfer"]["tokenizer"] = str(tmp_path / "tokenizer")
    stages = pipeline(raw)["stages"]
    assert {str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")} <= set(stages["prepare"]["deps"])
    assert str(tmp_path / "tokenizer") in stages["transfer"]["deps"]
    assert not {str(tmp_path / "train.jsonl"), str(tmp_path / "tokenizer")} & set(stages["distill"]["deps"])


def test_every_param_a_stage_names_is_in_params_yaml():
    """DVC stops at a params entry params.yaml lacks; this names the stage and the key before it does."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = [f"{name}: {key}" for name, body in _committed_stages().items() for key in body["params"]
               if not has_key(params, key)]
    assert not missing, f"params.yaml has no such key (fix the STAGES table in tokenbridge/dvc_stages.py): {missing}"
