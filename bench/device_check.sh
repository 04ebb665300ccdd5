#!/usr/bin/env bash
# The GPU checks in one run (docs/runtime.md#gpu-checks): for one H100 or H200 with torch, transformers, peft and
# accelerate installed and no network; under 8 minutes there.
#
#   bench/device_check.sh OUT_DIR [--cpu] [--quick]
#
# 1. installs the wheels `make device-wheels` put in .whl/ that this Python lacks (offline, into a scratch
#    folder on PYTHONPATH; wheels for another Python are skipped); without .whl/ it uses what this Python has;
# 2. pytest -m cuda tests/test_cuda.py          -> OUT_DIR/pytest-cuda.xml (JUnit), pytest-cuda.txt
# 3. bench/logits.py on a random-init model of Qwen2.5-0.5B's shape -> OUT_DIR/logits.json, logits.md
# 4. bench/step.py (SmolLM2-135M and Qwen2.5-0.5B students, Gemma-3 teacher) -> OUT_DIR/step.json, step.md
# 5. OUT_DIR/results.json and results.md: all of it, with the goals and whether each is met.
#
# --cpu runs on the CPU (the CUDA tests are then skipped); --quick uses tiny shapes and batches. `make test` runs
# `--cpu --quick` (tests/test_device_check.py), so the script cannot rot. A failing part is recorded and the
# others still run; the exit status is non-zero when any part failed. PYTHON overrides the interpreter.
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--cpu] [--quick]" >&2; exit 2; }
[[ $# -ge 1 && $1 != --* ]] || usage
OUT=$1
shift
DEVICE=cuda
QUICK=0
for arg in "$@"; do
  case $arg in
    --cpu) DEVICE=cpu ;;
    --quick) QUICK=1 ;;
    *) usage ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$ROOT" || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# The wheels of .whl/ built for this Python that it lacks (the distribution missing, or at another version).
WHEELS=()
if compgen -G ".whl/*.whl" >/dev/null; then
  mapfile -t WHEELS < <("$PYTHON" - .whl/*.whl <<'PY'
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

supported = set(sys_tags())
for wheel in sys.argv[1:]:
    name, version, _, tags = parse_wheel_filename(Path(wheel).name)
    if not tags & supported:
        print(f"== skipping {wheel}: not built for this Python", file=sys.stderr)
        continue
    try:
        if metadata.version(name) == str(version):
            continue
    except metadata.PackageNotFoundError:
        pass
    print(wheel)
PY
  )
fi
if [[ ${#WHEELS[@]} -gt 0 ]]; then
  SITE=$(mktemp -d)
  trap 'rm -rf "$SITE"' EXIT
  echo "== installing ${WHEELS[*]} into $SITE" >&2
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${WHEELS[@]}" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $QUICK == 1 ]]; then
  LOGITS_ARGS=(--shape tiny-qwen2 --examples 4 --tokens 64 --batch-size 2 --repeats 1)
  STEP_ARGS=(--quick)
else
  LOGITS_ARGS=(--shape qwen2.5-0.5b --examples 64 --tokens 512 --batch-size 8 --repeats 3)
  STEP_ARGS=()
fi

declare -A CODE SECONDS_TAKEN
part() {  # part NAME COMMAND...: run it, keep its exit status and seconds
  local name=$1 started=$SECONDS
  shift
  echo "== $name: $*" >&2
  "$@"
  CODE[$name]=$?
  SECONDS_TAKEN[$name]=$((SECONDS - started))
  echo "== $name: exit ${CODE[$name]} after ${SECONDS_TAKEN[$name]} s" >&2
}

pytest_cuda() {
  "$PYTHON" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --junitxml "$OUT/pytest-cuda.xml" \
    2>&1 | tee "$OUT/pytest-cuda.txt"
}
logits() {
  "$PYTHON" bench/logits.py --device "$DEVICE" "${LOGITS_ARGS[@]}" --json "$OUT/logits.json" >"$OUT/logits.md" \
    2> >(tee "$OUT/logits.log" | tail -n 20 >&2)
}
step() {
  "$PYTHON" bench/step.py --device "$DEVICE" "${STEP_ARGS[@]}" --json "$OUT/step.json" >"$OUT/step.md" \
    2> >(tee "$OUT/step.log" | tail -n 20 >&2)
}
rm -f "$OUT"/{pytest-cuda.xml,pytest-cuda.txt,logits.json,logits.md,logits.log,step.json,step.md,step.log,results.json,results.md}
part pytest pytest_cuda
part logits logits
part step step

"$PYTHON" - "$OUT" "$DEVICE" "$QUICK" "${CODE[pytest]}" "${CODE[logits]}" "${CODE[step]}" \
  "${SECONDS_TAKEN[pytest]}" "${SECONDS_TAKEN[logits]}" "${SECONDS_TAKEN[step]}" <<'PY'
"""Gather the parts' outputs into results.json and results.md."""
import datetime
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, device, quick = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
codes = dict(zip(("pytest", "logits", "step"), map(int, sys.argv[4:7])))
seconds = dict(zip(("pytest", "logits", "step"), map(int, sys.argv[7:10])))


def read_json(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def cpu_model():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


pytest_summary = None
if (out / "pytest-cuda.xml").exists():
    suite = ET.parse(out / "pytest-cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    pytest_summary = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}

logits, step = read_json("logits.json"), read_json("step.json")
goals = {}
if logits:
    goals["logits throughput ratio >= 0.9"] = logits["throughput_ratio"] >= 0.9
if step:
    for name, row in step["students"].items():
        goals[f"{name}: ALM / CE step <= {step['goals']['step_ratio_max']}"] = row["step_ratio"] <= step["goals"]["step_ratio_max"]
        if row["memory_ratio"] is not None:
            goals[f"{name}: memory ALM / CE <= {step['goals']['memory_ratio_max']}"] = (
                row["memory_ratio"] <= step["goals"]["memory_ratio_max"])
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
results = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git_commit": commit, "mode": {"device": device, "quick": quick},
    "machine": {"cpu": cpu_model(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "python": platform.python_version(), "torch": torch.__version__},
    "exit_codes": codes, "seconds": seconds, "pytest": pytest_summary, "logits": logits, "step": step,
    "goals_met": goals,
}
(out / "results.json").write_text(json.dumps(results, indent=2))

machine = results["machine"]
lines = [f"# GPU checks ({'quick, ' if quick else ''}{device}): {machine['gpu'] or machine['cpu']}", "",
         f"{results['date']}, commit {commit}, Python {machine['python']}, torch {machine['torch']}, CPU {machine['cpu']}.",
         "", "| part | exit | seconds |", "|---|---|---|"]
lines += [f"| {part} | {codes[part]} | {seconds[part]} |" for part in codes]
if pytest_summary:
    lines += ["", f"pytest -m cuda: {pytest_summary['passed']} passed, {pytest_summary['failures']} failed, "
                  f"{pytest_summary['errors']} errors, {pytest_summary['skipped']} skipped"]
if goals:
    lines += ["", "| goal | met |", "|---|---|"] + [f"| {goal} | {'yes' if met else 'no'} |" for goal, met in goals.items()]
for name in ("logits.md", "step.md"):
    if (out / name).exists():
        lines += ["", (out / name).read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1).rstrip()]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
REPORT=$?
for code in "${CODE[@]}" "$REPORT"; do
  [[ $code == 0 ]] || exit 1
done
