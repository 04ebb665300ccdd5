"""Stopped by a signal or killed with -9 anywhere, then rerun: the result is bit-identical to an uninterrupted run.

Each stage run is a process of its own, forked from one that has imported the stages (tests/stage_runner.py). A
run is killed with SIGKILL at random moments (mid-step, mid-checkpoint write, mid-save) and rerun each time, or
stopped with SIGTERM / SIGINT, which it obeys after its current step with a checkpoint; the finished output is
compared byte for byte with an uninterrupted run of the same params and seed. No temporary file of an interrupted
write survives the finished run. A stopped stage's MLflow run is KILLED, a run whose process died is marked FAILED
by the next one, and a stage whose tracking or orchestration server is down stops before any work, naming the
server and the fix."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import psutil
import pytest
import stage_runner
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tokenbridge import tracking
from tokenbridge.flows.common import free_port
from tokenbridge.io import write_text
from tokenbridge.stopping import Stopped

ROOT = Path(__file__).parents[1]


def _run_to_the_end(args: dict) -> float:
    """Seconds the stage's work took (its process starts with the stages imported: tests/stage_runner.py)."""
    started = time.perf_counter()
    process = stage_runner.start(args)
    process.join(timeout=600)
    assert process.exitcode == 0, Path(args["log"]).read_text()[-6000:]
    return time.perf_counter() - started


def _stop(process: BaseProcess, args: dict, stop: signal.Signals) -> None:
    """Send `stop` to the running stage; fails unless it stops within seconds, saying it saved a checkpoint."""
    sent = time.perf_counter()
    os.kill(process.pid, stop)
    process.join(timeout=60)
    assert time.perf_counter() - sent < 10, "the stage did not stop within seconds"
    output = Path(args["log"]).read_text()
    assert process.exitcode not in (0, None), output[-6000:]
    assert f"stopped by {stop.name}: checkpoint saved after step" in output, output[-6000:]


def _wait_for(path: Path, process: BaseProcess, args: dict) -> None:
    """Until the running stage has written `path`."""
    while not path.exists():
        assert process.is_alive(), f"the stage ended before writing {path}:\n{Path(args['log']).read_text()[-6000:]}"
        time.sleep(0.02)


def _killed_at_random_moments(args: dict, seconds: float, kills: int, seed: int) -> list[float]:
    """Start the stage `kills` times, SIGKILL each at a random moment within its expected run time, then let a last
    run finish. Returns the moments."""
    rng = random.Random(seed)
    moments = []
    for _ in range(kills):
        process = stage_runner.start(args)
        moments.append(rng.uniform(0, seconds))
        time.sleep(moments[-1])
        process.kill()
        process.join()
    _run_to_the_end(args)
    return moments


def _losses(path: Path) -> list[str]:
    with open(path) as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


def _leftover_temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*") if path.is_dir()]


def _assert_bit_identical(reference: Path, resumed: Path) -> None:
    expected, actual = load_file(str(reference)), load_file(str(resumed))
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].equal(tensor), f"{name} differs from the uninterrupted run"


def _distill_args(root: Path, dirs: dict[str, Path], tiny_params, out: Path, **overrides) -> dict:
    params = tiny_params.distill.model_copy(update={"steps": 6, "checkpoint_every": 1, **overrides})
    return {"stage": "distill", "runtime": tiny_params.runtime.model_dump(), "params": params.model_dump(),
            "teacher_logits": tiny_params.teacher_logits.model_dump(),
            "paths": [root / "prepared", dirs["student"], out / "model", out / "checkpoints", out / "history.csv",
                      dirs["teacher"], root / "logits"], "log": out / "stage.log"}


def test_distill_killed_anywhere_and_rerun_ends_bit_identical(cross_tokenizer_pair, tiny_params, tmp_path):
    root, dirs = cross_tokenizer_pair

    def args(name: str) -> dict:
        return _distill_args(root, dirs, tiny_params, tmp_path / name)

    seconds = _run_to_the_end(args("uninterrupted"))
    moments = _killed_at_random_moments(args("killed"), seconds, kills=4, seed=17)
    _assert_bit_identical(tmp_path / "uninterrupted" / "model" / "model.safetensors",
                          tmp_path / "killed" / "model" / "model.safetensors")
    assert _losses(tmp_path / "killed" / "history.csv") == _losses(tmp_path / "uninterrupted" / "history.csv"), moments
    assert not _leftover_temporaries(tmp_path / "killed"), moments


def _transfer_args(root: Path, tiny_params, tiny_dirs, out: Path, **overrides) -> dict:
    params = tiny_params.transfer.model_copy(update={"embedding_steps": 3, "steps": 4, "checkpoint_every": 1,
                                                     **overrides})
    return {"stage": "transfer", "runtime": tiny_params.runtime.model_dump(), "params": params.model_dump(),
            "paths": [root / "prepared", tiny_dirs["teacher"], tiny_dirs["student"], out / "models" / "teacher",
                      out / "history.csv"], "checkpoints": out / "checkpoints", "log": out / "stage.log"}


def _assert_same_transfer(reference: Path, resumed: Path) -> None:
    for model in ("teacher", "teacher-fvt"):
        _assert_bit_identical(reference / "models" / model / "model.safetensors",
                              resumed / "models" / model / "model.safetensors")
    assert _losses(resumed / "history.csv") == _losses(reference / "history.csv")


def test_transfer_killed_anywhere_and_rerun_ends_bit_identical(cross_tokenizer_pair, tiny_params, tiny_dirs, tmp_path):
    root, _ = cross_tokenizer_pair
    seconds = _run_to_the_end(_transfer_args(root, tiny_params, tiny_dirs, tmp_path / "uninterrupted"))
    moments = _killed_at_random_moments(_transfer_args(root, tiny_params, tiny_dirs, tmp_path / "killed"), seconds,
                                        kills=3, seed=18)
    _assert_same_transfer(tmp_path / "uninterrupted", tmp_path / "killed")
    assert not _leftover_temporaries(tmp_path / "killed"), moments


def test_sigterm_stops_transfer_in_its_lora_phase_with_a_checkpoint_and_a_rerun_resumes_it(
        cross_tokenizer_pair, tiny_params, tiny_dirs, tmp_path):
    root, _ = cross_tokenizer_pair
    uninterrupted, stopped = (_transfer_args(root, tiny_params, tiny_dirs, tmp_path / name, embedding_steps=2,
                                             steps=150, checkpoint_every=1000) for name in ("uninterrupted", "stopped"))
    _run_to_the_end(uninterrupted)
    process = stage_runner.start(stopped)
    _wait_for(tmp_path / "stopped" / "checkpoints" / "lora", process, stopped)  # past the embeddings phase
    time.sleep(1.0)
    _stop(process, stopped, signal.SIGTERM)
    _run_to_the_end(stopped)
    _assert_same_transfer(tmp_path / "uninterrupted", tmp_path / "stopped")


def _hypernet_args(root: Path, tiny_params, tiny_dirs, out: Path) -> dict:
    params = tiny_params.hypernet.model_copy(update={"identity_steps": 6, "steps": 4, "checkpoint_every": 1})
    return {"stage": "hypernet", "runtime": tiny_params.runtime.model_dump(), "params": params.model_dump(),
            "paths": [root / "prepared", tiny_dirs["student"], out / "hypernet", out / "history.csv"],
            "checkpoints": out / "checkpoints", "log": out / "stage.log"}


def test_hypernet_stopped_by_sigterm_then_killed_anywhere_and_rerun_ends_bit_identical(
        cross_tokenizer_pair, tiny_params, tiny_dirs, tmp_path):
    """Both phases (identity warm-up, ALM on sampled tokenizers) resume where they stopped: each step draws its
    tokenizer and tokens from its own generator, so a resumed run draws what an uninterrupted one would."""
    root, _ = cross_tokenizer_pair
    uninterrupted, interrupted = (_hypernet_args(root, tiny_params, tiny_dirs, tmp_path / name)
                                  for name in ("uninterrupted", "interrupted"))
    seconds = _run_to_the_end(uninterrupted)
    # The same tokenizer pool (HF's Unigram trainer is not deterministic; the stage keeps its pool for reruns).
    shutil.copytree(*(tmp_path / name / "checkpoints" / "pool" for name in ("uninterrupted", "interrupted")))
    process = stage_runner.start(interrupted)
    _wait_for(tmp_path / "interrupted" / "checkpoints" / "identity" / "state.pt", process, interrupted)
    _stop(process, interrupted, signal.SIGTERM)
    moments = _killed_at_random_moments(interrupted, seconds, kills=2, seed=19)
    expected, actual = (torch.load(tmp_path / name / "hypernet" / "hypernet.pt", weights_only=True)
                        for name in ("uninterrupted", "interrupted"))
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].equal(tensor), f"{name} differs from the uninterrupted run ({moments})"
    assert _losses(tmp_path / "interrupted" / "history.csv") == _losses(tmp_path / "uninterrupted" / "history.csv")
    assert not _leftover_temporaries(tmp_path / "interrupted"), moments


def test_a_write_killed_before_its_cleanup_leaves_nothing_after_the_next_write(tmp_path):
    leftover = tmp_path / ".state.pt.k1ll3d_x" / "state.pt"  # what kill -9 inside atomic_path leaves
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / ".state.pt.json.abcdefgh"  # another file's temporary is not this path's
    other.mkdir()
    write_text(tmp_path / "state.pt", "whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == [other.name, "state.pt"]


def test_the_tiny_metaspace_tokenizer_is_the_same_in_every_process():
    """Its trainer kept the 100 most frequent characters with ties broken in hash order, which changes between
    processes: the tiny profile was not reproducible."""
    script = ("import hashlib; from tokenbridge.config import TinyModelSpec; "
              "from tokenbridge.models.tiny import _FORMATS, _train_tokenizer, corpus_text; "
              "spec = TinyModelSpec(source='tiny', tokenizer='metaspace', vocab_size=400, hidden_size=32, "
              "num_layers=1, chat_format='plain'); "
              "print(hashlib.sha256(_train_tokenizer(spec, _FORMATS['plain'][0], corpus_text()).to_str().encode())"
              ".hexdigest())")
    hashes = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
              for _ in range(3)}
    assert len(hashes) == 1, "the tokenizer's ids change from run to run"


def _long_distill_args(root: Path, dirs: dict[str, Path], tiny_params, out: Path) -> dict:
    return _distill_args(root, dirs, tiny_params, out, steps=200, checkpoint_every=1000)


@pytest.fixture(scope="module")
def uninterrupted_long_distill(cross_tokenizer_pair, tiny_params, tmp_path_factory) -> Path:
    """The reference the signal tests compare with, run once for both signals."""
    root, dirs = cross_tokenizer_pair
    out = tmp_path_factory.mktemp("uninterrupted_long_distill")
    _run_to_the_end(_long_distill_args(root, dirs, tiny_params, out))
    return out


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_distill_after_its_step_with_a_checkpoint_and_a_rerun_resumes_it(
        cross_tokenizer_pair, tiny_params, uninterrupted_long_distill, tmp_path, stop):
    root, dirs = cross_tokenizer_pair
    stopped = _long_distill_args(root, dirs, tiny_params, tmp_path / "stopped")
    process = stage_runner.start(stopped)
    _wait_for(tmp_path / "stopped" / "checkpoints", process, stopped)  # the run has started training
    time.sleep(1.0)
    _stop(process, stopped, stop)
    assert not (tmp_path / "stopped" / "model").exists()
    _run_to_the_end(stopped)
    _assert_bit_identical(uninterrupted_long_distill / "model" / "model.safetensors",
                          tmp_path / "stopped" / "model" / "model.safetensors")
    assert _losses(tmp_path / "stopped" / "history.csv") == _losses(uninterrupted_long_distill / "history.csv")


def test_a_stopped_stage_run_is_killed_and_a_run_whose_process_died_is_failed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store: sqlite in the project root
    with pytest.raises(Stopped), tracking.stage_run("distill", "faults", "tiny", {}) as run:
        raise Stopped("SIGTERM")
    died = subprocess.run([sys.executable, "-c", "import os, signal; from tokenbridge import tracking; "
                           "run = tracking.stage_run('distill', 'faults', 'tiny', {}); run.__enter__(); "
                           "import mlflow; print(mlflow.active_run().info.run_id, flush=True); "
                           "os.kill(os.getpid(), signal.SIGKILL)"], capture_output=True, text=True, cwd=tmp_path)
    dead_run = died.stdout.strip()
    client = MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_run(dead_run).info.status == "RUNNING"
    with tracking.stage_run("distill", "faults", "tiny", {}) as alive:
        assert client.get_run(dead_run).info.status == "FAILED"
        assert tracking.fail_abandoned_runs("faults") == [], "a run whose process is alive is left alone"
    assert client.get_run(alive.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("variable", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_a_stage_whose_server_is_down_stops_at_once_naming_it_and_the_fix(tmp_path, variable):
    url = f"http://127.0.0.1:{free_port()}" + ("/api" if variable == "PREFECT_API_URL" else "")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tokenbridge", "prepare"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, variable: url})
    assert time.perf_counter() - started < 60
    assert result.returncode == 2
    assert f"at {url} ({variable}) does not answer" in result.stderr and f"unset {variable}" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlruns.db").exists(), "no work before the check"



def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaps yet (in a container, pid 1 may not reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_what_a_stage_process_started_ends_when_it_is_killed(tmp_path):
    """Prefect's temporary API server (or any child) would outlive a kill -9 of its stage, about 225 MB each."""
    script = ("import subprocess, time; from tokenbridge.flows.common import children_die_with_this_process; "
              "children_die_with_this_process(); child = subprocess.Popen(['sleep', '600']); "
              "print(child.pid, flush=True); time.sleep(600)")
    stage = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert stage.stdout is not None
    child = int(stage.stdout.readline())
    time.sleep(1.5)  # the watchdog looks every 0.5 s
    stage.kill()
    stage.wait()
    deadline = time.monotonic() + 10
    while not _ended(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ended(child), "the killed stage's child is still running"
