"""The package's shape, as a newcomer relies on it: layers import only downwards, and stages talk through files
on disk, never through each other's code, so scoring a model never imports the training stack and a stage can
change alone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "tokenbridge"
# Lowest first. A module may import its own layer or a lower one, and no stage imports another stage.
LAYERS = [
    {"io", "paths", "config", "contracts", "runtime", "logit_codec", "sampling", "token_bytes"},
    {"data"},
    {"models"},
    {"alignment", "stored_logits", "losses", "on_policy", "tracking", "reporting"},
    {"params"},  # built from the loss registry
    {"training", "evaluation"},
    {"stages"},
    {"flows", "cli", "__main__", "dvc_stages"},
]
LAYER_OF = {part: index for index, layer in enumerate(LAYERS) for part in layer}
# `data` and `models` stand on two layers above only so the order is total: neither may import the other.
INDEPENDENT = {("data", "models"), ("models", "data")}
STAGE_PREFIX = "tokenbridge.stages."


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
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


def _modules() -> list[tuple[Path, str]]:
    return [(path, _module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to: `losses` for tokenbridge.losses.alm."""
    return module.split(".")[1]


def _package_imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import of this package's modules, `from x import y` counted
    as importing x.y when y is a module."""
    edges = []
    for _, name in _modules():
        for module, names in _imports(_path_of(name)):
            if module.split(".")[0] != "tokenbridge":
                continue
            targets = [f"{module}.{item}" for item in names if _is_module(f"{module}.{item}")] or [module]
            edges += [(name, target) for target in targets if target != "tokenbridge"]
    return edges


def _path_of(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    return PACKAGE / relative / "__init__.py" if (PACKAGE / relative).is_dir() else PACKAGE / f"{relative}.py"


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).is_dir() or (PACKAGE / f"{relative}.py").is_file()


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(name) for _, name in _modules() if name != "tokenbridge"}
    assert parts <= set(LAYER_OF), f"add these to LAYERS: {sorted(parts - set(LAYER_OF))}"


def test_layers_import_only_downwards():
    offenders = [f"{name} imports {target}" for name, target in _package_imports() if name != "tokenbridge"
                 and ((_part(name), _part(target)) in INDEPENDENT or LAYER_OF[_part(target)] > LAYER_OF[_part(name)])]
    assert not offenders, ("a lower layer must not lean on a higher one; move the shared code down: "
                           + "; ".join(offenders))


def test_no_module_imports_a_stage_module_but_the_flows():
    offenders = [f"{name} imports {target}" for name, target in _package_imports()
                 if target.startswith(STAGE_PREFIX) and _part(name) != "flows" and target != name]
    assert not offenders, ("stages share code through library modules (tokenbridge/training, tokenbridge/models, "
                           "...), not through each other: " + "; ".join(offenders))


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{name} imports {module}.{item}" for path, name in _modules()
                 for module, names in _imports(path) if module.startswith("tokenbridge")
                 for item in names if item.startswith("_") and not item.startswith("__")]
    assert not offenders, "make the name public where it is shared: " + "; ".join(offenders)


def test_the_checks_see_real_imports():
    edges = set(_package_imports())
    assert ("tokenbridge.flows.distill", "tokenbridge.stages.distill") in edges
    assert ("tokenbridge.losses.alm", "tokenbridge.config") in edges
