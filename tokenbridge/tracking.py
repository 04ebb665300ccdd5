"""Every MLflow call of the project lives here: stage runs, metrics, artifacts, the Model Registry.

By default MLflow uses a sqlite store and a local artifact folder in the project root; set
`MLFLOW_TRACKING_URI` (e.g. http://127.0.0.1:5000) to use a server instead.

Grouping: all stage runs of one pipeline execution share the tag `tokenbridge.pipeline_id`, and are
children of the pipeline's parent run when `tokenbridge/flows/pipeline.py` started them (it exports
`TOKENBRIDGE_PARENT_RUN_ID`). Under a bare `dvc repro`, the id is derived from the `dvc` process that
runs the stages, so its stages still share one id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import psutil
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from tokenbridge.io import sha256_file
from tokenbridge.stopping import Stopped

if TYPE_CHECKING:
    import torch

PARENT_RUN_ENV = "TOKENBRIDGE_PARENT_RUN_ID"
PIPELINE_ID_ENV = "TOKENBRIDGE_PIPELINE_ID"
PIPELINE_TAG = "tokenbridge.pipeline_id"
CANDIDATE, CHAMPION = "candidate", "champion"
HEALTH_TIMEOUT_SECONDS = 5
WEIGHTS_TAG, DECISION_TAG = "tokenbridge.weights_sha256", "tokenbridge.champion_decision"  # on model versions
HOST_TAG, PROCESS_TAG = "tokenbridge.host", "tokenbridge.process"  # who owns a run: `<pid>-<process start time>`


def unreachable_servers() -> list[str]:
    """One line per configured server (MLflow's MLFLOW_TRACKING_URI, Prefect's PREFECT_API_URL) that does not answer
    its health check within seconds: checked before a stage starts, so a server that is down stops it at once
    rather than after minutes of client retries."""
    servers = {"MLflow": "MLFLOW_TRACKING_URI", "Prefect": "PREFECT_API_URL"}  # both answer GET <url>/health
    problems = []
    for name, variable in servers.items():
        url = os.environ.get(variable, "")
        if not url.startswith(("http://", "https://")):
            continue
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_SECONDS):
                pass
        except (OSError, ValueError) as error:
            fallback = "the local sqlite store" if name == "MLflow" else "the temporary local Prefect API"
            problems.append(f"the {name} server at {url} ({variable}) does not answer "
                            f"({getattr(error, 'reason', error)}): start it (`make services && source .services/env`,"
                            f" docs/servers.md), or unset {variable} to use {fallback}")
    return problems


def configure(experiment: str) -> None:
    """Point MLflow at the tracking store and select (creating if needed) the experiment."""
    root = Path.cwd()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None if uri.startswith("http") else (root / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)


def pipeline_id() -> str:
    """The id shared by all stage runs of one pipeline execution."""
    if os.environ.get(PIPELINE_ID_ENV):
        return os.environ[PIPELINE_ID_ENV]
    for process in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if any(Path(part).name == "dvc" for part in process.cmdline()[:2]):
                return f"dvc-{process.pid}-{int(process.create_time())}"
    return f"single-{uuid.uuid4().hex[:12]}"


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def revision_tags() -> dict[str, str]:
    """The code and data revision a run used: git commit, dirty flag, and a hash of dvc.lock."""
    lock = Path("dvc.lock")
    return {
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else "none",
    }


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, profile: str, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage execution, tagged and grouped with its pipeline execution."""
    configure(experiment)
    tags = {PIPELINE_TAG: pipeline_id(), "tokenbridge.stage": stage, "tokenbridge.profile": profile, **revision_tags()}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with _run(experiment, stage, tags) as run:
        mlflow.log_params(_flatten(params))
        yield run


@contextlib.contextmanager
def _run(experiment: str, name: str, tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """A run owned by this process, ended FINISHED, KILLED (stopped by a signal) or FAILED; runs a crash left
    RUNNING are marked FAILED first."""
    fail_abandoned_runs(experiment)
    run = mlflow.start_run(run_name=name, tags={**tags, **_process_tags()}, nested=mlflow.active_run() is not None)
    try:
        yield run
    except BaseException as error:
        _end_run_after(error)
        raise
    mlflow.end_run("FINISHED")


def _end_run_after(error: BaseException) -> None:
    """End the active run KILLED (a stop) or FAILED. If the store cannot take it (an interrupted write can leave
    sqlite locked), the run is left RUNNING for the next run's `fail_abandoned_runs`, and `error` goes on up."""
    try:
        mlflow.end_run("KILLED" if isinstance(error, Stopped) else "FAILED")
    except Exception as failure:  # the stage's own error matters more than its run's status
        print(f"tracking: could not mark the run ended ({type(failure).__name__}); the next run marks it FAILED")


def _process_tags() -> dict[str, str]:
    """Which process owns a run, so a later one can tell a crashed run from one still going."""
    process = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PROCESS_TAG: f"{process.pid}-{process.create_time():.0f}"}


def fail_abandoned_runs(experiment: str) -> list[str]:
    """Mark FAILED the RUNNING runs of `experiment` whose process on this machine is gone (kill -9, out of
    memory): MLflow would show them running forever. Runs of other machines are left alone. Returns their ids."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    client = MlflowClient()
    host, abandoned = socket.gethostname(), []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(PROCESS_TAG)
        if run.data.tags.get(HOST_TAG) != host or owner is None or _alive(owner):
            continue
        client.set_terminated(run.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "tokenbridge.failure", "its process ended without finishing the run")
        abandoned.append(run.info.run_id)
    if abandoned:
        print(f"tracking: marked {len(abandoned)} run(s) FAILED whose process ended while they ran: {abandoned}")
    return abandoned


def _alive(owner: str) -> bool:
    """Whether the process `<pid>-<start time>` still runs (a reused pid has another start time)."""
    pid, started = owner.split("-")
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" == started
    except psutil.Error:
        return False


@contextlib.contextmanager
def pipeline_run(experiment: str, profile: str) -> Iterator[mlflow.ActiveRun]:
    """The parent run of a whole pipeline execution; exports its id so stage processes nest under it."""
    configure(experiment)
    group = f"pipeline-{uuid.uuid4().hex[:12]}"
    tags = {PIPELINE_TAG: group, "tokenbridge.stage": "pipeline", "tokenbridge.profile": profile, **revision_tags()}
    with _run(experiment, "pipeline", tags) as run:
        os.environ[PARENT_RUN_ENV], os.environ[PIPELINE_ID_ENV] = run.info.run_id, group
        try:
            yield run
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)
            os.environ.pop(PIPELINE_ID_ENV, None)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    if Path(path).is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def _weights_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def _registered(client: MlflowClient, name: str, weights: str) -> ModelVersion | None:
    """The version of `name` already registered for exactly these weights: a rerun after an interruption finds it."""
    found = [version for version in client.search_model_versions(f"name='{name}'")
             if version.tags.get(WEIGHTS_TAG) == weights]
    return min(found, key=lambda version: int(version.version)) if found else None


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def register_candidate(model_dir: Path, name: str, metric: str, value: float, higher_is_better: bool) -> dict[str, Any]:
    """Log the model, register it with alias `candidate`; move `champion` to it only if it beats the champion.

    Idempotent, so the registry and the report agree after an interruption anywhere: the version is keyed on the
    weights' sha256 and carries its champion decision (made once, against the champion of that moment). A rerun
    finds it, finishes what was left (the aliases) and returns the same decision, never a second version."""
    import transformers

    from tokenbridge.models import load_model, load_tokenizer

    client = MlflowClient()
    weights = _weights_sha256(list(Path(model_dir).glob("*.safetensors")))
    version = _registered(client, name, weights)
    if version is None:
        champion = _alias(client, name, CHAMPION)
        champion_value = float(champion.tags[metric]) if champion is not None and metric in champion.tags else None
        beats = champion_value is None or (value > champion_value if higher_is_better else value < champion_value)
        comparison = ("no champion yet" if champion_value is None
                      else f"{value:.4g} vs champion {champion_value:.4g} on {metric}")
        decision = {"beats": beats, "previous_champion": None if champion is None else int(champion.version),
                    "reason": f"{'beats' if beats else 'does not beat'} the champion: {comparison}"}
        model_info = mlflow.transformers.log_model(
            transformers_model={"model": load_model(model_dir), "tokenizer": load_tokenizer(model_dir)},
            name="model", task="text-generation",
            pip_requirements=[f"transformers=={transformers.__version__}", "torch==2.13.0", "accelerate"],
        )
        version = mlflow.register_model(model_info.model_uri, name, tags={
            WEIGHTS_TAG: weights, DECISION_TAG: json.dumps(decision), metric: str(value)})
    else:
        decision = json.loads(version.tags[DECISION_TAG])
        print(f"registry: {name} version {version.version} already holds these weights; not registered again",
              file=sys.stderr)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    current = _alias(client, name, CHAMPION)
    if decision["beats"] and (None if current is None else int(current.version)) == decision["previous_champion"]:
        client.set_registered_model_alias(name, CHAMPION, version.version)  # unless another run moved it since
    return {
        "model": name, "version": int(version.version), "candidate": True, "champion_moved": decision["beats"],
        "champion_version": int(version.version) if decision["beats"] else decision["previous_champion"],
        "reason": decision["reason"],
    }


def register_hypernet(hypernet: torch.nn.Module, directory: Path, name: str, tags: dict[str, str]) -> int:
    """Log the hypernetwork (the module, with its card beside it) and register it as a version of `name`, tagged
    with what it was trained for (base model, tokenizer pool); its whole directory (the pool and held-out
    tokenizers) is logged with the run. Returns the version; a rerun after an interruption finds the version of
    the same weights instead of registering another."""
    import mlflow.pytorch

    weights = _weights_sha256([Path(directory) / "hypernet.pt"])
    version = _registered(MlflowClient(), name, weights)
    if version is not None:
        return int(version.version)
    log_artifact(directory, "hypernet_dir")
    info = mlflow.pytorch.log_model(hypernet, name="hypernet", serialization_format="pickle",
                                    extra_files=[str(Path(directory) / "hypernet.json")],
                                    pip_requirements=["torch==2.13.0"])
    return int(mlflow.register_model(info.model_uri, name, tags={**tags, WEIGHTS_TAG: weights}).version)
