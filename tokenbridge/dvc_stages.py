"""dvc.yaml, generated from the table below so that it cannot drift from the code or from params.yaml.

Each stage's code deps are every tokenbridge module its command (`python -m tokenbridge <stage>`) imports, read
from the source; its params are the keys the table names plus, for each profile in params.yaml, that profile's
overrides of those keys (tokenbridge.config.resolve applies the same overrides to the values); its data deps
include the files params name for it in any profile (`data_files`). Run
`python -m tokenbridge.dvc_stages` (or `make dvc.yaml`) from the project root after changing the table, the
imports or the profiles; tests/test_dvc_stages.py fails while the committed dvc.yaml differs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from tokenbridge.config import DEFAULT_PARAMS, is_task_folder
from tokenbridge.params import resolve
from tokenbridge.paths import (
    DISTILL_HISTORY,
    DISTILL_METRICS,
    DISTILLED_DIR,
    ENSEMBLE_DIR,
    EVAL_DIR,
    EVAL_METRICS_DIR,
    EVAL_MODELS,
    HYPERNET_DIR,
    HYPERNET_EVAL_DIR,
    HYPERNET_EVAL_METRICS,
    HYPERNET_HISTORY,
    HYPERNET_METRICS,
    ORIGINAL_ANSWERS_DIR,
    PREPARED_DIR,
    REPORT_DIR,
    SOURCES_DIR,
    STUDENT_DIR,
    TEACHER_ANSWERS_DIR,
    TEACHER_DIR,
    TEACHER_LOGITS_DIR,
    TRANSFER_EVAL_DIR,
    TRANSFER_EVAL_METRICS,
    TRANSFER_HISTORY_DIR,
    TRANSFER_METRICS,
    TRANSFERRED_DIR,
)

PACKAGE = Path(__file__).resolve().parent
DVC_YAML = Path("dvc.yaml")
REGENERATE = "python -m tokenbridge.dvc_stages"
# `python -m tokenbridge <stage>` runs tokenbridge/__main__.py, whose cli imports tokenbridge.flows.<stage>.
ENTRY_MODULE = "tokenbridge.__main__"
FLOW_PACKAGE = "tokenbridge.flows"
MODEL_CARD = "tokenbridge.json"

HEADER = f"""\
# Generated from the table in tokenbridge/dvc_stages.py by `{REGENERATE}` (or `make dvc.yaml`):
# edit the table, not this file. tests/test_dvc_stages.py fails while this file differs from what it generates.
# The pipeline. Each stage runs one Prefect flow; DVC decides what is stale (params, code, data).
# Code: each stage depends on every tokenbridge module its command imports, lazy imports included (a directory
# stands for its modules when the command imports all of them).
# Params: each stage depends on the params.yaml keys it reads, the profile switch and every profile's overrides
# of those keys; and on the data files those params name (prepare.*_jsonl, a local transfer.tokenizer,
# evaluate_hypernet.tokenizers), so a change in their contents reruns it.
# Every output is cached (none is `cache: false`), so `dvc push` / `dvc pull` carry the whole state: README
# "Remote storage (DVC)".
# Training checkpoints (checkpoints/, gitignored) are no stage's output: they stay between runs, so a stopped
# stage resumes, and the stages that write them keep DVC's run cache, which a `persist` output turns off: a run
# of params seen before (an experiment rerun, a claim's arm) is restored from the cache, not trained again.
"""


class Persist(NamedTuple):
    """An output DVC keeps when the stage reruns, and why."""

    path: Path
    why: str


@dataclass(frozen=True)
class Stage:
    """One DVC stage, running the flow of the same name: what it reads and writes besides its code."""

    name: str
    params: tuple[str, ...]  # params.yaml keys it reads (a section or a dotted key), besides `profile`
    deps: tuple[Path | str, ...]  # files and directories other stages write
    outs: tuple[Path | Persist, ...]
    metrics: tuple[Path | str, ...] = ()
    plots: dict[Path, dict[str, str]] = field(default_factory=dict)  # file -> its x and y columns
    options: str = ""  # appended to the command
    foreach: dict[str, Path] = field(default_factory=dict)  # one stage per key: `${key}`, `${item}`
    comment: str = ""  # beside the stage's name
    note: tuple[str, ...] = ()  # comment lines above the stage


STAGES = (
    Stage("models", params=("models",), deps=(), outs=(TEACHER_DIR, STUDENT_DIR)),
    Stage("prepare", params=("prepare",),
          deps=(TEACHER_DIR / "tokenizer.json", STUDENT_DIR / "tokenizer.json", TEACHER_DIR / MODEL_CARD,
                STUDENT_DIR / MODEL_CARD),
          outs=(PREPARED_DIR,)),
    Stage("teacher_logits", params=("runtime", "teacher_logits", "distill.teacher_mode"),
          deps=(PREPARED_DIR, TEACHER_DIR),
          outs=(Persist(TEACHER_LOGITS_DIR, "finished shards survive an interruption; a rerun extracts only the "
                                            "missing ones"),)),
    Stage("distill",
          params=("runtime", "distill", "teacher_logits.temperature", "teacher_logits.examples_per_shard",
                  "evaluate.bpb_examples", "evaluate.teacher_answers"),
          deps=(PREPARED_DIR, TEACHER_LOGITS_DIR, STUDENT_DIR, TEACHER_DIR, TEACHER_ANSWERS_DIR),
          outs=(DISTILLED_DIR,),
          metrics=(DISTILL_METRICS,), plots={DISTILL_HISTORY: {"x": "step", "y": "loss"}}),
    Stage("teacher_answers", params=("evaluate.teacher_answers", "evaluate.max_gen_toks", "evaluate.batch_size",
                                     "runtime.device", "runtime.precision"),
          deps=(PREPARED_DIR / "test.jsonl", TEACHER_DIR, STUDENT_DIR / "tokenizer.json"),
          outs=(TEACHER_ANSWERS_DIR,),
          comment="the teacher's greedy answers to test questions, generated once for every evaluate stage"),
    Stage("evaluate", params=("evaluate", "runtime.device", "runtime.precision"),
          deps=(PREPARED_DIR, "${item}", TEACHER_DIR, TEACHER_ANSWERS_DIR), outs=(EVAL_DIR / "${key}",),
          metrics=(EVAL_METRICS_DIR / "${key}.json",),
          options="--model ${key}", foreach=EVAL_MODELS,
          comment="one stage per model (evaluate@teacher, ...): a new student re-evaluates only itself",
          note=("runtime.device and runtime.precision decide the device and the generation dtype, so they are",
                "params of the evaluate stages; the students' chunk gap reads models/teacher, a dep of each.",
                "Every model is also scored on the teacher's answers (data/teacher_answers).")),
    Stage("hypernet", params=("runtime", "hypernet", "tracking.registered_hypernet"),
          deps=(PREPARED_DIR / "train.jsonl", PREPARED_DIR / "test.jsonl", STUDENT_DIR, TEACHER_DIR),
          outs=(HYPERNET_DIR,),
          metrics=(HYPERNET_METRICS,), plots={HYPERNET_HISTORY: {"x": "step", "y": "loss"}},
          comment="an embedding hypernetwork for hypernet.base's model, trained with ALM (ZeTT)"),
    Stage("evaluate_hypernet",
          params=("evaluate_hypernet", "hypernet.base", "evaluate", "transfer", "runtime.device", "runtime.precision"),
          deps=(PREPARED_DIR, STUDENT_DIR, TEACHER_DIR, HYPERNET_DIR),
          outs=(HYPERNET_EVAL_DIR, EVAL_DIR / "hypernet"),
          metrics=(HYPERNET_EVAL_METRICS,),
          comment="the base model moved by FVT and by the hypernetwork onto unseen tokenizers: bits-per-byte"),
    Stage("transfer", params=("runtime", "transfer", "evaluate.bpb_examples", "evaluate.teacher_answers",
                              "evaluate.max_gen_toks", "evaluate.batch_size"),
          deps=(PREPARED_DIR / "train.jsonl", PREPARED_DIR / "test.jsonl", STUDENT_DIR / "tokenizer.json",
                TEACHER_DIR / "tokenizer.json", HYPERNET_DIR),
          outs=(SOURCES_DIR, TRANSFERRED_DIR, ORIGINAL_ANSWERS_DIR, TRANSFER_HISTORY_DIR),
          metrics=(TRANSFER_METRICS,),
          comment="each transfer.sources model onto transfer.tokenizer: FVT, then ALM self-distillation"),
    Stage("ensemble", params=("ensemble",), deps=(STUDENT_DIR, TEACHER_DIR, TRANSFERRED_DIR), outs=(ENSEMBLE_DIR,),
          comment="writes files only (config, hard-linked members, tokenizer): no device, no runtime params"),
    Stage("evaluate_transfer",
          params=("evaluate", "ensemble", "transfer.sources", "transfer.init", "runtime.device", "runtime.precision"),
          deps=(PREPARED_DIR, SOURCES_DIR, TRANSFERRED_DIR, ORIGINAL_ANSWERS_DIR, ENSEMBLE_DIR,
                EVAL_METRICS_DIR / "student_before.json",
                EVAL_METRICS_DIR / "teacher.json"),
          outs=(TRANSFER_EVAL_DIR,), metrics=(TRANSFER_EVAL_METRICS,),
          comment="bits-per-byte for every model; GSM on evaluate.transfer_limit questions (default 0)"),
    Stage("report", params=("tracking", "transfer.sources", "ensemble.members"),
          deps=(*(EVAL_METRICS_DIR / f"{model}.json" for model in EVAL_MODELS), DISTILL_HISTORY, DISTILLED_DIR,
                TEACHER_DIR / MODEL_CARD, TRANSFER_METRICS, TRANSFER_EVAL_METRICS, ENSEMBLE_DIR / MODEL_CARD,
                HYPERNET_METRICS, HYPERNET_EVAL_METRICS),
          outs=(REPORT_DIR,)),
)


def module_file(name: str, package: Path = PACKAGE) -> Path | None:
    """The file of module `name` of `package` (dotted, from the package's own name); None when `name` is no module
    (`from tokenbridge.x import f` names a function)."""
    head, *rest = name.split(".")
    if head != package.name:
        return None
    location = package.joinpath(*rest)
    if (location / "__init__.py").is_file():
        return location / "__init__.py"
    module = location.parent / f"{location.name}.py"
    return module if rest and module.is_file() else None


def imported_names(path: Path, package: Path = PACKAGE) -> set[str]:
    """The dotted names of `package` a file imports anywhere in it (an import inside a function runs too);
    `from a import b` counts as importing both a and a.b, since b may be a module; a file that walks its folder with
    `pkgutil.iter_modules` (the loss registry) imports every module in that folder."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "iter_modules":
            folder = ".".join(path.parent.relative_to(package.parent).parts)
            names |= {f"{folder}.{module.stem}" for module in path.parent.glob("*.py")}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{path}:{node.lineno}: relative import; write it as `from {package.name}.... import ...` "
                             "(the dvc.yaml code deps and tests/test_architecture.py read absolute imports only)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name.split(".")[0] == package.name}


def import_closure(modules: Iterable[str], package: Path = PACKAGE) -> set[Path]:
    """Every file of `package` that importing `modules` runs: theirs, the `__init__.py` of each package on the way,
    and so on through whatever those import."""
    files: set[Path] = set()
    pending = list(modules)
    while pending:
        parts = pending.pop().split(".")
        for depth in range(1, len(parts) + 1):
            file = module_file(".".join(parts[:depth]), package)
            if file is not None and file not in files:
                files.add(file)
                pending += imported_names(file, package)
    return files


def stage_code(stage: str) -> set[Path]:
    """The files `python -m tokenbridge <stage>` imports."""
    return import_closure([ENTRY_MODULE, f"{FLOW_PACKAGE}.{stage}"])


def code_deps(files: set[Path], package: Path = PACKAGE) -> list[str]:
    """`files` as dvc deps relative to the project root, a directory standing for its files when every module under
    it is among them (so the lists stay short)."""

    def covering(directory: Path) -> list[Path]:
        modules = list(directory.rglob("*.py"))
        if modules and all(module in files for module in modules):
            return [directory]
        return [*(path for path in directory.glob("*.py") if path in files),
                *(path for child in directory.iterdir() if child.is_dir() for path in covering(child))]

    return sorted(str(path.relative_to(package.parent)) for path in covering(package))


def has_key(mapping: Any, dotted: str) -> bool:
    """Whether nested dicts hold the dotted key `a.b.c`, as a DVC params entry names it."""
    for key in dotted.split("."):
        if not isinstance(mapping, dict) or key not in mapping:
            return False
        mapping = mapping[key]
    return True


def stage_params(keys: Iterable[str], profiles: dict[str, Any]) -> list[str]:
    """A stage's params entries: the profile switch, the keys it reads, and `profiles.<name>.<key>` for each profile
    that overrides one of them (DVC refuses an entry params.yaml lacks, so absent overrides are left out)."""
    keys = list(keys)
    return ["profile", *keys, *(f"profiles.{name}.{key}" for name, overrides in profiles.items() for key in keys
                                if has_key(overrides, key))]


def data_files(raw: dict[str, Any]) -> dict[str, list[str]]:
    """stage name -> the files and directories params name for it to read, in any profile: GSM8K JSONL files
    (`prepare.source: jsonl`), a local target tokenizer (`transfer.tokenizer`), compared tokenizers
    (`evaluate_hypernet.tokenizers`), folders of lm-eval tasks (`evaluate.tasks`). As dependencies, their contents
    decide what is stale, like any stage input."""
    found: dict[str, set[str]] = {"prepare": set(), "transfer": set(), "evaluate_hypernet": set(), "evaluate": set(),
                                  "evaluate_transfer": set()}
    for name in ["default", *(raw.get("profiles") or {})]:
        params = resolve(raw, name)
        if params.prepare.source == "jsonl":
            found["prepare"] |= {str(params.prepare.train_jsonl), str(params.prepare.test_jsonl)}
        if params.transfer.tokenizer not in ("student", "teacher", "byte"):
            found["transfer"].add(params.transfer.tokenizer)
        found["evaluate_hypernet"] |= {spec for spec in params.evaluate_hypernet.tokenizers.values()
                                       if spec not in ("student", "teacher", "heldout")}
        folders = {entry for entry in params.evaluate.tasks if is_task_folder(entry)}
        found["evaluate"] |= folders
        found["evaluate_transfer"] |= folders if params.evaluate.transfer_limit else set()
    return {stage: sorted(paths) for stage, paths in found.items() if paths}


def stage_body(stage: Stage, profiles: dict[str, Any], data: Iterable[str] = ()) -> dict[str, Any]:
    """What dvc.yaml says about one stage, as the plain data YAML parses it to; `data`: files params name for it."""
    body: dict[str, Any] = {
        "cmd": f"python -m tokenbridge {stage.name} {stage.options}".strip(),
        "deps": [*code_deps(stage_code(stage.name)), *map(str, stage.deps), *data],
        "params": stage_params(stage.params, profiles),
        "outs": [{str(out.path): {"persist": True}} if isinstance(out, Persist) else str(out) for out in stage.outs],
    }
    if stage.metrics:
        body["metrics"] = [str(path) for path in stage.metrics]
    if stage.plots:
        body["plots"] = [{str(path): dict(axes)} for path, axes in stage.plots.items()]
    if stage.foreach:
        return {"foreach": {key: str(path) for key, path in stage.foreach.items()}, "do": body}
    return body


def pipeline(raw: dict[str, Any]) -> dict[str, Any]:
    """dvc.yaml's content as plain data, for the params file's content `raw`."""
    profiles, data = raw.get("profiles") or {}, data_files(raw)
    return {"stages": {stage.name: stage_body(stage, profiles, data.get(stage.name, [])) for stage in STAGES}}


def missing_entries(params_file: Path = DEFAULT_PARAMS, dvc_file: Path = DVC_YAML) -> list[str]:
    """The params entries and data deps `params_file` needs that `dvc_file` lacks, one line each: a profile
    override or a data file added to params.yaml after dvc.yaml was generated, which DVC would not see. (Code deps
    are left out: they follow the code, not params, and tests/test_dvc_stages.py checks them.)"""
    raw = yaml.safe_load(params_file.read_text()) or {}
    profiles, data = raw.get("profiles") or {}, data_files(raw)
    present = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages") or {}
    missing = []
    for stage in STAGES:
        body = present.get(stage.name) or {}
        body = body.get("do") or {} if stage.foreach else body
        missing += [f"{stage.name}: params {entry}" for entry in stage_params(stage.params, profiles)
                    if entry not in (body.get("params") or [])]
        missing += [f"{stage.name}: deps {entry}" for entry in data.get(stage.name, [])
                    if entry not in (body.get("deps") or [])]
    return missing


def _yaml_lines(value: Any, path: tuple[str, ...], indent: str, comments: dict[tuple[str, ...], str]) -> list[str]:
    """Block-style YAML for dicts, lists, strings and booleans, with `comments[path]` beside the line of `path`
    (a path names dict keys only: a list item's keys continue its list's path)."""
    if isinstance(value, list):
        lines = []
        for item in value:
            first, *rest = _yaml_lines(item, path, indent + "  ", comments)
            lines += [f"{indent}- {first.removeprefix(indent + '  ')}", *rest]
        return lines
    if not isinstance(value, dict):
        return [indent + (("true" if value else "false") if isinstance(value, bool) else value)]
    lines = []
    for key, item in value.items():
        here = (*path, key)
        comment = f"   # {comments[here]}" if here in comments else ""
        if isinstance(item, (dict, list)):
            lines += [f"{indent}{key}:{comment}", *_yaml_lines(item, here, indent + "  ", comments)]
        else:
            lines.append(f"{indent}{key}: {_yaml_lines(item, here, '', comments)[0]}{comment}")
    return lines


def dvc_yaml(params_file: Path = DEFAULT_PARAMS) -> str:
    """The text of dvc.yaml for the profiles in `params_file`."""
    document = pipeline(yaml.safe_load(params_file.read_text()) or {})
    blocks = []
    for stage in STAGES:
        inner = ("do",) if stage.foreach else ()
        comments = {(stage.name, *inner, "outs", str(out.path), "persist"): out.why
                    for out in stage.outs if isinstance(out, Persist)}
        if stage.comment:
            comments[(stage.name,)] = stage.comment
        lines = [f"  # {line}" for line in stage.note]
        blocks.append("\n".join(lines + _yaml_lines({stage.name: document["stages"][stage.name]}, (), "  ", comments)))
    return HEADER + "stages:\n" + "\n\n".join(blocks) + "\n"


def main() -> None:
    if not DEFAULT_PARAMS.is_file():
        raise SystemExit(f"{DEFAULT_PARAMS} not found: run `{REGENERATE}` from the project root")
    DVC_YAML.write_text(dvc_yaml())
    print(f"wrote {DVC_YAML}")


if __name__ == "__main__":
    main()
