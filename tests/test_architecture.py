"""The package's shape, as a newcomer relies on it: layers import only downwards, and stages talk through files
on disk, never through each other's code, so scoring a model never imports the training stack and a stage can
change alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenbridge.dvc_stages import PACKAGE, imported_names

# Lowest first. A module may import its own layer or a lower one, and no stage imports another stage.
LAYERS = [
    {"io", "paths", "config", "contracts", "runtime", "logit_codec", "sampling", "stopping", "token_bytes",
     "intervals"},
    {"data"},
    {"models"},
    {"alignment", "stored_logits", "losses", "on_policy", "tracking", "reporting"},
    {"params"},  # built from the loss registry
    {"training", "evaluation"},
    {"stages", "experiments"},  # experiments: DVC experiment sweeps, which compare and claim run
    {"flows", "cli", "__main__", "dvc_stages"},
]
LAYER_OF = {part: index for index, layer in enumerate(LAYERS) for part in layer}
# `data` and `models` stand on two layers above only so the order is total: neither may import the other.
INDEPENDENT = {("data", "models"), ("models", "data")}
STAGE_PREFIX = "tokenbridge.stages."


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> list[tuple[Path, str]]:
    return [(path, _module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to: `losses` for tokenbridge.losses.alm."""
    return module.split(".")[1]


def _package_imports() -> list[tuple[str, str]]:
    """(importing module, imported name) for every import of this package's names, read as the dvc.yaml code deps
    read them (`from a import b` imports a and a.b; imports inside functions count)."""
    return [(name, target) for path, name in _modules() for target in sorted(imported_names(path))
            if target != "tokenbridge"]


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
    offenders = [f"{name} imports {target}" for name, target in _package_imports()
                 if target.rsplit(".", 1)[-1].startswith("_") and not target.rsplit(".", 1)[-1].startswith("__")]
    assert not offenders, "make the name public where it is shared: " + "; ".join(offenders)


def test_the_checks_see_real_imports():
    edges = set(_package_imports())
    assert ("tokenbridge.flows.distill", "tokenbridge.stages.distill") in edges
    assert ("tokenbridge.losses.alm", "tokenbridge.config") in edges


def test_the_flows_that_load_no_model_start_without_transformers_modeling_code():
    """About 2 s of every such process's start (prepare, report, the drivers, each flow's --help): a model class
    is imported where a model is loaded."""
    flows = ["prepare", "report", "pipeline", "compare", "claim"]
    script = (f"import sys; import {', '.join(f'tokenbridge.flows.{flow}' for flow in flows)}; "
              "print('transformers.modeling_utils' in sys.modules)")  # PreTrainedModel's module
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
