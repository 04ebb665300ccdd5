"""What the end-to-end test files share (pytest puts this folder on the path): running a command in a project, and
which stages its output says ran."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """The command's stdout and stderr; fails the test with their end when it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{output[-6000:]}"
    return output


def stages_run(output: str) -> set[str]:
    """The stages `dvc repro` ran (restored ones and those up to date print nothing of this)."""
    return set(re.findall(r"Running stage '([^']+)'", output))
