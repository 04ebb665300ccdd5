"""`tokenbridge <flow>` is the one way to run a flow: every flow module is reachable, and mistakes are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenbridge.cli import FLOWS, FLOWS_DIR


def test_every_flow_module_is_a_subcommand():
    modules = {path.stem for path in FLOWS_DIR.glob("*.py")} - {"__init__", "common"}
    assert set(FLOWS) == modules


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenbridge", *argv], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)


def test_help_lists_every_flow_with_its_summary():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for flow in FLOWS:
        assert f"  {flow} " in result.stdout
    assert "Stage `distill`: train the student" in result.stdout


def test_an_unknown_flow_is_refused_naming_the_choices():
    result = _cli("distil")
    assert result.returncode == 2
    assert "invalid choice: 'distil'" in result.stderr and "'distill'" in result.stderr


def test_a_flows_own_help_names_its_command():
    result = _cli("evaluate", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tokenbridge evaluate") and "--model" in result.stdout


def test_a_flows_multi_word_option_is_spelt_with_dashes():
    result = _cli("claim", "--help")
    assert result.returncode == 0, result.stderr
    assert "--render-only" in result.stdout and "--render_only" not in result.stdout
