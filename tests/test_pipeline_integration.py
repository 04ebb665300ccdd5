"""The whole chain with real parts: `dvc repro` (driven by the Prefect pipeline flow) on the tiny profile in
a temporary git + DVC repo, Prefect's temporary local API, MLflow on sqlite, lm-eval's real harness."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from project_commands import run, stages_run

ROOT = Path(__file__).parents[1]
EVALUATED = ["teacher", "student_before", "student_after"]
STAGES = ["models", "prepare", "teacher_logits", "distill", "teacher_answers",
          *(f"evaluate@{model}" for model in EVALUATED), "hypernet", "evaluate_hypernet", "transfer", "ensemble",
          "evaluate_transfer", "report"]
OUTPUTS = [
    "models/teacher/config.json", "models/student/tokenizer.json", "data/prepared/manifest.json",
    "data/teacher_logits/manifest.json", "models/distilled/model.safetensors", "metrics/distill.json",
    "metrics/distill_history.csv", "metrics/eval/teacher.json", "metrics/eval/student_after.json",
    "data/eval/student_after/samples.jsonl", "data/eval/teacher/task/gsm/tokenbridge_gsm.yaml",
    "data/eval/student_after/samples.arithmetic.jsonl", "data/teacher_answers/answers.jsonl",
    "reports/report.md", "reports/report.html", "reports/registry.json",
    "models/transferred/gemma/model.safetensors", "models/transferred/qwen-fvt/tokenizer.json",
    "models/sources/gemma/tokenbridge.json", "models/ensemble/config.json", "metrics/transfer/qwen.csv",
    "reports/transfer.md", "reports/transfer.html", "reports/plots/transfer.png",
    "models/hypernet/hypernet.pt", "models/hypernet/hypernet.json", "models/hypernet/heldout_tokenizer/tokenizer.json",
    "metrics/hypernet.json", "metrics/hypernet.csv", "metrics/eval/hypernet.json",
    "models/hypernet_eval/heldout-hypernet/model.safetensors", "models/hypernet_eval/qwen-fvt/tokenizer.json",
]

pytestmark = pytest.mark.integration


def _set_param(repo: Path, edit) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    edit(raw)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tiny_pipeline):
    """The session's tiny pipeline run (tests/conftest.py), which these tests go on changing, one after another."""
    return tiny_pipeline.repo, tiny_pipeline.env, tiny_pipeline.output


def test_every_stage_runs_and_writes_its_outputs(repo):
    path, _, first = repo
    assert stages_run(first) == set(STAGES)
    missing = [name for name in OUTPUTS if not (path / name).exists()]
    assert not missing
    for model in EVALUATED:
        scores = json.loads((path / f"metrics/eval/{model}.json").read_text())
        assert 0 <= scores["gsm_exact_match"] <= 1 and scores["bits_per_byte"] > 0
        assert scores["bits_per_byte_low"] < scores["bits_per_byte"] < scores["bits_per_byte_high"]
        assert (model == "teacher") == ("chunk_gap_bits_per_byte" not in scores), "the students' gap to the teacher"
        assert scores["teacher_answers_bits_per_byte"] > 0 and set(scores["tasks"]) == {"gsm", "arithmetic"}
    transfer = json.loads((path / "metrics/eval/transfer.json").read_text())
    variants = [f"{source}.{variant}" for source in ("gemma", "qwen") for variant in ("original", "fvt", "transferred")]
    assert set(transfer) == {*variants, "ensemble", "student"}
    assert all(scores["bits_per_byte"] > 0 for scores in transfer.values())
    # The evaluation plan: GSM generation for the distillation's models; the transfer variants and the ensemble get
    # bits-per-byte alone (evaluate.transfer_limit: 0), the members the evaluate stage scored keep their GSM scores.
    assert all("gsm_n" not in transfer[label] for label in (*variants, "ensemble"))
    assert transfer["student"] == json.loads((path / "metrics/eval/student_before.json").read_text())
    for model in EVALUATED:  # the tiny profile's runtime (fp32 on this machine's device) reached lm-eval
        harness = json.loads((path / f"data/eval/{model}/lm_eval_config.json").read_text())
        run = json.loads((path / f"data/eval/{model}/run.json").read_text())
        assert run["runtime"]["inference_dtype"] == "float32"
        assert {task: config["model_dtype"] for task, config in harness.items()} == {
            "gsm": "torch.float32", "arithmetic": "torch.float32"}
    report = (path / "reports/transfer.md").read_text()
    assert all(label in report for label in (*variants, "ensemble"))
    hypernet = json.loads((path / "metrics/eval/hypernet.json").read_text())
    compared = [f"{name}.{init}" for name in ("qwen", "heldout") for init in ("fvt", "hypernet")]
    assert set(hypernet) == {"base", *compared}
    assert all(scores["bits_per_byte"] > 0 for scores in hypernet.values())
    assert "Zero-shot transfer: hypernetwork against FVT" in report


def test_mlflow_holds_each_stage_run_grouped_under_the_pipeline(repo):
    path, _, _ = repo
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tokenbridge")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("tokenbridge.stage") == "pipeline"][0]
    stages = {r.data.tags["tokenbridge.stage"]: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == set(STAGES)
    group = parent.data.tags["tokenbridge.pipeline_id"]
    assert all(r.data.tags["tokenbridge.pipeline_id"] == group for r in stages.values())
    assert all(len(r.data.tags["git_commit"]) == 40 for r in stages.values())
    assert all(r.data.metrics and r.data.params for r in stages.values()), "every stage run logs params and metrics"
    assert "sft_loss" in stages["distill"].data.metrics and "alm_loss" in stages["distill"].data.metrics
    history = client.get_metric_history(stages["distill"].info.run_id, "loss")
    assert len(history) == yaml.safe_load((path / "params.yaml").read_text())["profiles"]["tiny"]["distill"]["steps"]
    assert "student_after.gsm_exact_match" in stages["evaluate@student_after"].data.metrics
    assert stages["prepare"].data.params["prepare.n_train"]
    version = client.get_model_version_by_alias("tokenbridge-student", "candidate")
    assert str(version.version) == "1" and version.run_id == stages["report"].info.run_id
    assert str(client.get_model_version_by_alias("tokenbridge-student", "champion").version) == "1"
    hypernet = client.get_model_version("tokenbridge-hypernet", "1")
    assert hypernet.run_id == stages["hypernet"].info.run_id and hypernet.tags["base_model"].startswith("tiny-")


def test_a_second_repro_is_a_no_op(repo):
    path, env, _ = repo
    output = run(["dvc", "repro"], path, env)
    assert stages_run(output) == set(), output


def test_a_fresh_clone_that_pulls_from_a_local_remote_reproduces_nothing(repo, tmp_path):
    """Every output travels through the remote (none is `cache: false`), so a clone plus `dvc pull` is up to
    date: checkpoints, metrics and models included. Runs on a copy; the fixture's repo stays uncommitted."""
    path, env, _ = repo
    origin, remote, clone = tmp_path / "origin", tmp_path / "remote", tmp_path / "clone"
    shutil.copytree(path, origin, symlinks=True)
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], origin, env)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-qm", "pipeline run"], origin, env)
    run(["dvc", "push"], origin, env)
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    assert not [name for name in OUTPUTS if not (clone / name).exists()]
    output = run(["dvc", "repro"], clone, env)
    assert stages_run(output) == set(), output
    assert "Data and pipelines are up to date." in run(["dvc", "status"], clone, env)


def test_changing_a_distill_param_reruns_only_distill_and_what_follows(repo):
    path, env, _ = repo
    _set_param(path, lambda raw: raw["profiles"]["tiny"]["distill"].update(learning_rate=5.0e-4))
    output = run(["dvc", "repro"], path, env)
    assert stages_run(output) == {"distill", "evaluate@student_after", "report"}, output
    registry = json.loads((path / "reports/registry.json").read_text())
    assert registry["version"] == 2 and registry["candidate"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlruns.db'}")
    assert str(client.get_model_version_by_alias("tokenbridge-student", "candidate").version) == "2"
    champion = str(client.get_model_version_by_alias("tokenbridge-student", "champion").version)
    assert champion == ("2" if registry["champion_moved"] else "1")


def _ended(process: psutil.Process) -> bool:
    """Gone, or a zombie nobody reaps yet (in a container, pid 1 may not reap)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _forget_finished_run(path: Path, stage: str) -> None:
    """What a first run killed midway leaves: no entry of `stage` in dvc.lock, none in DVC's run cache."""
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    del lock["stages"][stage]
    (path / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    entries = [entry for entry in (path / ".dvc" / "cache" / "runs").rglob("*")
               if entry.is_file() and f"tokenbridge {stage}\n" in entry.read_text()]
    assert entries, f"the finished run of {stage} is in the run cache"
    for entry in entries:  # an entry's folder is its stage's inputs' hash: DVC fails on one left empty
        shutil.rmtree(entry.parent, ignore_errors=True)


def test_dvc_repro_killed_mid_distill_then_rerun_gives_the_same_student_and_a_clean_status(repo):
    """kill -9 of the distill stage, then of the whole `dvc repro`, right after distill's first checkpoint: the
    stage's temporary Prefect server ends with it; the next `dvc repro` resumes distill and ends with the very
    weights of the uninterrupted run, `dvc status` is clean, and the killed stage's MLflow run is marked FAILED."""
    path, env, _ = repo
    model = path / "models/distilled/model.safetensors"
    reference = model.read_bytes()
    shutil.rmtree(path / "checkpoints/distill")  # else its final checkpoint would leave nothing to train
    process = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "distill"], cwd=path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = path / "checkpoints/distill/state.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    stage = next(child for child in psutil.Process(process.pid).children(recursive=True)
                 if child.cmdline()[-2:] == ["tokenbridge", "distill"])
    servers = [child for child in stage.children() if "uvicorn" in child.cmdline()]
    stage.kill()  # the stage alone first, as an out-of-memory kill would
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "killed before distill's first checkpoint"
    assert servers, "the stage runs Prefect's temporary API server"
    deadline = time.monotonic() + 10
    while not all(_ended(server) for server in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_ended(server) for server in servers), "the killed stage's Prefect server outlived it"
    _forget_finished_run(path, "distill")  # as after a first run killed: else DVC restores the fixture's run
    output = run(["dvc", "repro"], path, env)
    assert "distill" in stages_run(output), output
    assert "checkpoint: resuming" in output, "the stage's own message (a print in its flow) reaches the terminal"
    assert model.read_bytes() == reference
    assert "Data and pipelines are up to date." in run(["dvc", "status"], path, env)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tokenbridge").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'"), "the killed run was not ended"
    killed = client.search_runs([experiment], "attributes.status = 'FAILED'")
    assert [run.data.tags["tokenbridge.stage"] for run in killed] == ["distill"]


def test_params_asking_for_two_processes_make_dvc_repro_train_under_torchrun(repo):
    path, env, _ = repo
    _set_param(path, lambda raw: raw["profiles"]["tiny"]["runtime"].update(processes_per_node=2))
    output = run(["dvc", "repro", "--single-item", "distill"], path, env)
    assert "torch.distributed.run --nproc-per-node 2 --standalone -m tokenbridge distill" in output, output[-3000:]
    assert json.loads((path / "metrics/distill.json").read_text())["runtime"]["processes"] == 2
