"""Shared fixtures: tiny models with deliberately different tokenizers, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_params():
    from components.config import load_params

    return load_params(Path(__file__).parents[1] / "params.yaml", profile="tiny")


@pytest.fixture(scope="session")
def tiny_dirs(tiny_params, tmp_path_factory) -> dict[str, Path]:
    from components.models import materialize

    root = tmp_path_factory.mktemp("tiny_models")
    for role in ("teacher", "student"):
        materialize(getattr(tiny_params.models, role), root / role, root / "cache")
    return {role: root / role for role in ("teacher", "student")}


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_dirs):
    from transformers import AutoTokenizer

    return {role: AutoTokenizer.from_pretrained(path) for role, path in tiny_dirs.items()}
