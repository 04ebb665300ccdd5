"""The pipeline on real team services, as `make services` starts them (infra/services.sh): PostgreSQL, an MLflow
server on it with artifacts proxied into a local store, and a Prefect server. The project starts as the session's
tiny pipeline run left it (tests/conftest.py: tiny_pipeline) plus a committed params change; the pipeline is served
as a cron deployment, one run is triggered through Prefect and reruns what the change made stale (distill, the
distilled student's evaluation, report); the tests then read Prefect's schedule and MLflow's runs and Model Registry
back through the servers' APIs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from project_commands import run, stages_run

from tokenbridge.flows.common import free_port

ROOT = Path(__file__).parents[1]
SERVICES = ROOT / "infra" / "services.sh"
FLOW, DEPLOYMENT, CRON = "tokenbridge-pipeline", "tokenbridge-scheduled", "0 3 * * *"
RUN_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 300  # each command the tests run beside the servers

pytestmark = [pytest.mark.integration, pytest.mark.from_tiny_pipeline]


@pytest.fixture(scope="module")
def services():
    """The services started once by infra/services.sh, stopped by it at teardown whatever happened."""
    # Not under pytest's basetemp: that is private to root, and PostgreSQL runs as the `postgres` user.
    folder = Path(tempfile.mkdtemp(prefix="tokenbridge-services-"))
    folder.chmod(0o755)
    env = {**os.environ, "TOKENBRIDGE_SERVICES_DIR": str(folder / "state"),
           "TOKENBRIDGE_POSTGRES_PORT": str(free_port()), "TOKENBRIDGE_MLFLOW_PORT": str(free_port()),
           "TOKENBRIDGE_PREFECT_PORT": str(free_port())}
    try:
        started = run([str(SERVICES), "start"], ROOT, env, COMMAND_TIMEOUT_S)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", started, re.M))
        yield {**exports, "state": folder / "state"}
    finally:
        subprocess.run([str(SERVICES), "stop"], cwd=ROOT, env=env, timeout=180, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_pipeline, services):
    """A copy of the session's tiny pipeline run (tests/conftest.py), then a change the team commits: a new distill
    learning rate. Pointed at the servers by environment only."""
    repo, env = tiny_pipeline.copy(tmp_path_factory.mktemp("services"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["tiny"]["distill"]["learning_rate"] = 5.0e-4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env.update(PREFECT_API_URL=services["PREFECT_API_URL"], MLFLOW_TRACKING_URI=services["MLFLOW_TRACKING_URI"])
    run(["git", "commit", "-qam", "distill: learning rate 5e-4"], repo, env, COMMAND_TIMEOUT_S)
    return repo, env


@pytest.fixture(scope="module")
def deployment_run(repo, services):
    """Serves the cron deployment, triggers one run with `prefect deployment run`, waits for it to finish.
    Returns (deployment, finished flow run, the serve process's log)."""
    path, env = repo
    api = httpx.Client(base_url=services["PREFECT_API_URL"], timeout=30)
    log = path.parent / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "tokenbridge", "pipeline", "--serve", "--cron", CRON],
                                 cwd=path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (response := api.get(f"/deployments/name/{FLOW}/{DEPLOYMENT}")).status_code == 404:
            assert serve.poll() is None and time.monotonic() < deadline, f"no deployment:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        response.raise_for_status()
        output = run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", f"{FLOW}/{DEPLOYMENT}"],
                     path, env, COMMAND_TIMEOUT_S)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (flow_run := api.get(f"/flow_runs/{flow_run_id}").json())["state"]["type"] not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert serve.poll() is None, f"the serve process exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"run not finished in {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(5)
        yield response.json(), flow_run, log.read_text()
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: the runner shuts down cleanly and pauses the schedule
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        api.close()


def test_a_triggered_run_of_the_cron_deployment_completes_rerunning_what_the_change_made_stale(deployment_run):
    deployment, flow_run, log = deployment_run
    assert [entry["schedule"]["cron"] for entry in deployment["schedules"]] == [CRON]
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["state"]["type"] == "COMPLETED", log[-6000:]
    assert stages_run(log) == {"distill", "evaluate@student_after", "report"}, log


def test_the_scheduler_creates_future_runs_of_the_deployment(deployment_run, services):
    deployment, _, _ = deployment_run
    with httpx.Client(base_url=services["PREFECT_API_URL"], timeout=30) as api:
        query = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]},
                               "state": {"type": {"any_": ["SCHEDULED"]}}}}
        scheduled = api.post("/flow_runs/filter", json=query).json()
    assert scheduled, "the scheduler created no scheduled runs"
    now = datetime.now(UTC)
    for flow_run in scheduled:
        start = datetime.fromisoformat(flow_run["expected_start_time"])
        assert flow_run["auto_scheduled"] and start > now and (start.hour, start.minute) == (3, 0)


def test_the_mlflow_server_holds_the_registered_model_and_its_aliases(deployment_run, repo, services, tmp_path):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    path, _ = repo
    uri = services["MLFLOW_TRACKING_URI"]
    params = yaml.safe_load((path / "params.yaml").read_text())["tracking"]
    name = params["registered_model"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model = client.get_registered_model(name)
    assert model.aliases == {"candidate": "1", "champion": "1"}
    version = client.get_model_version_by_alias(name, "champion")
    report = client.get_run(version.run_id)
    assert report.data.tags["tokenbridge.stage"] == "report"
    parent = client.get_run(report.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["tokenbridge.stage"] == "pipeline"
    experiment = client.get_experiment_by_name(params["experiment"])
    stages = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {"distill", "report"} <= {run.data.tags["tokenbridge.stage"] for run in stages}
    # The model's files went through the server into its local store, and come back through it.
    source = client.get_model_version_download_uri(name, version.version)
    assert source.startswith("mlflow-artifacts:"), source
    local = Path(download_artifacts(artifact_uri=source, dst_path=str(tmp_path), tracking_uri=uri))
    assert (local / "MLmodel").is_file() and (local / "model" / "model.safetensors").is_file()
    assert (local / "components" / "tokenizer" / "tokenizer.json").is_file()
    stored = services["state"] / "mlartifacts" / source.removeprefix("mlflow-artifacts:/")
    assert (stored / "model" / "model.safetensors").is_file()


def test_a_deployment_on_a_work_pool_records_the_schedule_and_the_project_directory(repo, services):
    path, env = repo
    run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "tokenbridge", "--type", "process"],
        path, env, COMMAND_TIMEOUT_S)
    run([sys.executable, "-m", "tokenbridge", "pipeline", "--pool", "tokenbridge", "--name", "on-pool",
         "--cron", CRON], path, env, COMMAND_TIMEOUT_S)
    with httpx.Client(base_url=services["PREFECT_API_URL"], timeout=30) as api:
        deployment = api.get(f"/deployments/name/{FLOW}/on-pool").json()
    assert deployment["work_pool_name"] == "tokenbridge"
    assert [entry["schedule"]["cron"] for entry in deployment["schedules"]] == [CRON]
    assert {"prefect.deployments.steps.set_working_directory": {"directory": str(path)}} in deployment["pull_steps"]
