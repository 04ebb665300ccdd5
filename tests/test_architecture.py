"""The package's shape, as a newcomer relies on it: stages talk through files on disk, never through each
other's code, so scoring a model never imports the training stack and a stage can change alone."""

from __future__ import annotations

import ast
from pathlib import Path

COMPONENTS = Path(__file__).parents[1] / "components"
# One module per pipeline stage (flows/<stage>.py wires it); everything else in components/ is library.
STAGE_MODULES = {"components.prepare", "components.teacher_logits", "components.distill", "components.transfer",
                 "components.ensemble", "components.evaluate", "components.report"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(COMPONENTS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def _library_modules():
    return [(path, _module_name(path)) for path in sorted(COMPONENTS.rglob("*.py"))]


def test_no_module_imports_a_stage_module_but_the_stage_itself():
    offenders = []
    for path, name in _library_modules():
        for module, names in _imports(path):
            targets = {module} | {f"{module}.{item}" for item in names}
            offenders += [f"{name} imports {target}" for target in sorted(targets & STAGE_MODULES) if target != name]
    assert not offenders, ("stages share code through library modules (components/training, components/models, ...), "
                           "not through each other: " + "; ".join(offenders))


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{name} imports {module}.{item}" for path, name in _library_modules()
                 for module, names in _imports(path) if module.startswith("components")
                 for item in names if item.startswith("_") and not item.startswith("__")]
    assert not offenders, "make the name public where it is shared: " + "; ".join(offenders)


def test_the_stage_list_names_real_modules():
    names = {name for _, name in _library_modules()}
    assert STAGE_MODULES <= names, STAGE_MODULES - names
