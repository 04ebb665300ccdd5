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
from prefect.settings import PREFECT_API_URL, temporary_settings

from tokenbridge.flows.common import one_prefect_api, stage_cli

PARAMS = Path(__file__).parents[1] / "params.yaml"
CHILD_URL = [sys.executable, "-c", "import os; print(os.environ.get('PREFECT_API_URL', 'none'))"]


@flow(name="prefect-api-probe")
def _probe() -> int:
    return 1


@pytest.fixture
def no_prefect_api(monkeypatch):
    """No server named, in the environment or in this process's Prefect settings (a parallel worker names one)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_one_server_records_this_process_flows_is_inherited_by_children_and_is_gone_after(no_prefect_api):
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


def _plain_function_writing_its_child_url(params_file: str, out: str) -> None:
    Path(out).write_text(subprocess.run(CHILD_URL, capture_output=True, text=True, check=True).stdout.strip())


_stage_writing_its_child_url = flow(name="prefect-api-stage")(_plain_function_writing_its_child_url)


def test_a_stage_run_alone_shares_its_own_server_with_its_processes_and_a_plain_rank_starts_none(no_prefect_api,
                                                                                                 tmp_path):
    stage_cli(_stage_writing_its_child_url, None, ["--params", str(PARAMS), "--out", str(tmp_path / "flow")], out={})
    assert (tmp_path / "flow").read_text().startswith("http://127.0.0.1:")
    stage_cli(_plain_function_writing_its_child_url, None, ["--params", str(PARAMS), "--out", str(tmp_path / "rank")],
              out={})
    assert (tmp_path / "rank").read_text() == "none"
    assert "PREFECT_API_URL" not in os.environ


def test_a_server_already_named_is_used_and_none_started(no_prefect_api):
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4201/api"}):  # from the environment or a profile
        with one_prefect_api():
            assert "PREFECT_API_URL" not in os.environ, "no server started"
