"""`one_prefect_api`: the temporary Prefect server a pipeline run (and each parallel test worker) shares with the
processes it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prefect import flow

from tokenbridge.flows.common import one_prefect_api, stage_cli

PARAMS = Path(__file__).parents[1] / "params.yaml"
CHILD_URL = [sys.executable, "-c", "import os; print(os.environ.get('PREFECT_API_URL', 'none'))"]


@flow(name="prefect-api-probe")
def _probe() -> int:
    return 1


def test_one_server_records_this_process_flows_is_inherited_by_children_and_is_gone_after(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with one_prefect_api():
        url = os.environ["PREFECT_API_URL"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert subprocess.run(CHILD_URL, capture_output=True, text=True, check=True).stdout.strip() == url
        _probe()
        flows = httpx.post(f"{url}/flows/filter", json={}, timeout=10).json()
        assert "prefect-api-probe" in {recorded["name"] for recorded in flows}
    assert "PREFECT_API_URL" not in os.environ
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=10)


@flow(name="prefect-api-stage")
def _stage_writing_its_child_url(params_file: str, out: str) -> None:
    Path(out).write_text(subprocess.run(CHILD_URL, capture_output=True, text=True, check=True).stdout.strip())


def _plain_function_writing_its_child_url(params_file: str, out: str) -> None:
    Path(out).write_text(subprocess.run(CHILD_URL, capture_output=True, text=True, check=True).stdout.strip())


def test_a_stage_run_alone_shares_its_own_server_with_its_processes_and_a_plain_rank_starts_none(monkeypatch,
                                                                                                 tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    stage_cli(_stage_writing_its_child_url, None, ["--params", str(PARAMS), "--out", str(tmp_path / "flow")], out={})
    assert (tmp_path / "flow").read_text().startswith("http://127.0.0.1:")
    stage_cli(_plain_function_writing_its_child_url, None, ["--params", str(PARAMS), "--out", str(tmp_path / "rank")],
              out={})
    assert (tmp_path / "rank").read_text() == "none"
    assert "PREFECT_API_URL" not in os.environ


def test_a_server_already_named_is_used_and_none_started(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with one_prefect_api():
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
